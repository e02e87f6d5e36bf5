// Defensive checks inside kernels' host code. The Python functional layer validates inputs
// with messages that name the argument; these only guard the C++ entry points against misuse.
#pragma once

#include <ATen/ATen.h>

#define GTK_CHECK_DEVICE(x, dev)                                                         \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define GTK_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dims, got ", (x).dim())
#define GTK_CHECK_FLOATING(x) \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be floating, got ", (x).scalar_type())

namespace gtk {

// Number of row blocks of `n` items for at::parallel_for: enough grain to amortise the
// thread pool, small enough to balance.
inline int64_t cpu_grain(int64_t work_per_item) {
  constexpr int64_t kTarget = 1 << 14;
  return std::max<int64_t>(1, kTarget / std::max<int64_t>(1, work_per_item));
}

// Every idx[p], p < n, in [0, rows): checked serially, before any parallel region, so that
// no exception is thrown from inside one.
inline void check_rows_in_range(const int64_t* idx, int64_t n, int64_t rows) {
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK(idx[p] >= 0 && idx[p] < rows, "idx entry ", p, " = ", idx[p],
                " is out of range [0, ", rows, ")");
  }
}

}  // namespace gtk
