// Metric parsing and the exact (float64) distances shared by the codebook CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string_view>

#include "common/checks.h"

namespace gtk::codebook {

enum class Metric { kL2, kIp, kCosine };

inline Metric parse_metric(std::string_view name) {
  if (name == "l2") return Metric::kL2;
  if (name == "ip") return Metric::kIp;
  if (name == "cosine") return Metric::kCosine;
  GTK_CHECK(false, "metric must be \"l2\", \"ip\" or \"cosine\", got \"%.*s\"",
            static_cast<int>(name.size()), name.data());
}

// Norms below this are clamped in the cosine metric (torch.cosine_similarity's convention).
constexpr double kCosineEps = 1e-8;

// Exact distance in float64 between x (length d, row stride 1) and code c, for metric m.
// l2 sums (x_i - c_i)^2 (no cancellation); cosine is 1 - <x, c> / (max|x|, eps)(max|c|, eps).
template <typename scalar_t>
double exact_distance(const scalar_t* x, const scalar_t* c, int64_t d, int64_t x_stride,
                      int64_t c_stride, Metric m) {
  double acc = 0.0, xx = 0.0, cc = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    const double xi = static_cast<double>(x[i * x_stride]);
    const double ci = static_cast<double>(c[i * c_stride]);
    if (m == Metric::kL2) {
      acc += (xi - ci) * (xi - ci);
    } else {
      acc += xi * ci;
      xx += xi * xi;
      cc += ci * ci;
    }
  }
  if (m == Metric::kL2) return acc;
  if (m == Metric::kIp) return -acc;
  return 1.0 - acc / (std::max(std::sqrt(xx), kCosineEps) * std::max(std::sqrt(cc), kCosineEps));
}

}  // namespace gtk::codebook
