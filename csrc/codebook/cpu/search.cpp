// Exact codebook search on the CPU: an fp32 pass (BLAS blocks of rows x codes) keeps, per row,
// every code whose approximate score is within twice a proven error bound of the k-th best;
// those candidates are then ranked by their float64 distance. No fallback is needed: the
// candidate list of a row grows as the data demands.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "codebook/cpu/metric.h"
#include "codebook/cpu/score_bound.h"
#include "common/checks.h"

namespace gtk::codebook {
namespace {

// A chunk's fp32 scores (64 x 1024 floats) stay in a core's L2 between the GEMM and the scan.
constexpr int64_t kRowChunk = 64;
constexpr int64_t kCodeChunk = 1024;

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

template <Metric M>
void scan_row_scalar(const float* dots, const float* norm_term, int64_t codes, int64_t code0,
                     RowState& st) {
  double thr = st.threshold();
  for (int64_t j = 0; j < codes; ++j) {
    const float s = approx_score<M>(dots[j], M == Metric::kIp ? 0.f : norm_term[j]);
    if (s <= thr) st.add(s, code0 + j, thr);
  }
}

// The same scan, 8 codes at a time: one vector compare against the (rounded up) threshold;
// the rare codes under it go through RowState::add.
template <Metric M>
__attribute__((target("avx2,fma"))) void scan_row_avx2(const float* dots, const float* norm_term,
                                                      int64_t codes, int64_t code0, RowState& st) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  double thr = st.threshold();
  __m256 thr_up = _mm256_set1_ps(std::nextafter(static_cast<float>(thr), kInf));
  const __m256 minus_two = _mm256_set1_ps(-2.f);
  int64_t j = 0;
  for (; j + 8 <= codes; j += 8) {
    const __m256 dot = _mm256_loadu_ps(dots + j);
    __m256 s;
    if constexpr (M == Metric::kL2) s = _mm256_fmadd_ps(minus_two, dot, _mm256_loadu_ps(norm_term + j));
    if constexpr (M == Metric::kIp) s = _mm256_sub_ps(_mm256_setzero_ps(), dot);
    if constexpr (M == Metric::kCosine) s = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), dot), _mm256_loadu_ps(norm_term + j));
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(s, thr_up, _CMP_LE_OQ));
    if (mask == 0) continue;
    alignas(32) float lane[8];
    _mm256_store_ps(lane, s);
    while (mask) {
      const int b = __builtin_ctz(mask);
      mask &= mask - 1;
      if (lane[b] <= thr) st.add(lane[b], code0 + j + b, thr);
    }
    thr_up = _mm256_set1_ps(std::nextafter(static_cast<float>(thr), kInf));
  }
  scan_row_scalar<M>(dots + j, norm_term + j, codes - j, code0 + j, st);
}

template <Metric M>
void scan_block(const float* scores, int64_t rows, int64_t codes, int64_t code0,
                const float* norm_term, RowState* states) {
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  for (int64_t r = 0; r < rows; ++r) {
    if (has_avx2) {
      scan_row_avx2<M>(scores + r * codes, norm_term + code0, codes, code0, states[r]);
    } else {
      scan_row_scalar<M>(scores + r * codes, norm_term + code0, codes, code0, states[r]);
    }
  }
}

template <typename scalar_t>
void rerank_rows(RowState* states, int64_t rows, int64_t row0, const scalar_t* x,
                 const scalar_t* codes, int64_t num_groups, int64_t group, int64_t dim,
                 int64_t num_codes, int64_t k, Metric metric, at::opmath_type<scalar_t>* dist,
                 int64_t* idx) {
  std::vector<std::pair<double, int64_t>> exact;
  for (int64_t r = 0; r < rows; ++r) {
      RowState& st = states[r];
      const double thr = st.threshold();
      const int64_t n = row0 + r;
      const scalar_t* xrow = x + (n * num_groups + group) * dim;
      const scalar_t* cgroup = codes + group * num_codes * dim;
      exact.clear();
      for (const auto& [s, j] : st.candidates) {
        if (s <= thr) exact.emplace_back(exact_distance(xrow, cgroup + j * dim, dim, 1, 1, metric), j);
      }
      // Fewer than k candidates only happens with NaN scores (NaN inputs): pad with NaN.
      const int64_t found = std::min<int64_t>(k, exact.size());
      std::partial_sort(exact.begin(), exact.begin() + found, exact.end());
      exact.resize(k, {std::numeric_limits<double>::quiet_NaN(), 0});
      const int64_t out = (n * num_groups + group) * k;
      for (int64_t t = 0; t < k; ++t) {
        dist[out + t] = static_cast<at::opmath_type<scalar_t>>(exact[t].first);
        idx[out + t] = exact[t].second;
      }
      st = RowState();  // free the candidate list early
  }
}

