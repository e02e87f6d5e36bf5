// Launch helpers shared by the CUDA kernels: current stream, grid sizes, launch checks.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace gtk {

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

inline unsigned int blocks_for(int64_t n, int threads) {
  return static_cast<unsigned int>((n + threads - 1) / threads);
}

}  // namespace gtk

#define GTK_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
