// Rigorous bound on |approximate score - exact score| of the fp32 first pass of codebook search.
//
// Scores (smaller is better): l2 ||c||^2 - 2<x, c>, ip -<x, c>, cosine -<x, c> / ||c||.
// A dot product of length D summed in fp32 in any order (FMA or not, blocked or not) errs by
// at most gamma_D * sum_i |x_i c_i| <= gamma_D ||x|| ||c|| (Cauchy-Schwarz), gamma_D ~ D * u.
// Inputs rounded to fp32 first (float64 inputs) add 2u per product. The bound below takes
// twice these terms plus the final roundings, and C = max_j ||c_j||, so one eps per row.
#pragma once

#include <cmath>

#include "codebook/cpu/metric.h"

namespace gtk::codebook {

struct ScoreBound {
  static constexpr double kUnit = 0x1p-24;  // fp32 unit roundoff
  static constexpr double kSafety = 2.0;
  double dot_rel, norm_rel, code_norm_max;
  Metric metric;

  ScoreBound(Metric m, int64_t dim, bool inputs_rounded, double max_sq_norm) : metric(m) {
    const double input_rel = inputs_rounded ? 2 * kUnit : 0.0;
    dot_rel = input_rel + 2.0 * (dim + 8) * kUnit;
    norm_rel = input_rel + 2.0 * (dim + 8) * kUnit;
    code_norm_max = std::sqrt(max_sq_norm * (1.0 + norm_rel)) * (1.0 + kUnit);
  }

  // Bound for a row of Euclidean norm x_norm.
  double eps(double x_norm) const {
    const double xc = x_norm * code_norm_max;
    double e = 0.0;
    switch (metric) {
      case Metric::kL2: e = (2 * dot_rel + 4 * kUnit) * xc + (norm_rel + 2 * kUnit) * code_norm_max * code_norm_max; break;
      case Metric::kIp: e = (dot_rel + 2 * kUnit) * xc; break;
      case Metric::kCosine: e = (dot_rel + norm_rel + 6 * kUnit) * x_norm; break;
    }
    return kSafety * e + 1e-30;
  }
};

}  // namespace gtk::codebook
