// Schemas of the hashed-lookup family. Kernels: cpu/, cuda/ (C++) and gtkernels/triton/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(gtkernels, m) {
  // x: float [..., K * tau] -> int32 [..., K]; bit i of chunk k (first element = top bit)
  // is [x[..., k * tau + i] >= 0].
  m.def("sign_hash(Tensor x, int tau) -> Tensor");
}
