// Gradient of codebook_search's dist through the chosen codes. grad_codebook is reduced per
// code over its (row, rank) pairs in row order (counting sort first): deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "codebook/cpu/metric.h"
#include "common/checks.h"

namespace gtk::codebook {
namespace {

// d(dist)/dx = ax * x + bx * c and d(dist)/dc = ac * c + bc * x, times the upstream gradient g.
template <typename acc_t>
struct PairCoefficients {
  acc_t ax, bx, ac, bc;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
PairCoefficients<acc_t> pair_coefficients(const scalar_t* x, const scalar_t* c, int64_t dim,
                                          acc_t g, Metric metric) {
  if (metric == Metric::kL2) return {2 * g, -2 * g, 2 * g, -2 * g};
  if (metric == Metric::kIp) return {0, -g, 0, -g};
  acc_t xc = 0, xx = 0, cc = 0;
  for (int64_t i = 0; i < dim; ++i) {
    const acc_t xi = static_cast<acc_t>(x[i]), ci = static_cast<acc_t>(c[i]);
    xc += xi * ci;
    xx += xi * xi;
    cc += ci * ci;
  }
  const acc_t xn = std::sqrt(xx), cn = std::sqrt(cc);
  const acc_t nx = std::max<acc_t>(xn, kCosineEps), nc = std::max<acc_t>(cn, kCosineEps);
  const acc_t cosine = xc / (nx * nc);
  return {xn > kCosineEps ? g * cosine / (nx * nx) : acc_t(0), -g / (nx * nc),
          cn > kCosineEps ? g * cosine / (nc * nc) : acc_t(0), -g / (nx * nc)};
}

template <typename scalar_t>
void search_backward(const at::opmath_type<scalar_t>* grad, const scalar_t* x, const scalar_t* codes,
                     const int64_t* idx, int64_t num_rows, int64_t num_groups, int64_t num_codes,
                     int64_t dim, int64_t k, Metric metric, scalar_t* grad_x,
                     scalar_t* grad_codes) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, num_rows * num_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t group = row % num_groups;
      const scalar_t* xr = x + row * dim;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < k; ++t) {
        const scalar_t* c = codes + (group * num_codes + idx[row * k + t]) * dim;
        const auto co = pair_coefficients(xr, c, dim, grad[row * k + t], metric);
        for (int64_t i = 0; i < dim; ++i) acc[i] += co.ax * static_cast<acc_t>(xr[i]) + co.bx * static_cast<acc_t>(c[i]);
      }
      for (int64_t i = 0; i < dim; ++i) grad_x[row * dim + i] = static_cast<scalar_t>(acc[i]);
    }
  });

  // Counting sort of the pairs by (group, code), pairs of one code kept in row order.
  const int64_t num_pairs = num_rows * num_groups * k;
  std::vector<int64_t> start(num_groups * num_codes + 1, 0), order(num_pairs);
  for (int64_t p = 0; p < num_pairs; ++p) {
    start[((p / k) % num_groups) * num_codes + idx[p] + 1]++;
  }
  for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < num_pairs; ++p) {
    order[fill[((p / k) % num_groups) * num_codes + idx[p]]++] = p;
  }
  at::parallel_for(0, num_groups * num_codes, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t code = begin; code < end; ++code) {
      const scalar_t* c = codes + code * dim;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t q = start[code]; q < start[code + 1]; ++q) {
        const int64_t p = order[q];
        const scalar_t* xr = x + (p / k) * dim;
        const auto co = pair_coefficients(xr, c, dim, grad[p], metric);
        for (int64_t i = 0; i < dim; ++i) acc[i] += co.ac * static_cast<acc_t>(c[i]) + co.bc * static_cast<acc_t>(xr[i]);
      }
      for (int64_t i = 0; i < dim; ++i) grad_codes[code * dim + i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> codebook_search_backward_cpu(
    const at::Tensor& grad_dist, const at::Tensor& x_in, const at::Tensor& codebook_in,
    const at::Tensor& idx_in, c10::string_view metric_name) {
  // Plain tensor math below the autograd layer (the op's autograd is registered in Python).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Metric metric = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  GTK_CHECK_DIM(x_in, 3);
  GTK_CHECK_DIM(codebook_in, 3);
  GTK_CHECK_DIM(idx_in, 3);
  const at::Tensor x = x_in.contiguous(), codebook = codebook_in.contiguous();
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const at::Tensor grad = grad_dist.to(at::toOpMathType(x.scalar_type())).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_codebook = at::empty_like(codebook);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "codebook_search_backward_cpu", [&] {
    search_backward<scalar_t>(grad.data_ptr<at::opmath_type<scalar_t>>(), x.data_ptr<scalar_t>(),
                              codebook.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), x.size(0),
                              x.size(1), codebook.size(1), x.size(2), idx.size(2), metric,
                              grad_x.data_ptr<scalar_t>(), grad_codebook.data_ptr<scalar_t>());
  });
  return {grad_x, grad_codebook};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) {
  m.impl("codebook_search_backward", &codebook_search_backward_cpu);
}

}  // namespace gtk::codebook
