// CPU forward kernels of the hashed-lookup family: hash_weights (+ backward), hashed_lookup
// and weighted_gather_sum. One token per loop iteration, fp32 (fp64 for double) accumulation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "hashing/cpu/hash_chunk.h"

namespace gtk {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::ScalarType weight_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_hash_args(const at::Tensor& x, int64_t tau, double temperature) {
  GTK_CHECK_FLOATING(x);
  GTK_CHECK_DIM(x, 2);
  GTK_CHECK(tau >= 1 && tau <= 12, "tau must be in [1, 12], got %lld", static_cast<long long>(tau));
  GTK_CHECK(x.size(1) % tau == 0, "x's last dim must be divisible by tau");
  GTK_CHECK(temperature > 0, "temperature must be positive, got %g", static_cast<double>(temperature));
}

// out[m, t, :] = sum_b weight[b] * table[m, rows[b], :] (+ bias[m, :]); acc holds d values.
template <typename scalar_t, typename acc_t>
void gather_sum_token(const scalar_t* table, const scalar_t* bias, int64_t M, int64_t R,
                      int64_t d, const int64_t* rows, const acc_t* weight, int64_t B,
                      acc_t* acc, scalar_t* out, int64_t out_m_stride) {
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* table_m = table + m * R * d;
    std::fill(acc, acc + d, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* row = table_m + rows[b] * d;
      const acc_t w = weight[b];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) acc[j] += w * static_cast<acc_t>(row[j]);
    }
    scalar_t* o = out + m * out_m_stride;
    const scalar_t* bias_m = bias != nullptr ? bias + m * d : nullptr;
    for (int64_t j = 0; j < d; ++j) {
      const acc_t b_j = bias_m != nullptr ? static_cast<acc_t>(bias_m[j]) : acc_t(0);
      o[j] = static_cast<scalar_t>(acc[j] + b_j);
    }
  }
}

// x [T, K * tau] -> (rows int32 [T, K] = k * 2**tau + h_k, weights fp32 [T, K] (fp64 for double)).
std::tuple<at::Tensor, at::Tensor> hash_weights_cpu(const at::Tensor& x_in, int64_t tau,
                                                    c10::string_view weighting_name,
                                                    double temperature) {
  check_hash_args(x_in, tau, temperature);
  const Weighting weighting = parse_weighting(weighting_name);
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), K = x.size(1) / tau, R = int64_t(1) << tau;
  at::Tensor rows = at::empty({T, K}, x.options().dtype(at::kInt));
  at::Tensor weights = at::empty({T, K}, x.options().dtype(weight_dtype(x.scalar_type())));
  if (rows.numel() == 0) return {rows, weights};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hash_weights_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int32_t* rp = rows.data_ptr<int32_t>();
    acc_t* wp = weights.data_ptr<acc_t>();
    const acc_t two_over_t = acc_t(2.0 / temperature);
    at::parallel_for(0, T * K, cpu_grain(4 * tau), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        int32_t code;
        wp[c] = chunk_code_weight<scalar_t, acc_t>(xp + c * tau, tau, weighting, two_over_t, &code);
        rp[c] = static_cast<int32_t>((c % K) * R + code);
      }
    });
  });
  return {rows, weights};
}

// grad_weights [T, K] (fp32 / fp64), x [T, K * tau] -> dx [T, K * tau] in x's dtype.
at::Tensor hash_weights_backward_cpu(const at::Tensor& grad_weights_in, const at::Tensor& x_in,
                                     int64_t tau, c10::string_view weighting_name,
                                     double temperature) {
  check_hash_args(x_in, tau, temperature);
  const Weighting weighting = parse_weighting(weighting_name);
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), K = x.size(1) / tau;
  GTK_CHECK(grad_weights_in.sizes() == at::IntArrayRef({T, K}), "grad_weights must be [T, K]");
  const at::Tensor grad_weights = grad_weights_in.to(weight_dtype(x.scalar_type())).contiguous();
  at::Tensor dx = at::empty_like(x);
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hash_weights_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* gp = grad_weights.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const acc_t two_over_t = acc_t(2.0 / temperature);
    at::parallel_for(0, T * K, cpu_grain(8 * tau), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        chunk_weight_backward<scalar_t, acc_t>(xp + c * tau, tau, weighting, two_over_t, gp[c],
                                               dxp + c * tau);
      }
    });
  });
  return dx;
}

