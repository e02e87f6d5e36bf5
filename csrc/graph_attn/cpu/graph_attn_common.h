// Shared pieces of the CPU graph-attention kernels: argument checks and row helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "common/checks.h"

namespace gtk {
namespace graph_attn_cpu {

// Edge-count grain for at::parallel_for over nodes: each node costs about deg * H * D.
inline int64_t node_grain(int64_t num_nodes, int64_t num_edges, int64_t head_elems) {
  const int64_t avg_degree = num_nodes > 0 ? std::max<int64_t>(1, num_edges / num_nodes) : 1;
  return cpu_grain(avg_degree * head_elems);
}

// Accumulation type: float for float/half/bfloat16, double for double (gradcheck).
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Type of lse: float32, float64 for float64 inputs.
inline at::ScalarType lse_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// row[0:n] (any floating type) -> accumulation buffer.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* row, acc_t* dst, int64_t n) {
  for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<acc_t>(row[t]);
}

// dst[0:n] = a[0:n] + b[0:n] (b may be null: plain copy).
template <typename scalar_t, typename acc_t>
inline void load_row_plus(const scalar_t* a, const scalar_t* b, acc_t* dst, int64_t n) {
  if (b == nullptr) {
    load_row(a, dst, n);
    return;
  }
  for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<acc_t>(a[t]) + static_cast<acc_t>(b[t]);
}

// row[0:n] (+ extra[0:n] unless null) as acc_t: the row itself when no conversion is needed,
// else `buffer` filled with the converted values.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* row, const scalar_t* extra, acc_t* buffer,
                               int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (extra == nullptr) return row;
  }
  load_row_plus(row, extra, buffer, n);
  return buffer;
}

// Vectorised (reassociated) sums: the order differs from a sequential loop but is fixed,
// so results stay deterministic.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < n; ++t) s += a[t] * b[t];
  return s;
}

// y[0:n] = y * alpha + p * x
template <typename acc_t>
inline void scale_add(acc_t* y, acc_t alpha, acc_t p, const acc_t* x, int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) y[t] = y[t] * alpha + p * x[t];
}

template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, scalar_t* row, int64_t n, acc_t factor) {
  for (int64_t t = 0; t < n; ++t) row[t] = static_cast<scalar_t>(src[t] * factor);
}

inline void check_node_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  GTK_CHECK(t.sizes() == q.sizes(), "%s must have q's shape %s, got %s", name,
            shape_text(q.sizes()).s, shape_text(t.sizes()).s);
  GTK_CHECK(t.scalar_type() == q.scalar_type(), "%s must have q's dtype", name);
  GTK_CHECK_DEVICE(t, q.device());
}

// Checks the CSR arrays and the optional per-edge tensors against q [N, H, D].
inline void check_inputs(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& edge_bias,
                         const c10::optional<at::Tensor>& edge_attr) {
  GTK_CHECK_DIM(q, 3);
  GTK_CHECK_FLOATING(q);
  check_node_tensor(k, "k", q);
  check_node_tensor(v, "v", q);
  GTK_CHECK(indptr.scalar_type() == at::kLong && indptr.dim() == 1 &&
                indptr.size(0) == q.size(0) + 1,
            "indptr must be int64 [N + 1]");
  GTK_CHECK(indices.dim() == 1 && (indices.scalar_type() == at::kInt ||
                                   indices.scalar_type() == at::kLong),
            "indices must be int32/int64 [E]");
  const int64_t E = indices.size(0);
  if (edge_bias.has_value()) {
    GTK_CHECK(edge_bias->sizes() == at::IntArrayRef({E, q.size(1)}), "edge_bias must be [E, H]");
    GTK_CHECK(edge_bias->scalar_type() == q.scalar_type(), "edge_bias must have q's dtype");
  }
  if (edge_attr.has_value()) {
    GTK_CHECK(edge_attr->sizes() == at::IntArrayRef({E, q.size(1), q.size(2)}),
              "edge_attr must be [E, H, D]");
    GTK_CHECK(edge_attr->scalar_type() == q.scalar_type(), "edge_attr must have q's dtype");
  }
}

inline at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename scalar_t>
inline const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

}  // namespace graph_attn_cpu
}  // namespace gtk
