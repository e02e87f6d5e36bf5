#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"

namespace gtk {
namespace {

template <typename scalar_t>
void sign_hash_rows(const scalar_t* x, int32_t* codes, int64_t num_codes, int64_t tau) {
  at::parallel_for(0, num_codes, cpu_grain(tau), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const scalar_t* chunk = x + c * tau;
      int32_t code = 0;
      for (int64_t i = 0; i < tau; ++i) {
        code = (code << 1) | static_cast<int32_t>(static_cast<float>(chunk[i]) >= 0.f);
      }
      codes[c] = code;
    }
  });
}

at::Tensor sign_hash_cpu(const at::Tensor& x_in, int64_t tau) {
  GTK_CHECK_FLOATING(x_in);
  GTK_CHECK(tau >= 1 && tau <= 30, "tau must be in [1, 30], got %lld", static_cast<long long>(tau));
  GTK_CHECK(x_in.dim() >= 1 && x_in.size(-1) % tau == 0,
            "x's last dim must be divisible by tau");
  const at::Tensor x = x_in.contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() /= tau;
  at::Tensor codes = at::empty(out_shape, x.options().dtype(at::kInt));
  if (codes.numel() == 0) return codes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sign_hash_cpu", [&] {
    sign_hash_rows<scalar_t>(x.data_ptr<scalar_t>(), codes.data_ptr<int32_t>(), codes.numel(),
                             tau);
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) { m.impl("sign_hash", &sign_hash_cpu); }

}  // namespace gtk