// x [T, K * tau], tables [M, K, 2**tau, d], bias [M, d] or None -> y [M, T, d].
at::Tensor hashed_lookup_cpu(const at::Tensor& x_in, const at::Tensor& tables_in,
                             const c10::optional<at::Tensor>& bias_in, int64_t tau,
                             c10::string_view weighting_name, double temperature) {
  check_hash_args(x_in, tau, temperature);
  const Weighting weighting = parse_weighting(weighting_name);
  GTK_CHECK_DIM(tables_in, 4);
  const at::Tensor x = x_in.contiguous(), tables = tables_in.contiguous();
  GTK_CHECK(x.scalar_type() == tables.scalar_type(), "x and tables must share a dtype");
  const int64_t T = x.size(0), K = x.size(1) / tau, R = int64_t(1) << tau;
  const int64_t M = tables.size(0), d = tables.size(3);
  GTK_CHECK(tables.size(1) == K && tables.size(2) == R, "tables must be [M, K, 2**tau, d]");
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    GTK_CHECK(bias.sizes() == at::IntArrayRef({M, d}) && bias.scalar_type() == x.scalar_type(),
              "bias must be [M, d] with tables' dtype");
  }
  at::Tensor out = at::empty({M, T, d}, tables.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hashed_lookup_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = tables.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t two_over_t = acc_t(2.0 / temperature);
    at::parallel_for(0, T, cpu_grain(M * K * d), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> rows(K);
      std::vector<acc_t> weight(K), acc(d);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          int32_t code;
          weight[k] = chunk_code_weight<scalar_t, acc_t>(xp + (t * K + k) * tau, tau, weighting,
                                                         two_over_t, &code);
          rows[k] = k * R + code;
        }
        gather_sum_token<scalar_t, acc_t>(tp, bp, M, K * R, d, rows.data(), weight.data(), K,
                                          acc.data(), op + t * d, T * d);
      }
    });
  });
  return out;
}

// table [M, R, d], idx [T, B] int32/int64, weights [T, B] or None -> y [M, T, d].
at::Tensor weighted_gather_sum_cpu(const at::Tensor& table_in, const at::Tensor& idx_in,
                                   const c10::optional<at::Tensor>& weights_in) {
  GTK_CHECK_FLOATING(table_in);
  GTK_CHECK_DIM(table_in, 3);
  GTK_CHECK_DIM(idx_in, 2);
  GTK_CHECK(idx_in.scalar_type() == at::kInt || idx_in.scalar_type() == at::kLong,
            "idx must be int32 or int64");
  const at::Tensor table = table_in.contiguous();
  const at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const int64_t M = table.size(0), R = table.size(1), d = table.size(2);
  const int64_t T = idx.size(0), B = idx.size(1);
  const at::ScalarType acc_dtype = weight_dtype(table.scalar_type());
  at::Tensor weights;
  if (weights_in.has_value()) {
    GTK_CHECK(weights_in->sizes() == idx.sizes(), "weights must have idx's shape [T, B]");
    weights = weights_in->to(acc_dtype).contiguous();
  } else {
    weights = at::ones({T, B}, table.options().dtype(acc_dtype));
  }
  at::Tensor out = at::empty({M, T, d}, table.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "weighted_gather_sum_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* tp = table.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const acc_t* wp = weights.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    check_rows_in_range(ip, T * B, R);
    at::parallel_for(0, T, cpu_grain(M * B * d), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t t = begin; t < end; ++t) {
        gather_sum_token<scalar_t, acc_t>(tp, nullptr, M, R, d, ip + t * B, wp + t * B, B,
                                          acc.data(), op + t * d, T * d);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) {
  m.impl("hash_weights", &hash_weights_cpu);
  m.impl("hash_weights_backward", &hash_weights_backward_cpu);
  m.impl("hashed_lookup", &hashed_lookup_cpu);
  m.impl("weighted_gather_sum", &weighted_gather_sum_cpu);
}

}  // namespace gtk
