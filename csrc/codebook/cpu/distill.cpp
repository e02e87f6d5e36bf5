// Soft-code distillation loss on the CPU, row by row with an online logsumexp, never N x K.
//
// Logits of row n over code j: a = (alpha <t_n, c_j> - beta ||c_j||^2) / T for the teacher,
// b likewise for the student ("l2": alpha = 2, beta = 1, i.e. -||x - c||^2 / T up to a per-row
// constant; "ip": alpha = 1, beta = 0). KL_n = E_p[a - b] - lse(a) + lse(b), p = softmax(a).
// Gradients: dKL/da = p (a - b - E_p[a - b]), dKL/db = q - p, q = softmax(b); both sum to 0
// over j, so the per-row constant of l2 drops out of grad_student and grad_teacher. The
// backward computes only the gradients that output_mask asks for (the others are empty [0]).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "codebook/cpu/metric.h"
#include "common/checks.h"

namespace gtk::codebook {
namespace {

struct LogitScale {
  double alpha, beta, inv_t;

  // (alpha <row, code> - beta ||code||^2) / T
  template <typename scalar_t, typename acc_t>
  acc_t logit(const scalar_t* row, const scalar_t* code, acc_t code_sq_norm, int64_t dim) const;
};

LogitScale logit_scale(c10::string_view metric_name, double temperature) {
  const Metric m = parse_metric(std::string_view(metric_name.data(), metric_name.size()));
  GTK_CHECK(m != Metric::kCosine, "code_distill_loss op takes \"l2\" or \"ip\"");
  return {m == Metric::kL2 ? 2.0 : 1.0, m == Metric::kL2 ? 1.0 : 0.0, 1.0 / temperature};
}

template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t dim) {
  acc_t acc = 0;
  for (int64_t i = 0; i < dim; ++i) acc += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return acc;
}

template <typename scalar_t, typename acc_t>
std::vector<acc_t> code_sq_norms(const scalar_t* codes, int64_t num_codes, int64_t dim) {
  std::vector<acc_t> norms(num_codes);
  for (int64_t j = 0; j < num_codes; ++j) {
    norms[j] = dot<scalar_t, acc_t>(codes + j * dim, codes + j * dim, dim);
  }
  return norms;
}

template <typename scalar_t, typename acc_t>
acc_t LogitScale::logit(const scalar_t* row, const scalar_t* code, acc_t code_sq_norm,
                        int64_t dim) const {
  return (alpha * dot<scalar_t, acc_t>(row, code, dim) - beta * code_sq_norm) * inv_t;
}

// Online logsumexp state: max m and sum of exp(v - m), plus the p-weighted sum of w.
template <typename acc_t>
struct OnlineLse {
  acc_t max = -std::numeric_limits<acc_t>::infinity(), sum = 0, weighted = 0;
  void add(acc_t v, acc_t w) {
    if (v > max) {
      const acc_t scale = std::exp(max - v);
      sum *= scale;
      weighted *= scale;
      max = v;
    }
    const acc_t e = std::exp(v - max);
    sum += e;
    weighted += e * w;
  }
  acc_t lse() const { return max + std::log(sum); }
};

std::tuple<at::Tensor, at::Tensor> code_distill_loss_cpu(const at::Tensor& student_in,
                                                         const at::Tensor& teacher_in,
                                                         const at::Tensor& codebook_in,
                                                         double temperature,
                                                         c10::string_view metric) {
  const LogitScale ls = logit_scale(metric, temperature);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain tensor math, no autograd
  const at::Tensor s = student_in.contiguous(), t = teacher_in.contiguous();
  const at::Tensor c = codebook_in.contiguous();
  const int64_t num_rows = s.size(0), dim = s.size(1), num_codes = c.size(0);
  const auto acc_dtype = at::toOpMathType(s.scalar_type());
  at::Tensor row_kl = at::empty({num_rows}, s.options().dtype(acc_dtype));
  at::Tensor stats = at::empty({num_rows, 3}, s.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "code_distill_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *sp = s.data_ptr<scalar_t>(), *tp = t.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
    const auto norms = code_sq_norms<scalar_t, acc_t>(cp, num_codes, dim);
    acc_t* kl = row_kl.data_ptr<acc_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        OnlineLse<acc_t> teacher, student;
        for (int64_t j = 0; j < num_codes; ++j) {
          const scalar_t* cj = cp + j * dim;
          const acc_t a = ls.logit(tp + n * dim, cj, norms[j], dim);
          const acc_t b = ls.logit(sp + n * dim, cj, norms[j], dim);
          teacher.add(a, a - b);
          student.add(b, 0);
        }
        const acc_t expected = teacher.weighted / teacher.sum;
        st[n * 3] = teacher.lse();
        st[n * 3 + 1] = student.lse();
        st[n * 3 + 2] = expected;
        kl[n] = expected - st[n * 3] + st[n * 3 + 1];
      }
    });
  });
  return {row_kl, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> code_distill_loss_backward_cpu(
    const at::Tensor& grad_row_kl, const at::Tensor& student_in, const at::Tensor& teacher_in,
    const at::Tensor& codebook_in, const at::Tensor& row_stats, double temperature,
    c10::string_view metric, std::array<bool, 3> output_mask) {
  const LogitScale ls = logit_scale(metric, temperature);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain tensor math, no autograd
  const at::Tensor s = student_in.contiguous(), t = teacher_in.contiguous();
  const at::Tensor c = codebook_in.contiguous();
  const int64_t num_rows = s.size(0), dim = s.size(1), num_codes = c.size(0);
  const auto acc_dtype = at::toOpMathType(s.scalar_type());
  const at::Tensor grad = grad_row_kl.to(acc_dtype).contiguous();
  const at::Tensor stats = row_stats.to(acc_dtype).contiguous();
  const bool need_s = output_mask[0], need_t = output_mask[1], need_c = output_mask[2];
  auto grad_like = [](bool needed, const at::Tensor& input) {
    return needed ? at::empty_like(input) : at::empty({0}, input.options());
  };
  at::Tensor grad_s = grad_like(need_s, s), grad_t = grad_like(need_t, t);
  at::Tensor grad_c = grad_like(need_c, c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "code_distill_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *sp = s.data_ptr<scalar_t>(), *tp = t.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
    const acc_t *gp = grad.data_ptr<acc_t>(), *stp = stats.data_ptr<acc_t>();
    const auto norms = code_sq_norms<scalar_t, acc_t>(cp, num_codes, dim);
    scalar_t *gsp = grad_s.data_ptr<scalar_t>(), *gtp = grad_t.data_ptr<scalar_t>();
    scalar_t* gcp = grad_c.data_ptr<scalar_t>();  // those not needed are never touched
    // (dKL/da, dKL/db) of row n and code j, times the row's upstream gradient.
    auto logit_grads = [&](int64_t n, int64_t j) {
      const scalar_t* cj = cp + j * dim;
      const acc_t a = ls.logit(tp + n * dim, cj, norms[j], dim);
      const acc_t b = ls.logit(sp + n * dim, cj, norms[j], dim);
      const acc_t p = std::exp(a - stp[n * 3]), q = std::exp(b - stp[n * 3 + 1]);
      return std::make_pair(gp[n] * p * (a - b - stp[n * 3 + 2]), gp[n] * (q - p));
    };
    const acc_t row_scale = ls.alpha * ls.inv_t;
    if (need_s || need_t) at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc_t_row(dim), acc_s_row(dim);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc_t_row.begin(), acc_t_row.end(), acc_t(0));
        std::fill(acc_s_row.begin(), acc_s_row.end(), acc_t(0));
        for (int64_t j = 0; j < num_codes; ++j) {
          const auto [ga, gb] = logit_grads(n, j);
          for (int64_t i = 0; i < dim; ++i) {
            const acc_t ci = static_cast<acc_t>(cp[j * dim + i]);
            if (need_t) acc_t_row[i] += ga * ci;
            if (need_s) acc_s_row[i] += gb * ci;
          }
        }
        for (int64_t i = 0; i < dim; ++i) {
          if (need_t) gtp[n * dim + i] = static_cast<scalar_t>(row_scale * acc_t_row[i]);
          if (need_s) gsp[n * dim + i] = static_cast<scalar_t>(row_scale * acc_s_row[i]);
        }
      }
    });
    if (need_c) at::parallel_for(0, num_codes, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(dim);
      for (int64_t j = begin; j < end; ++j) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        acc_t total = 0;
        for (int64_t n = 0; n < num_rows; ++n) {
          const auto [ga, gb] = logit_grads(n, j);
          total += ga + gb;
          for (int64_t i = 0; i < dim; ++i) {
            acc[i] += ga * static_cast<acc_t>(tp[n * dim + i]) + gb * static_cast<acc_t>(sp[n * dim + i]);
          }
        }
        for (int64_t i = 0; i < dim; ++i) {
          const acc_t cji = static_cast<acc_t>(cp[j * dim + i]);
          gcp[j * dim + i] =
              static_cast<scalar_t>(row_scale * acc[i] - 2 * ls.beta * ls.inv_t * total * cji);
        }
      }
    });
  });
  return {grad_s, grad_t, grad_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtkernels, CPU, m) {
  m.impl("code_distill_loss", &code_distill_loss_cpu);
  m.impl("code_distill_loss_backward", &code_distill_loss_backward_cpu);
}

}  // namespace gtk::codebook
