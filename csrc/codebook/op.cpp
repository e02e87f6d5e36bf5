// Schemas of the codebook family. Kernels: cpu/ (C++) and gtkernels/triton/codebook*.py.
// metric is "l2" (squared Euclidean), "ip" (dist = -<x, c>) or "cosine" (1 - cosine).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(gtkernels, m) {
  // x: [N, G, D], codebook: [G, K, D], codebook_norms: float32 [G, K] (||c||^2) or None.
  // -> dist float32 (float64 for float64 inputs) [N, G, k] ascending, idx int64 [N, G, k];
  // exact (float64) ranking, ties to the lowest index.
  m.def(
      "codebook_search(Tensor x, Tensor codebook, int k, str metric, Tensor? codebook_norms)"
      " -> (Tensor, Tensor)");
  // Gradient of dist through the chosen codes: -> (grad_x [N, G, D], grad_codebook [G, K, D]).
  m.def(
      "codebook_search_backward(Tensor grad_dist, Tensor x, Tensor codebook, Tensor idx,"
      " str metric) -> (Tensor, Tensor)");
  // student, teacher: [N, D], codebook: [K, D]; metric "l2" or "ip" (cosine is "ip" on
  // normalised inputs, done by the Python layer).
  // -> (row_kl [N], row_stats [N, 3], float32 or float64 = (lse_teacher, lse_student,
  //     E_teacher[a - b]) where a, b are the teacher's and student's logits -d / temperature).
  m.def(
      "code_distill_loss(Tensor student, Tensor teacher, Tensor codebook, float temperature,"
      " str metric) -> (Tensor, Tensor)");
  // -> (grad_student [N, D], grad_teacher [N, D], grad_codebook [K, D]) for upstream
  // grad_row_kl [N]; output_mask (student, teacher, codebook) says which are computed: an
  // unrequested gradient is returned as an empty tensor of shape [0].
  m.def(
      "code_distill_loss_backward(Tensor grad_row_kl, Tensor student, Tensor teacher,"
      " Tensor codebook, Tensor row_stats, float temperature, str metric, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
}
