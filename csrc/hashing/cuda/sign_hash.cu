#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace gtk {
namespace {

// One thread per code: reads its tau contiguous values (tau is small, so a warp's reads
// cover a few contiguous cache lines).
template <typename scalar_t>
__global__ void sign_hash_kernel(const scalar_t* __restrict__ x, int32_t* __restrict__ codes,
                                 int64_t num_codes, int tau) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= num_codes) return;
  const scalar_t* chunk = x + c * tau;
  int32_t code = 0;
  for (int i = 0; i < tau; ++i) {
    code = (code << 1) | static_cast<int32_t>(static_cast<float>(chunk[i]) >= 0.f);
  }
  codes[c] = code;
}

at::Tensor sign_hash_cuda(const at::Tensor& x_in, int64_t tau) {
  GTK_CHECK_FLOATING(x_in);
  GTK_CHECK(tau >= 1 && tau <= 30, "tau must be in [1, 30], got %lld", static_cast<long long>(tau));
  GTK_CHECK(x_in.dim() >= 1 && x_in.size(-1) % tau == 0,
            "x's last dim must be divisible by tau");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() /= tau;
  at::Tensor codes = at::empty(out_shape, x.options().dtype(at::kInt));
  const int64_t n = codes.numel();
  if (n == 0) return codes;
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_hash_cuda", [&] {
    sign_hash_kernel<scalar_t><<<blocks_for(n, kThreads), kThreads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), codes.data_ptr<int32_t>(), n, static_cast<int>(tau));
    GTK_LAUNCH_CHECK();
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CUDA, m) { m.impl("sign_hash", &sign_hash_cuda); }

}  // namespace gtk
