// Fused fp32 scores + candidate scan for x86 CPUs with AVX2/FMA: a 6-row x 16-code register
// tile (12 accumulators) over D, then one vector compare per row against its threshold; the
// scores never reach memory. Codes are packed in panels of 16 ([panel][D][16]) once per call.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "codebook/cpu/row_state.h"

namespace gtk::codebook {

constexpr int64_t kTileRows = 6;
constexpr int64_t kPanel = 16;

inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// [K, D] fp32 rows -> [ceil(K / 16)][D][16], codes past K zero.
inline std::vector<float> pack_code_panels(const float* codes, int64_t num_codes, int64_t dim) {
  const int64_t panels = (num_codes + kPanel - 1) / kPanel;
  std::vector<float> packed(panels * dim * kPanel, 0.f);
  for (int64_t j = 0; j < num_codes; ++j) {
    for (int64_t d = 0; d < dim; ++d) packed[((j / kPanel) * dim + d) * kPanel + j % kPanel] = codes[j * dim + d];
  }
  return packed;
}

// Scores of `rows` (<= 6) rows of x (row stride dim, zero-padded to 6 rows) against panels
// [panel0, panel1) of packed codes; codes under a row's threshold go to its RowState.
// norm_term is padded to whole panels.
template <Metric M>
__attribute__((target("avx2,fma"))) void fused_scan_tile(
    const float* x, int64_t rows, const float* packed, const float* norm_term, int64_t dim,
    int64_t panel0, int64_t panel1, int64_t num_codes, RowState* const* states) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  double thr[kTileRows];
  __m256 thr_up[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) {
    thr[r] = r < rows ? states[r]->threshold() : -kInf;
    thr_up[r] = _mm256_set1_ps(std::nextafter(static_cast<float>(thr[r]), kInf));
  }
  const __m256 minus_two = _mm256_set1_ps(-2.f);
  for (int64_t p = panel0; p < panel1; ++p) {
    const float* panel = packed + p * dim * kPanel;
    // Twelve named accumulators: they stay in ymm registers.
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
           a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const float *x0 = x, *x1 = x + dim, *x2 = x + 2 * dim, *x3 = x + 3 * dim, *x4 = x + 4 * dim,
                *x5 = x + 5 * dim;
    for (int64_t d = 0; d < dim; ++d) {
      const __m256 b0 = _mm256_loadu_ps(panel + d * kPanel);
      const __m256 b1 = _mm256_loadu_ps(panel + d * kPanel + 8);
      __m256 a = _mm256_broadcast_ss(x0 + d);
      a00 = _mm256_fmadd_ps(a, b0, a00); a01 = _mm256_fmadd_ps(a, b1, a01);
      a = _mm256_broadcast_ss(x1 + d);
      a10 = _mm256_fmadd_ps(a, b0, a10); a11 = _mm256_fmadd_ps(a, b1, a11);
      a = _mm256_broadcast_ss(x2 + d);
      a20 = _mm256_fmadd_ps(a, b0, a20); a21 = _mm256_fmadd_ps(a, b1, a21);
      a = _mm256_broadcast_ss(x3 + d);
      a30 = _mm256_fmadd_ps(a, b0, a30); a31 = _mm256_fmadd_ps(a, b1, a31);
      a = _mm256_broadcast_ss(x4 + d);
      a40 = _mm256_fmadd_ps(a, b0, a40); a41 = _mm256_fmadd_ps(a, b1, a41);
      a = _mm256_broadcast_ss(x5 + d);
      a50 = _mm256_fmadd_ps(a, b0, a50); a51 = _mm256_fmadd_ps(a, b1, a51);
    }
    const __m256 acc[kTileRows][2] = {{a00, a01}, {a10, a11}, {a20, a21},
                                      {a30, a31}, {a40, a41}, {a50, a51}};
    const int64_t code0 = p * kPanel;
    const int valid = num_codes - code0 >= kPanel ? 0xffff : (1 << (num_codes - code0)) - 1;
    const __m256 n0 = _mm256_loadu_ps(norm_term + code0), n1 = _mm256_loadu_ps(norm_term + code0 + 8);
    for (int64_t r = 0; r < rows; ++r) {
      __m256 s0, s1;
      if constexpr (M == Metric::kL2) {
        s0 = _mm256_fmadd_ps(minus_two, acc[r][0], n0);
        s1 = _mm256_fmadd_ps(minus_two, acc[r][1], n1);
      } else if constexpr (M == Metric::kIp) {
        s0 = _mm256_sub_ps(_mm256_setzero_ps(), acc[r][0]);
        s1 = _mm256_sub_ps(_mm256_setzero_ps(), acc[r][1]);
      } else {
        s0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), acc[r][0]), n0);
        s1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), acc[r][1]), n1);
      }
      int mask = _mm256_movemask_ps(_mm256_cmp_ps(s0, thr_up[r], _CMP_LE_OQ)) |
                 (_mm256_movemask_ps(_mm256_cmp_ps(s1, thr_up[r], _CMP_LE_OQ)) << 8);
      mask &= valid;
      if (mask == 0) continue;
      alignas(32) float lane[kPanel];
      _mm256_store_ps(lane, s0);
      _mm256_store_ps(lane + 8, s1);
      while (mask) {
        const int b = __builtin_ctz(mask);
        mask &= mask - 1;
        if (lane[b] <= thr[r]) states[r]->add(lane[b], code0 + b, thr[r]);
      }
      thr_up[r] = _mm256_set1_ps(std::nextafter(static_cast<float>(thr[r]), kInf));
    }
  }
}

}  // namespace gtk::codebook
