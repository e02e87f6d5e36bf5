// Exact codebook search on the CPU: an fp32 pass keeps, per row, every code whose approximate
// score is within twice a proven error bound of the k-th best; those candidates are then ranked
// by their float64 distance. No fallback is needed: a row's candidate list grows as the data
// demands. The fp32 pass is the fused AVX2 tile kernel (fused_scan_avx2.h) on CPUs that have
// it, else BLAS blocks of rows x codes followed by a scan.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "codebook/cpu/fused_scan_avx2.h"
#include "codebook/cpu/metric.h"
#include "codebook/cpu/row_state.h"
#include "codebook/cpu/score_bound.h"
#include "common/checks.h"

namespace gtk::codebook {
namespace {

// Rows per parallel task; BLAS path: a chunk's scores (128 x 2048 floats) stay in cache.
constexpr int64_t kRowChunk = 64;
constexpr int64_t kCodeChunk = 2048;

template <Metric M>
void scan_row_scalar(const float* dots, const float* norm_term, int64_t codes, int64_t code0,
                     RowState& st) {
  double thr = st.threshold();
  for (int64_t j = 0; j < codes; ++j) {
    const float s = approx_score<M>(dots[j], M == Metric::kIp ? 0.f : norm_term[j]);
    if (s <= thr) st.add(s, code0 + j, thr);
  }
}

template <Metric M>
void scan_block(const float* scores, int64_t rows, int64_t codes, int64_t code0,
                const float* norm_term, RowState* states) {
  for (int64_t r = 0; r < rows; ++r) {
    scan_row_scalar<M>(scores + r * codes, norm_term + code0, codes, code0, states[r]);
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
  const bool fused = cpu_has_avx2_fma();
  const int64_t num_panels = (num_codes + kPanel - 1) / kPanel;
  // Fused path: codes packed in panels; a chunk of panels (~256 KiB) stays in L2 while every
  // row tile of the row chunk passes over it.
  std::vector<float> packed, nt_padded;
  if (fused) {
    packed = pack_code_panels(c32.data_ptr<float>(), num_codes, dim);
    nt_padded.assign(num_panels * kPanel, 0.f);
    std::copy(nt, nt + num_codes, nt_padded.begin());
  }
  const int64_t panels_per_chunk = std::max<int64_t>(1, (256 << 10) / (dim * kPanel * 4));
  const float* xp = x32.data_ptr<float>();
  // One parallel region; each worker takes row chunks from a shared counter (balanced even
  // when a core is busy elsewhere). BLAS (other CPUs) runs single-threaded inside it.
  const int64_t num_chunks = (num_rows + kRowChunk - 1) / kRowChunk;
  std::atomic<int64_t> next_chunk{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_chunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::Tensor scores = fused ? at::Tensor() : at::empty({kRowChunk * kCodeChunk}, x32.options());
    std::vector<RowState> states(kRowChunk);
    std::vector<RowState*> state_ptrs(kRowChunk);
    for (int64_t r = 0; r < kRowChunk; ++r) state_ptrs[r] = &states[r];
    std::vector<float> x_tail(kTileRows * dim);
    for (int64_t chunk = next_chunk++; chunk < num_chunks; chunk = next_chunk++) {
      const int64_t row0 = chunk * kRowChunk;
      const int64_t rows = std::min(kRowChunk, num_rows - row0);
      for (int64_t r = 0; r < rows; ++r) {
        states[r].best.assign(k, std::numeric_limits<float>::infinity());
        states[r].compact_at = static_cast<size_t>(std::max<int64_t>(256, 8 * k));
        states[r].eps2 = 2.0 * bound.eps(xn[row0 + r]);
      }
      if (fused) {
        for (int64_t p0 = 0; p0 < num_panels; p0 += panels_per_chunk) {
          const int64_t p1 = std::min(num_panels, p0 + panels_per_chunk);
          for (int64_t r = 0; r < rows; r += kTileRows) {
            const int64_t tile_rows = std::min(kTileRows, rows - r);
            const float* xt = xp + (row0 + r) * dim;
            if (tile_rows < kTileRows) {  // zero-pad the last tile (its extra rows are ignored)
              std::fill(x_tail.begin(), x_tail.end(), 0.f);
              std::copy(xt, xt + tile_rows * dim, x_tail.begin());
              xt = x_tail.data();
            }
            RowState* const* st = state_ptrs.data() + r;
            switch (metric) {
              case Metric::kL2: fused_scan_tile<Metric::kL2>(xt, tile_rows, packed.data(), nt_padded.data(), dim, p0, p1, num_codes, st); break;
              case Metric::kIp: fused_scan_tile<Metric::kIp>(xt, tile_rows, packed.data(), nt_padded.data(), dim, p0, p1, num_codes, st); break;
              case Metric::kCosine: fused_scan_tile<Metric::kCosine>(xt, tile_rows, packed.data(), nt_padded.data(), dim, p0, p1, num_codes, st); break;
            }
          }
        }
      } else {
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
  GTK_CHECK(x_in.scalar_type() == codebook_in.scalar_type(), "x and codebook dtypes differ");
  GTK_CHECK(x_in.size(1) == codebook_in.size(0) && x_in.size(2) == codebook_in.size(2),
            "x [N, G, D] and codebook [G, K, D] disagree");
  GTK_CHECK(k >= 1 && k <= codebook_in.size(1), "k must be in [1, K]");
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
