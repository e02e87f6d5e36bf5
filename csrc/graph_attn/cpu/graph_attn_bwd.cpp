// CPU backward of graph_attention, without atomics:
//   1. per destination i (CSR): p_e = exp(s_e - lse_i), ds_e = p_e (dO_i . (v_j + a_e) - delta_i)
//      with delta_i = dO_i . O_i - dlse_i, evaluated as p_e ((dO_i . (v_j + a_e) - dO_i . O_i)
//      + dlse_i) (see window_attn_backward.cpp); dq_i = scale sum_e ds_e (k_j + a_e); the per-edge
//      grads d_edge_bias_e = ds_e and d_edge_attr_e = scale ds_e q_i + p_e dO_i; p and ds kept.
//   2. per source j (CSC): dk_j = scale sum_e ds_e q_i, dv_j = sum_e p_e dO_i.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "graph_attn_common.h"

namespace gtk {
namespace {

using namespace graph_attn_cpu;

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t *grad_out, *q, *k, *v, *out, *edge_bias, *edge_attr;
  const acc_t *lse, *grad_lse;
  const int64_t *indptr, *csc_indptr;
  acc_t scale;
  int64_t N, E, H, D;
  // outputs and per-edge scratch
  scalar_t *dq, *dk, *dv, *d_edge_bias, *d_edge_attr;
  acc_t *prob, *dscore;  // [E, H] in CSR order
};

template <typename scalar_t, typename index_t>
void destination_pass(const BackwardArgs<scalar_t>& a, const index_t* indices) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = a.H, D = a.D, HD = H * D;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, a.N, node_grain(a.N, a.E, HD), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_row(HD), dout_row(HD), dq_row(HD), key(D), value(D), dout_out(H),
        dlse(H), grad(D);
    for (int64_t i = begin; i < end; ++i) {
      load_row(a.q + i * HD, q_row.data(), HD);
      load_row(a.grad_out + i * HD, dout_row.data(), HD);
      std::fill(dq_row.begin(), dq_row.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        load_row(a.out + i * HD + h * D, value.data(), D);
        dout_out[h] = dot(dout_row.data() + h * D, value.data(), D);
        dlse[h] = a.grad_lse ? a.grad_lse[i * H + h] : acc_t(0);
      }
      for (int64_t e = a.indptr[i]; e < a.indptr[i + 1]; ++e) {
        const int64_t j = static_cast<int64_t>(indices[e]);
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* attr = a.edge_attr ? a.edge_attr + (e * H + h) * D : nullptr;
          const acc_t* q_h = q_row.data() + h * D;
          const acc_t* dout_h = dout_row.data() + h * D;
          const acc_t* key_j = row_as_acc(a.k + j * HD + h * D, attr, key.data(), D);
          const acc_t* value_j = row_as_acc(a.v + j * HD + h * D, attr, value.data(), D);
          acc_t s = a.scale * dot(q_h, key_j, D);
          if (a.edge_bias) s += static_cast<acc_t>(a.edge_bias[e * H + h]);
          const acc_t p = s == neg_inf ? acc_t(0) : std::exp(s - a.lse[i * H + h]);
          const acc_t ds = p * ((dot(dout_h, value_j, D) - dout_out[h]) + dlse[h]);
          a.prob[e * H + h] = p;
          a.dscore[e * H + h] = ds;
          scale_add(dq_row.data() + h * D, acc_t(1), ds, key_j, D);
          if (a.d_edge_bias) a.d_edge_bias[e * H + h] = static_cast<scalar_t>(ds);
          if (a.d_edge_attr) {
            for (int64_t d = 0; d < D; ++d) grad[d] = a.scale * ds * q_h[d] + p * dout_h[d];
            store_row(grad.data(), a.d_edge_attr + (e * H + h) * D, D, acc_t(1));
          }
        }
      }
      store_row(dq_row.data(), a.dq + i * HD, HD, a.scale);
    }
  });
}