template <typename scalar_t>
void search_group(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& norms,
                  int64_t group, int64_t k, Metric metric, at::opmath_type<scalar_t>* dist,
                  int64_t* idx) {
  const int64_t num_rows = x.size(0), num_groups = x.size(1), dim = x.size(2);
  const int64_t num_codes = codebook.size(1);
  const at::Tensor x32 = x.select(1, group).to(at::kFloat).contiguous();
  const at::Tensor c32 = codebook.select(0, group).to(at::kFloat).contiguous();
  const at::Tensor group_norms = norms.select(0, group).contiguous();
  const at::Tensor norm_term = metric == Metric::kCosine
      ? group_norms.sqrt().clamp_min(kCosineEps).reciprocal() : group_norms;
  const ScoreBound bound(metric, dim, x.scalar_type() == at::kDouble,
                         group_norms.max().item<double>());
  const at::Tensor x_norms = x.select(1, group).to(at::kDouble).norm(2, 1).contiguous();
  const double* xn = x_norms.data_ptr<double>();
  const float* nt = norm_term.data_ptr<float>();
  // One parallel region over row chunks; BLAS runs single-threaded inside it.
  const int64_t num_chunks = (num_rows + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::Tensor scores = at::empty({kRowChunk * kCodeChunk}, x32.options());
    std::vector<RowState> states(kRowChunk);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t row0 = chunk * kRowChunk;
      const int64_t rows = std::min(kRowChunk, num_rows - row0);
      for (int64_t r = 0; r < rows; ++r) {
        states[r].best.assign(k, std::numeric_limits<float>::infinity());
        states[r].compact_at = static_cast<size_t>(std::max<int64_t>(256, 8 * k));
        states[r].eps2 = 2.0 * bound.eps(xn[row0 + r]);
      }
      const at::Tensor xb = x32.narrow(0, row0, rows);
      for (int64_t code0 = 0; code0 < num_codes; code0 += kCodeChunk) {
        const int64_t codes = std::min(kCodeChunk, num_codes - code0);
        at::Tensor s = scores.narrow(0, 0, rows * codes).view({rows, codes});
        at::mm_out(s, xb, c32.narrow(0, code0, codes).t());
        const float* sp = s.data_ptr<float>();
        switch (metric) {
          case Metric::kL2: scan_block<Metric::kL2>(sp, rows, codes, code0, nt, states.data()); break;
          case Metric::kIp: scan_block<Metric::kIp>(sp, rows, codes, code0, nt, states.data()); break;
          case Metric::kCosine: scan_block<Metric::kCosine>(sp, rows, codes, code0, nt, states.data()); break;
        }
      }
      rerank_rows<scalar_t>(states.data(), rows, row0, x.data_ptr<scalar_t>(),
                            codebook.data_ptr<scalar_t>(), num_groups, group, dim, num_codes, k,
                            metric, dist, idx);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> codebook_search_cpu(const at::Tensor& x_in,
                                                       const at::Tensor& codebook_in, int64_t k,
                                                       c10::string_view metric_name,
                                                       const std::optional<at::Tensor>& norms_in) {
  // Plain tensor math below the autograd layer (the op's autograd is registered in Python).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  GTK_CHECK_DIM(x_in, 3);
  GTK_CHECK_DIM(codebook_in, 3);
  GTK_CHECK_FLOATING(x_in);
  TORCH_CHECK(x_in.scalar_type() == codebook_in.scalar_type(), "x and codebook dtypes differ");
  TORCH_CHECK(x_in.size(1) == codebook_in.size(0) && x_in.size(2) == codebook_in.size(2),
              "x [N, G, D] and codebook [G, K, D] disagree");
  TORCH_CHECK(k >= 1 && k <= codebook_in.size(1), "k must be in [1, K]");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const int64_t num_rows = x.size(0), num_groups = x.size(1);
  at::Tensor dist = at::empty({num_rows, num_groups, k},
                              x.options().dtype(at::toOpMathType(x.scalar_type())));
  at::Tensor idx = at::empty({num_rows, num_groups, k}, x.options().dtype(at::kLong));
  if (num_rows == 0) return {dist, idx};
  const at::Tensor norms = norms_in.has_value()
      ? norms_in->to(at::kFloat).contiguous()
      : codebook.to(at::kDouble).pow(2).sum(-1).to(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "codebook_search_cpu", [&] {
    for (int64_t g = 0; g < num_groups; ++g) {
      search_group<scalar_t>(x, codebook, norms, g, k, metric,
                             dist.data_ptr<at::opmath_type<scalar_t>>(),
                             idx.data_ptr<int64_t>());
    }
  });
  return {dist, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) { m.impl("codebook_search", &codebook_search_cpu); }

}  // namespace gtk::codebook
