// CPU backward of weighted_gather_sum (and so of hashed_lookup): a stable counting sort of the
// T * B entries by table row, then one pass per row over its entries in token order. Each
// row's gradient and each entry's weight gradient is written by one thread: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/checks.h"

namespace gtk {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Entries p = t * B + b sorted by idx (stable): row r's entries are
// order[offsets[r] .. offsets[r + 1]), in increasing p.
void counting_sort_by_row(const int64_t* idx, int64_t n, int64_t R, std::vector<int64_t>& offsets,
                          std::vector<int64_t>& order) {
  check_rows_in_range(idx, n, R);
  offsets.assign(R + 1, 0);
  for (int64_t p = 0; p < n; ++p) ++offsets[idx[p] + 1];
  for (int64_t r = 0; r < R; ++r) offsets[r + 1] += offsets[r];
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  order.resize(n);
  for (int64_t p = 0; p < n; ++p) order[cursor[idx[p]]++] = p;
}

// acc += w * g; returns g . row. The dot sums in SIMD lanes: a fixed order, so deterministic.
template <typename scalar_t, typename acc_t>
acc_t axpy_and_dot(const scalar_t* g, const scalar_t* row, acc_t w, acc_t* acc, int64_t d) {
  acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < d; ++j) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    acc[j] += w * gj;
    dot += gj * static_cast<acc_t>(row[j]);
  }
  return dot;
}

// grad [M, T, d], table [M, R, d], idx [T, B], weights [T, B] or None ->
// (grad_table [M, R, d] in table's dtype, grad_weights [T, B] in weights' dtype, or [0] when
// weights_grad is false).
std::tuple<at::Tensor, at::Tensor> weighted_gather_sum_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& table_in, const at::Tensor& idx_in,
    const c10::optional<at::Tensor>& weights_in, bool weights_grad) {
  GTK_CHECK_DIM(table_in, 3);
  GTK_CHECK_DIM(idx_in, 2);
  GTK_CHECK(!weights_grad || weights_in.has_value(), "weights_grad needs weights");
  const at::Tensor table = table_in.contiguous();
  const at::Tensor grad = grad_in.to(table.scalar_type()).contiguous();
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const int64_t M = table.size(0), R = table.size(1), d = table.size(2);
  const int64_t T = idx.size(0), B = idx.size(1), n = T * B;
  GTK_CHECK(grad.sizes() == at::IntArrayRef({M, T, d}), "grad must be [M, T, d]");
  const at::ScalarType acc_dtype = table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor weights;
  if (weights_in.has_value()) {
    GTK_CHECK(weights_in->sizes() == idx.sizes(), "weights must have idx's shape [T, B]");
    weights = weights_in->to(acc_dtype).contiguous();
  }
  at::Tensor grad_table = at::empty_like(table);
  at::Tensor grad_weights_acc = at::zeros({weights_grad ? n : 0}, table.options().dtype(acc_dtype));
  std::vector<int64_t> offsets, order;
  counting_sort_by_row(idx.data_ptr<int64_t>(), n, R, offsets, order);
  if (grad_table.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "weighted_gather_sum_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      const scalar_t* tp = table.data_ptr<scalar_t>();
      const acc_t* wp = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
      acc_t* dwp = weights_grad ? grad_weights_acc.data_ptr<acc_t>() : nullptr;
      scalar_t* dtp = grad_table.data_ptr<scalar_t>();
      const int64_t work_per_row = std::max<int64_t>(1, n / std::max<int64_t>(R, 1)) * M * d;
      at::parallel_for(0, R, cpu_grain(work_per_row), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(d);
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t m = 0; m < M; ++m) {
            const scalar_t* table_row = tp + (m * R + r) * d;
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t q = offsets[r]; q < offsets[r + 1]; ++q) {
              const int64_t p = order[q];
              const scalar_t* g = gp + (m * T + p / B) * d;
              const acc_t w = wp != nullptr ? wp[p] : acc_t(1);
              const acc_t dot = axpy_and_dot(g, table_row, w, acc.data(), d);
              if (dwp != nullptr) dwp[p] += dot;
            }
            scalar_t* out = dtp + (m * R + r) * d;
            for (int64_t j = 0; j < d; ++j) out[j] = static_cast<scalar_t>(acc[j]);
          }
        }
      });
    });
  }
  at::Tensor grad_weights = weights_grad
      ? grad_weights_acc.view({T, B}).to(weights_in->scalar_type())
      : grad_weights_acc;
  return {grad_table, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) {
  m.impl("weighted_gather_sum_backward", &weighted_gather_sum_backward_cpu);
}

}  // namespace gtk
