// Per-row candidate state of the CPU codebook search, shared by its scan loops.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "codebook/cpu/metric.h"

namespace gtk::codebook {

struct RowState {
  std::vector<float> best;  // the k smallest approximate scores so far, ascending
  std::vector<std::pair<float, int64_t>> candidates;
  size_t compact_at = 0;
  double eps2 = 0.0;  // twice the bound on |approximate score - exact score|

  double threshold() const { return static_cast<double>(best.back()) + eps2; }

  void add(float s, int64_t j, double& thr) {
    candidates.emplace_back(s, j);
    if (s < best.back()) {
      auto pos = std::upper_bound(best.begin(), best.end(), s);
      best.insert(pos, s);
      best.pop_back();
      thr = threshold();
    }
    if (candidates.size() >= compact_at) {
      auto keep_end = std::remove_if(candidates.begin(), candidates.end(),
                                     [thr](const auto& c) { return c.first > thr; });
      candidates.erase(keep_end, candidates.end());
      compact_at = std::max(compact_at, 2 * candidates.size());
    }
  }
};

// Approximate score of code j from its fp32 dot product with the row (smaller is better).
template <Metric M>
inline float approx_score(float dot, float norm_term) {
  if constexpr (M == Metric::kL2) return norm_term - 2.f * dot;
  if constexpr (M == Metric::kIp) return -dot;
  return -dot * norm_term;
}

}  // namespace gtk::codebook
