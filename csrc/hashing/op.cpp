// Schemas of the hashed-lookup family. Kernels: cpu/, cuda/ (C++) and gtkernels/triton/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(gtkernels, m) {
  // x: float [..., K * tau] -> int32 [..., K]; bit i of chunk k (first element = top bit)
  // is [x[..., k * tau + i] >= 0].
  m.def("sign_hash(Tensor x, int tau) -> Tensor");
  // x [T, K * tau] -> (rows int32 [T, K] = k * 2**tau + sign_hash code of chunk k,
  // weights [T, K] float32 (float64 for a float64 x)); weighting: softmax | l1_softmax | none.
  m.def("hash_weights(Tensor x, int tau, str weighting, float temperature) -> (Tensor, Tensor)");
  // d weights [T, K] -> d x [T, K * tau] (x's dtype): through the weights, the codes held fixed.
  m.def("hash_weights_backward(Tensor grad_weights, Tensor x, int tau, str weighting, "
        "float temperature) -> Tensor");
  // x [T, K * tau], tables [M, K, 2**tau, d], bias [M, d] -> y [M, T, d]:
  // y[m, t] = sum_k w[t, k] * tables[m, k, h[t, k]] (+ bias[m]), one fused pass.
  m.def("hashed_lookup(Tensor x, Tensor tables, Tensor? bias, int tau, str weighting, "
        "float temperature) -> Tensor");
  // table [M, R, d], idx [T, B] int32/int64, weights [T, B] -> y [M, T, d]:
  // y[m, t] = sum_b weights[t, b] * table[m, idx[t, b]].
  m.def("weighted_gather_sum(Tensor table, Tensor idx, Tensor? weights) -> Tensor");
  // grad [M, T, d] -> (grad_table [M, R, d], grad_weights [T, B], or [0] when not weights_grad).
  // Deterministic: entries sorted by row (stable), each row summed in token order.
  m.def("weighted_gather_sum_backward(Tensor grad, Tensor table, Tensor idx, Tensor? weights, "
        "bool weights_grad) -> (Tensor, Tensor)");
}
