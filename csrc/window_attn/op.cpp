// Schemas of the window-attention family. Kernels: cpu/ (C++) and gtkernels/triton/window_attn.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(gtkernels, m) {
  // q, k, v: [B, N, H, D]. Query i attends keys i + t * dilation (|t| <= window, t <= 0 if
  // causal) inside [0, N), plus the first num_global keys; the first num_global queries attend
  // every key (j <= i if causal). Each key counts once. Returns out [B, N, H, D] (q's dtype)
  // and lse [B, N, H] (natural log; float32, float64 for float64 inputs).
  // exclude: optional bool [N, 2 * window + 1] (needs num_global = 0); exclude[i, t + window]
  // drops key i + t * dilation of query i in every batch and head (the adjacency + window
  // union of graph_attention meets those keys as edges). A query left without keys gets
  // out = 0 and lse = -inf.
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int window, int dilation, int num_global, "
      "bool causal, float scale, Tensor? exclude=None) -> (Tensor, Tensor)");
  // Gradients of window_attention given grad_out [B, N, H, D] and, optionally, grad_lse
  // [B, N, H]. Returns (grad_q, grad_k, grad_v) in q's dtype.
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, int window, int dilation, int num_global, bool causal, "
      "float scale, Tensor? exclude=None) -> (Tensor, Tensor, Tensor)");
}
