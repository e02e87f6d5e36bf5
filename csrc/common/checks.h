// Defensive checks inside kernels' host code. The Python functional layer validates inputs
// with messages that name the argument; these only guard the C++ entry points against misuse.
//
// A failed check formats its message with vsnprintf and hands c10 a C string. On the H200
// test machine (torch 2.11, the extension built there), every TORCH_CHECK of this library
// whose message carried a number (built by c10::str through std::ostream) ended the process
// with SIGSEGV, while checks with a literal-only message (even in the same function) and
// torch's own checks raised RuntimeError (device probe, 2026-11-29). So no check here streams
// its message, and the library's C++ uses GTK_CHECK for all of its checks (one mechanism).
#pragma once

#include <ATen/ATen.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>

#define GTK_CHECK(cond, ...)                                                     \
  do {                                                                           \
    if (C10_UNLIKELY(!(cond))) ::gtk::check_failed(__func__, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)
#define GTK_CHECK_DEVICE(x, dev)                                                 \
  GTK_CHECK((x).device() == (dev), #x " must be on %s, got %s",                  \
            ::gtk::device_text(dev).s, ::gtk::device_text((x).device()).s)
#define GTK_CHECK_DIM(x, d)                                                      \
  GTK_CHECK((x).dim() == (d), #x " must have %lld dims, got %lld",               \
            static_cast<long long>(d), static_cast<long long>((x).dim()))
#define GTK_CHECK_FLOATING(x)                                                    \
  GTK_CHECK(at::isFloatingType((x).scalar_type()), #x " must be floating, got %s", \
            c10::toString((x).scalar_type()))

namespace gtk {

// Raises c10::Error (RuntimeError in Python) with the printf-formatted message.
[[noreturn]] __attribute__((format(printf, 4, 5))) inline void check_failed(
    const char* func, const char* file, int line, const char* format, ...) {
  char message[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  c10::detail::torchCheckFail(func, file, static_cast<uint32_t>(line),
                              static_cast<const char*>(message));
}

// Short texts for messages, built without std::ostream.
struct Text {
  char s[128];
};

inline Text shape_text(at::IntArrayRef sizes) {
  Text t{};
  const int size = static_cast<int>(sizeof(t.s));
  int used = std::snprintf(t.s, size, "[");
  for (size_t i = 0; i < sizes.size() && used < size; ++i)
    used += std::snprintf(t.s + used, size - used, i ? ", %lld" : "%lld",
                          static_cast<long long>(sizes[i]));
  if (used < size) std::snprintf(t.s + used, size - used, "]");
  return t;
}

inline Text device_text(const at::Device& device) {
  Text t{};
  const char* type = device.is_cpu()    ? "cpu"
                     : device.is_cuda() ? "cuda"
                     : device.is_meta() ? "meta"
                                        : "other";
  if (device.has_index())
    std::snprintf(t.s, sizeof(t.s), "%s:%d", type, static_cast<int>(device.index()));
  else
    std::snprintf(t.s, sizeof(t.s), "%s", type);
  return t;
}

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
    GTK_CHECK(idx[p] >= 0 && idx[p] < rows, "idx entry %lld = %lld is out of range [0, %lld)",
              static_cast<long long>(p), static_cast<long long>(idx[p]),
              static_cast<long long>(rows));
  }
}

}  // namespace gtk
