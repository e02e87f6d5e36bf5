// CPU backward of dilated window attention with global tokens (flash-attention-2 algebra):
//   p_ij = exp(s_ij - lse_i), dp_ij = dO_i . v_j, ds_ij = p_ij (dp_ij - delta_i),
//   delta_i = dO_i . O_i - dlse_i;  dq_i = scale sum_j ds_ij k_j,
//   dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dO_i.
// ds is evaluated as p_ij ((dp_ij - dO_i . O_i) + dlse_i): the same algebra, but a query with
// one key (O_i = v_j, p = 1) gets ds = dlse exactly instead of dlse with the rounding error of
// dO . O - dlse, which is large relative to a small dlse.
// Pass 1 owns queries (dO . O, dq), pass 2 owns keys (dk, dv): each output row is written by one
// task, so the result is deterministic without atomics.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "window_attn/cpu/row_ops.h"
#include "window_attn/cpu/window_sets.h"

namespace gtk {
namespace {

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *grad_out, *q, *k, *v, *out;
  const acc_t* grad_lse;  // may be null
  const acc_t* lse;
  acc_t* dout_out;  // dO_i . O_i

  acc_t dlse(int64_t row) const { return grad_lse != nullptr ? grad_lse[row] : acc_t(0); }
  scalar_t *grad_q, *grad_k, *grad_v;
  int64_t batch, heads, dim;
  acc_t scale;
};

// Pass 1: dO_i . O_i and dq_i for every (b, i, h).
template <typename scalar_t>
void query_pass(const BackwardArgs<scalar_t>& a, const WindowSpec& spec) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = spec.n, heads = a.heads, dim = a.dim;
  const int64_t work_per_row = (spec.num_global + 2 * spec.window + 1) * dim;
  const int64_t grain = cpu_grain(work_per_row);
  at::parallel_for(0, a.batch * n * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_row(dim), do_row(dim), dq(dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % heads;
      const int64_t i = (row / heads) % n;
      const int64_t key_base = (row / (heads * n)) * n * heads + h;
      load_row(q_row.data(), a.q + row * dim, dim);
      load_row(do_row.data(), a.grad_out + row * dim, dim);
      const acc_t dout_out = dot_row(do_row.data(), a.out + row * dim, dim);
      const acc_t dlse = a.dlse(row);
      a.dout_out[row] = dout_out;
      const acc_t lse = a.lse[row];
      std::fill(dq.begin(), dq.end(), acc_t(0));
      for_each_key(spec, i, [&](int64_t j) {
        const int64_t key_row = key_base + j * heads;
        const scalar_t* k_row = a.k + key_row * dim;
        const acc_t p = std::exp(dot_row(q_row.data(), k_row, dim) * a.scale - lse);
        const acc_t ds = p * ((dot_row(do_row.data(), a.v + key_row * dim, dim) - dout_out) + dlse);
        axpy_row(dq.data(), ds, k_row, dim);
      });
      for (int64_t c = 0; c < dim; ++c) {
        a.grad_q[row * dim + c] = static_cast<scalar_t>(dq[c] * a.scale);
      }
    }
  });
}

// Pass 2: dk_j and dv_j for every (b, j, h), over the queries that attend key j.
template <typename scalar_t>
void key_pass(const BackwardArgs<scalar_t>& a, const WindowSpec& spec) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = spec.n, heads = a.heads, dim = a.dim;
  const int64_t work_per_row = (spec.num_global + 2 * spec.window + 1) * dim;
  const int64_t grain = cpu_grain(work_per_row);
  at::parallel_for(0, a.batch * n * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> k_row(dim), v_row(dim), dk(dim), dv(dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % heads;
      const int64_t j = (row / heads) % n;
      const int64_t query_base = (row / (heads * n)) * n * heads + h;
      load_row(k_row.data(), a.k + row * dim, dim);
      load_row(v_row.data(), a.v + row * dim, dim);
      std::fill(dk.begin(), dk.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      for_each_query(spec, j, [&](int64_t i) {
        const int64_t query_row = query_base + i * heads;
        const scalar_t* q_row = a.q + query_row * dim;
        const scalar_t* do_row = a.grad_out + query_row * dim;
        const acc_t p = std::exp(dot_row(k_row.data(), q_row, dim) * a.scale - a.lse[query_row]);
        const acc_t ds =
            p * ((dot_row(v_row.data(), do_row, dim) - a.dout_out[query_row]) + a.dlse(query_row));
        axpy_row(dv.data(), p, do_row, dim);
        axpy_row(dk.data(), ds, q_row, dim);
      });
      for (int64_t c = 0; c < dim; ++c) {
        a.grad_k[row * dim + c] = static_cast<scalar_t>(dk[c] * a.scale);
        a.grad_v[row * dim + c] = static_cast<scalar_t>(dv[c]);
      }
    }
  });
}

template <typename scalar_t>
void backward_passes(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse_in,
                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse_in, at::Tensor& grad_q,
                     at::Tensor& grad_k, at::Tensor& grad_v, const WindowSpec& spec,
                     double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor lse = lse_in.to(acc_dtype).contiguous();
  at::Tensor grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->to(acc_dtype).contiguous();
  at::Tensor dout_out = at::empty(lse.sizes(), lse.options());
  BackwardArgs<scalar_t> args{grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(),
                              grad_lse.defined() ? grad_lse.data_ptr<acc_t>() : nullptr,
                              lse.data_ptr<acc_t>(), dout_out.data_ptr<acc_t>(),
                              grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                              grad_v.data_ptr<scalar_t>(), q.size(0), q.size(2), q.size(3),
                              static_cast<acc_t>(scale)};
  query_pass(args, spec);  // dO . O and dq first: the key pass reads dO . O
  key_pass(args, spec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t window, int64_t dilation,
    int64_t num_global, bool causal, double scale,
    const std::optional<at::Tensor>& exclude_in) {
  GTK_CHECK_DIM(q_in, 4);
  GTK_CHECK(k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes() &&
                out_in.sizes() == q_in.sizes() && grad_out_in.sizes() == q_in.sizes(),
            "grad_out, q, k, v, out must have one shape [B, N, H, D]");
  GTK_CHECK(window >= 0 && dilation >= 1, "window must be >= 0 and dilation >= 1");
  GTK_CHECK(num_global >= 0 && num_global <= q_in.size(1), "num_global must be in [0, N]");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(q.scalar_type()).contiguous();
  const int64_t n = q.size(1);
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(q), grad_v = at::empty_like(q);
  if (q.numel() == 0) return {grad_q, grad_k, grad_v};
  const at::Tensor exclude = exclude_in.has_value() ? exclude_in->contiguous() : at::Tensor();
  const WindowSpec spec = make_window_spec(n, window, dilation, num_global, causal, exclude);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "window_attention_backward_cpu", [&] {
    backward_passes<scalar_t>(grad_out, grad_lse_in, q, k, v, out, lse_in, grad_q, grad_k,
                              grad_v, spec, scale);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) {
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace gtk