template <typename scalar_t, typename index_t>
void source_pass(const BackwardArgs<scalar_t>& a, const index_t* csc_indices,
                 const index_t* csc_edge_ids) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = a.H, D = a.D, HD = H * D;
  at::parallel_for(0, a.N, node_grain(a.N, a.E, HD), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dk_row(HD), dv_row(HD), row(D);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(dk_row.begin(), dk_row.end(), acc_t(0));
      std::fill(dv_row.begin(), dv_row.end(), acc_t(0));
      for (int64_t c = a.csc_indptr[j]; c < a.csc_indptr[j + 1]; ++c) {
        const int64_t i = static_cast<int64_t>(csc_indices[c]);
        const int64_t e = static_cast<int64_t>(csc_edge_ids[c]);
        for (int64_t h = 0; h < H; ++h) {
          const acc_t ds = a.dscore[e * H + h], p = a.prob[e * H + h];
          const scalar_t* none = nullptr;
          scale_add(dk_row.data() + h * D, acc_t(1), ds,
                    row_as_acc(a.q + i * HD + h * D, none, row.data(), D), D);
          scale_add(dv_row.data() + h * D, acc_t(1), p,
                    row_as_acc(a.grad_out + i * HD + h * D, none, row.data(), D), D);
        }
      }
      store_row(dk_row.data(), a.dk + j * HD, HD, a.scale);
      store_row(dv_row.data(), a.dv + j * HD, HD, acc_t(1));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_attention_backward_cpu(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& indptr_in,
    const at::Tensor& indices_in, const at::Tensor& csc_indptr_in,
    const at::Tensor& csc_indices_in, const at::Tensor& csc_edge_ids_in,
    const c10::optional<at::Tensor>& edge_bias_in, const c10::optional<at::Tensor>& edge_attr_in,
    double scale) {
  check_inputs(indptr_in, indices_in, q_in, k_in, v_in, edge_bias_in, edge_attr_in);
  check_node_tensor(grad_out_in, "grad_out", q_in);
  check_node_tensor(out_in, "out", q_in);
  const auto lse_type = lse_dtype(q_in.scalar_type());
  GTK_CHECK(lse_in.scalar_type() == lse_type && lse_in.dim() == 2, "lse has the wrong dtype/dim");
  GTK_CHECK(csc_indices_in.scalar_type() == indices_in.scalar_type() &&
                csc_edge_ids_in.scalar_type() == indices_in.scalar_type(),
            "csc_indices and csc_edge_ids must have indices' dtype");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_lse = grad_lse_in.has_value() ? grad_lse_in->to(lse_type).contiguous()
                                                      : at::Tensor();
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor csc_indptr = csc_indptr_in.contiguous();
  const at::Tensor csc_indices = csc_indices_in.contiguous();
  const at::Tensor csc_edge_ids = csc_edge_ids_in.contiguous();
  const at::Tensor edge_bias = contiguous_or_undefined(edge_bias_in);
  const at::Tensor edge_attr = contiguous_or_undefined(edge_attr_in);
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), E = indices.size(0);

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  at::Tensor d_edge_bias = at::empty(edge_bias.defined() ? at::IntArrayRef({E, H}) : 0, q.options());
  at::Tensor d_edge_attr =
      at::empty(edge_attr.defined() ? at::IntArrayRef({E, H, D}) : 0, q.options());
  if (q.numel() == 0) return {dq, dk, dv, d_edge_bias, d_edge_attr};
  at::Tensor prob = at::empty({E, H}, q.options().dtype(lse_type));
  at::Tensor dscore = at::empty({E, H}, q.options().dtype(lse_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "graph_attention_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    BackwardArgs<scalar_t> a{grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                             k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), data_or_null<scalar_t>(edge_bias),
                             data_or_null<scalar_t>(edge_attr), lse.data_ptr<acc_t>(),
                             grad_lse.defined() ? grad_lse.data_ptr<acc_t>() : nullptr,
                             indptr.data_ptr<int64_t>(), csc_indptr.data_ptr<int64_t>(),
                             static_cast<acc_t>(scale), N, E, H, D,
                             dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                             dv.data_ptr<scalar_t>(),
                             edge_bias.defined() ? d_edge_bias.data_ptr<scalar_t>() : nullptr,
                             edge_attr.defined() ? d_edge_attr.data_ptr<scalar_t>() : nullptr,
                             prob.data_ptr<acc_t>(), dscore.data_ptr<acc_t>()};
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "graph_attention_backward_cpu", [&] {
      destination_pass<scalar_t, index_t>(a, indices.data_ptr<index_t>());
      source_pass<scalar_t, index_t>(a, csc_indices.data_ptr<index_t>(),
                                     csc_edge_ids.data_ptr<index_t>());
    });
  });
  return {dq, dk, dv, d_edge_bias, d_edge_attr};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) {
  m.impl("graph_attention_backward", &graph_attention_backward_cpu);
}

}  // namespace gtk
