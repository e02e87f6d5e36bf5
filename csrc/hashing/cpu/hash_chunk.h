// Code and weight of one chunk of tau inputs, shared by the hashed-lookup CPU kernels.
// The formulas are DESIGN.md's; gtkernels/triton/hashing.py and the reference follow the same
// order of operations.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"

namespace gtk {

enum class Weighting : int { kSoftmax = 0, kL1Softmax = 1, kNone = 2 };

inline Weighting parse_weighting(c10::string_view name) {
  if (name == "softmax") return Weighting::kSoftmax;
  if (name == "l1_softmax") return Weighting::kL1Softmax;
  if (name == "none") return Weighting::kNone;
  GTK_CHECK(false, "weighting must be 'softmax', 'l1_softmax' or 'none', got '%.*s'",
            static_cast<int>(name.size()), name.data());
}

// sigmoid(z) for z >= 0 (the argument is 2|x|/T): no overflow.
template <typename acc_t>
inline acc_t sigmoid_nonneg(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

// Bucket (first element = top bit, bit = [x >= 0]) and weight of one chunk:
// softmax: prod_i sigmoid(2|x_i| / T); l1_softmax: sum_i |x_i| times that; none: 1.
template <typename scalar_t, typename acc_t>
inline acc_t chunk_code_weight(const scalar_t* chunk, int64_t tau, Weighting weighting,
                               acc_t two_over_t, int32_t* code) {
  int32_t bits = 0;
  acc_t prod = 1, l1 = 0;
  for (int64_t i = 0; i < tau; ++i) {
    const acc_t v = static_cast<acc_t>(chunk[i]);
    const bool up = v >= acc_t(0);
    bits = (bits << 1) | static_cast<int32_t>(up);
    const acc_t a = up ? v : -v;
    prod *= sigmoid_nonneg(two_over_t * a);
    l1 += a;
  }
  *code = bits;
  switch (weighting) {
    case Weighting::kSoftmax: return prod;
    case Weighting::kL1Softmax: return l1 * prod;
    default: return acc_t(1);
  }
}

// d weight / d x_i of one chunk, written to dx (scaled by grad_weight). |x_i| is taken as
// b_i * x_i with b_i = +1 if x_i >= 0 else -1, the code's own sign: at x_i = 0 the derivative
// of |x_i| is +1, that of the explicit softmax over codes at the selected code.
template <typename scalar_t, typename acc_t>
inline void chunk_weight_backward(const scalar_t* chunk, int64_t tau, Weighting weighting,
                                  acc_t two_over_t, acc_t grad_weight, scalar_t* dx) {
  if (weighting == Weighting::kNone) {
    for (int64_t i = 0; i < tau; ++i) dx[i] = scalar_t(0);
    return;
  }
  constexpr int kMaxTau = 12;  // the ops check tau <= 12 before calling this
  acc_t sign[kMaxTau], one_minus_sig[kMaxTau];
  acc_t prod = 1, l1 = 0;
  for (int64_t i = 0; i < tau; ++i) {
    const acc_t v = static_cast<acc_t>(chunk[i]);
    sign[i] = v >= acc_t(0) ? acc_t(1) : acc_t(-1);
    const acc_t e = std::exp(-two_over_t * sign[i] * v);
    prod *= acc_t(1) / (acc_t(1) + e);
    one_minus_sig[i] = e / (acc_t(1) + e);  // exact where the sigmoid rounds to 1
    l1 += sign[i] * v;
  }
  for (int64_t i = 0; i < tau; ++i) {
    // d prod / d x_i = prod * (1 - sigma_i) * 2 b_i / T
    const acc_t dprod = prod * one_minus_sig[i] * two_over_t * sign[i];
    const acc_t dw = weighting == Weighting::kSoftmax ? dprod : sign[i] * prod + l1 * dprod;
    dx[i] = static_cast<scalar_t>(grad_weight * dw);
  }
}

}  // namespace gtk
