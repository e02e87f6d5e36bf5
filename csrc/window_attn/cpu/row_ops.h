// Row primitives of the CPU window-attention kernels: dot products and axpy over the head dim,
// accumulated in acc_t (float, or double for double inputs). `omp simd` lets the compiler
// vectorise the reductions without -ffast-math.
#pragma once

#include <cstdint>

namespace gtk {

template <typename acc_t, typename scalar_t>
inline acc_t dot_row(const acc_t* a, const scalar_t* b, int64_t dim) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < dim; ++c) sum += a[c] * static_cast<acc_t>(b[c]);
  return sum;
}

// y += alpha * x
template <typename acc_t, typename scalar_t>
inline void axpy_row(acc_t* y, acc_t alpha, const scalar_t* x, int64_t dim) {
#pragma omp simd
  for (int64_t c = 0; c < dim; ++c) y[c] += alpha * static_cast<acc_t>(x[c]);
}

template <typename acc_t, typename scalar_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64_t dim) {
#pragma omp simd
  for (int64_t c = 0; c < dim; ++c) dst[c] = static_cast<acc_t>(src[c]);
}

}  // namespace gtk
