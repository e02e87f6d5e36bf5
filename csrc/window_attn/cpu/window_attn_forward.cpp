// CPU forward of dilated window attention with global tokens: one task per (b, query, head),
// two passes over the query's key set (scores, then softmax-weighted values), fp32 (or fp64)
// accumulation.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "window_attn/cpu/row_ops.h"
#include "window_attn/cpu/window_sets.h"

namespace gtk {
namespace {

template <typename scalar_t>
void window_attention_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                           scalar_t* out, at::opmath_type<scalar_t>* lse, int64_t batch,
                           int64_t heads, int64_t dim, const WindowSpec& spec, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = spec.n;
  const int64_t work_per_row = (spec.num_global + 2 * spec.window + 1) * dim;
  at::parallel_for(0, batch * n * heads, cpu_grain(work_per_row), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_row(dim), acc(dim), scores;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % heads;
      const int64_t i = (row / heads) % n;
      const int64_t b = row / (heads * n);
      const int64_t key_base = b * n * heads + h;  // row index of key 0 of this (b, h)
      load_row(q_row.data(), q + row * dim, dim);
      scores.clear();
      acc_t max_score = -std::numeric_limits<acc_t>::infinity();
      for_each_key(spec, i, [&](int64_t j) {
        const acc_t s = dot_row(q_row.data(), k + (key_base + j * heads) * dim, dim) *
                        static_cast<acc_t>(scale);
        scores.push_back(s);
        max_score = std::max(max_score, s);
      });
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t denom = 0;
      size_t idx = 0;
      for_each_key(spec, i, [&](int64_t j) {
        const acc_t p = std::exp(scores[idx++] - max_score);
        denom += p;
        axpy_row(acc.data(), p, v + (key_base + j * heads) * dim, dim);
      });
      // denom = 0 only when `exclude` dropped every key: out = 0, lse = -inf.
      const acc_t inv_denom = denom > 0 ? 1 / denom : acc_t(0);
      for (int64_t c = 0; c < dim; ++c) {
        out[row * dim + c] = static_cast<scalar_t>(acc[c] * inv_denom);
      }
      lse[row] = max_score + std::log(denom);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t window,
    int64_t dilation, int64_t num_global, bool causal, double scale,
    const std::optional<at::Tensor>& exclude_in) {
  GTK_CHECK_DIM(q_in, 4);
  GTK_CHECK_FLOATING(q_in);
  GTK_CHECK(k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
            "q, k, v must have one shape [B, N, H, D]");
  GTK_CHECK(window >= 0 && dilation >= 1, "window must be >= 0 and dilation >= 1");
  GTK_CHECK(num_global >= 0 && num_global <= q_in.size(1), "num_global must be in [0, N]");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t batch = q.size(0), n = q.size(1), heads = q.size(2), dim = q.size(3);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({batch, n, heads}, q.options().dtype(lse_dtype));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor exclude = exclude_in.has_value() ? exclude_in->contiguous() : at::Tensor();
  const WindowSpec spec = make_window_spec(n, window, dilation, num_global, causal, exclude);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        window_attention_rows<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                        v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        lse.data_ptr<acc_t>(), batch, heads, dim, spec, scale);
      });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) { m.impl("window_attention", &window_attention_cpu); }

}  // namespace gtk
