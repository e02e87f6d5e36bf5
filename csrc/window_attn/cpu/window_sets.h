// The key set of each query and the query set of each key of dilated window attention with
// global tokens, shared by the CPU forward and backward kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"

namespace gtk {

struct WindowSpec {
  int64_t n;           // sequence length
  int64_t window;      // keys i + t * dilation, |t| <= window
  int64_t dilation;
  int64_t num_global;  // tokens [0, num_global) attend and are attended by all
  bool causal;         // keep only keys j <= i
  // Optional bool [n, 2 * exclude_window + 1] (only with num_global = 0): exclude[i, t +
  // exclude_window] drops band key i + t * dilation of query i.
  const bool* exclude = nullptr;
  int64_t exclude_window = 0;

  bool excluded(int64_t i, int64_t t) const {
    return exclude != nullptr && exclude[i * (2 * exclude_window + 1) + t + exclude_window];
  }
};

// The spec of the op's arguments; `exclude` (if defined) must be a contiguous bool
// [n, 2 * window + 1] that outlives the spec.
inline WindowSpec make_window_spec(int64_t n, int64_t window, int64_t dilation,
                                   int64_t num_global, bool causal, const at::Tensor& exclude) {
  WindowSpec spec{n, std::min(window, n), dilation, num_global, causal};
  if (exclude.defined()) {
    GTK_CHECK(num_global == 0, "exclude needs num_global = 0");
    GTK_CHECK(exclude.scalar_type() == at::kBool &&
                    exclude.sizes() == at::IntArrayRef({n, 2 * window + 1}),
                "exclude must be bool [N, 2 * window + 1]");
    spec.exclude = exclude.data_ptr<bool>();
    spec.exclude_window = window;
  }
  return spec;
}

// Calls visit(j) once for every key j of query i.
template <typename Visit>
void for_each_key(const WindowSpec& s, int64_t i, Visit&& visit) {
  if (i < s.num_global) {
    const int64_t end = s.causal ? i + 1 : s.n;
    for (int64_t j = 0; j < end; ++j) visit(j);
    return;
  }
  // Here i >= num_global, so every global key also satisfies j <= i.
  for (int64_t j = 0; j < s.num_global; ++j) visit(j);
  const int64_t t_lo = -std::min(s.window, i / s.dilation);
  const int64_t t_hi = s.causal ? 0 : std::min(s.window, (s.n - 1 - i) / s.dilation);
  for (int64_t t = t_lo; t <= t_hi; ++t) {
    const int64_t j = i + t * s.dilation;
    // Globals were visited above: each key counts once.
    if (j >= s.num_global && !s.excluded(i, t)) visit(j);
  }
}

// Calls visit(i) once for every query i whose key set holds key j (the transpose of
// for_each_key).
template <typename Visit>
void for_each_query(const WindowSpec& s, int64_t j, Visit&& visit) {
  if (j < s.num_global) {
    for (int64_t i = s.causal ? j : 0; i < s.n; ++i) visit(i);
    return;
  }
  // Global queries see every key; with causal only keys j <= i < num_global, not this one.
  if (!s.causal) {
    for (int64_t i = 0; i < s.num_global; ++i) visit(i);
  }
  const int64_t u_lo = s.causal ? 0 : -std::min(s.window, j / s.dilation);
  const int64_t u_hi = std::min(s.window, (s.n - 1 - j) / s.dilation);
  for (int64_t u = u_lo; u <= u_hi; ++u) {
    const int64_t i = j + u * s.dilation;
    if (i >= s.num_global && !s.excluded(i, -u)) visit(i);
  }
}

}  // namespace gtk
