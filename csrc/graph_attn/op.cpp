// Schemas of the graph-attention family. Kernels: cpu/ (C++) and gtkernels/triton/graph_attn.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(gtkernels, m) {
  // Masked attention of each destination node over its in-edges, given in CSR order:
  // indptr int64 [N + 1], indices int32/int64 [E] (source node of each edge, grouped by
  // destination). The transpose (CSC, grouped by source) is not read by the forward but is
  // an input so that the backward gets it: csc_indptr int64 [N + 1], csc_indices [E]
  // (destination of each CSC edge), csc_edge_ids [E] (CSR position of each CSC edge), both of
  // indices' dtype. q, k, v [N, H, D]; edge_bias [E, H] and edge_attr [E, H, D] in CSR order.
  // Returns out [N, H, D] (q's dtype) and lse [N, H] (float32; float64 for float64 inputs;
  // -inf for nodes without in-edges).
  m.def(
      "graph_attention(Tensor indptr, Tensor indices, Tensor csc_indptr, Tensor csc_indices, "
      "Tensor csc_edge_ids, Tensor q, Tensor k, Tensor v, Tensor? edge_bias, "
      "Tensor? edge_attr, float scale) -> (Tensor, Tensor)");
  // Gradients of graph_attention (grad_lse: gradient of lse, None when lse was not used).
  // Returns dq, dk, dv [N, H, D], d_edge_bias [E, H] and d_edge_attr [E, H, D] (both [0]
  // when the corresponding input is None).
  m.def(
      "graph_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor indptr, Tensor indices, Tensor csc_indptr, "
      "Tensor csc_indices, Tensor csc_edge_ids, Tensor? edge_bias, Tensor? edge_attr, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // graph_attention over the union of each node's in-edges, the dilated window (window > 0:
  // keys i + t * dilation, |t| <= window) and the global nodes (int64 [G]; they attend every
  // node; None: none), each key once; edge_bias / edge_attr apply to edge keys. The graph
  // must be coalesced, global_nodes distinct in [0, N). Returns out [N, H, D] and lse [N, H]
  // like graph_attention. Kernels: Python (gtkernels/graph_union.py), composed of the graph
  // and window kernels and, on CUDA, gtkernels/triton/graph_union.py.
  m.def(
      "graph_attention_union(Tensor indptr, Tensor indices, Tensor csc_indptr, "
      "Tensor csc_indices, Tensor csc_edge_ids, Tensor q, Tensor k, Tensor v, Tensor? edge_bias, "
      "Tensor? edge_attr, float scale, int window, int dilation, Tensor? global_nodes) "
      "-> (Tensor, Tensor)");
  // Gradients of graph_attention_union: dq, dk, dv, d_edge_bias, d_edge_attr as for
  // graph_attention_backward.
  m.def(
      "graph_attention_union_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor indptr, Tensor indices, Tensor csc_indptr, "
      "Tensor csc_indices, Tensor csc_edge_ids, Tensor? edge_bias, Tensor? edge_attr, "
      "float scale, int window, int dilation, Tensor? global_nodes) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
