// CPU forward of graph_attention: one destination node per iteration of at::parallel_for,
// online softmax over its in-edges, all heads, fp32 accumulation (fp64 for fp64 inputs).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "graph_attn_common.h"

namespace gtk {
namespace {

using namespace graph_attn_cpu;

template <typename scalar_t, typename index_t>
void forward_rows(const int64_t* indptr, const index_t* indices, const scalar_t* q,
                  const scalar_t* k, const scalar_t* v, const scalar_t* edge_bias,
                  const scalar_t* edge_attr, double scale_in, int64_t N, int64_t E, int64_t H,
                  int64_t D, scalar_t* out, acc_type<scalar_t>* lse) {
  using acc_t = acc_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t HD = H * D;
  at::parallel_for(0, N, node_grain(N, E, HD), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_row(HD), acc(HD), key(D), value(D), m(H), l(H);
    for (int64_t i = begin; i < end; ++i) {
      load_row(q + i * HD, q_row.data(), HD);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t e = indptr[i]; e < indptr[i + 1]; ++e) {
        const int64_t j = static_cast<int64_t>(indices[e]);
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* attr = edge_attr ? edge_attr + (e * H + h) * D : nullptr;
          const acc_t* key_j = row_as_acc(k + j * HD + h * D, attr, key.data(), D);
          acc_t s = scale * dot(q_row.data() + h * D, key_j, D);
          if (edge_bias) s += static_cast<acc_t>(edge_bias[e * H + h]);
          acc_t alpha = 1;  // rescales what was accumulated when the running max grows
          if (s > m[h]) {
            alpha = std::exp(m[h] - s);
            m[h] = s;
          }
          const acc_t p = s == neg_inf ? acc_t(0) : std::exp(s - m[h]);  // bias may be -inf
          l[h] = l[h] * alpha + p;
          const acc_t* value_j = row_as_acc(v + j * HD + h * D, attr, value.data(), D);
          scale_add(acc.data() + h * D, alpha, p, value_j, D);
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const bool empty = l[h] == acc_t(0);
        store_row(acc.data() + h * D, out + i * HD + h * D, D, empty ? acc_t(0) : 1 / l[h]);
        lse[i * H + h] = empty ? neg_inf : m[h] + std::log(l[h]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> graph_attention_cpu(
    const at::Tensor& indptr_in, const at::Tensor& indices_in, const at::Tensor& /*csc_indptr*/,
    const at::Tensor& /*csc_indices*/, const at::Tensor& /*csc_edge_ids*/, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& edge_bias_in,
    const c10::optional<at::Tensor>& edge_attr_in, double scale) {
  check_inputs(indptr_in, indices_in, q_in, k_in, v_in, edge_bias_in, edge_attr_in);
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor edge_bias = contiguous_or_undefined(edge_bias_in);
  const at::Tensor edge_attr = contiguous_or_undefined(edge_attr_in);
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), E = indices.size(0);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({N, H}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "graph_attention_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "graph_attention_cpu", [&] {
      forward_rows<scalar_t, index_t>(
          indptr.data_ptr<int64_t>(), indices.data_ptr<index_t>(), q.data_ptr<scalar_t>(),
          k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), data_or_null<scalar_t>(edge_bias),
          data_or_null<scalar_t>(edge_attr), scale, N, E, H, D, out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_type<scalar_t>>());
    });
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) { m.impl("graph_attention", &graph_attention_cpu); }

}  // namespace gtk
