// The importable module gtkernels._C. Loading it registers every op of csrc/ with the
// dispatcher (their TORCH_LIBRARY blocks run at load); the Python API it adds is build facts.
#include <ATen/Parallel.h>
#include <torch/extension.h>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = GTK_VERSION;
  info["torch_version"] = GTK_TORCH_VERSION;
  if (std::string(GTK_CUDA_VERSION).empty()) {
    info["cuda_version"] = pybind11::none();
  } else {
    info["cuda_version"] = GTK_CUDA_VERSION;
  }
  pybind11::list archs;
  std::string list = GTK_ARCH_LIST;
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find_first_of("; ", start);
    if (end == std::string::npos) end = list.size();
    if (end > start) archs.append(list.substr(start, end - start));
    start = end + 1;
  }
  info["archs"] = archs;
#ifdef GTK_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["cpu_threads"] = at::get_num_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gtkernels compiled ops (registered under torch.ops.gtkernels) and build facts";
  m.def("build_info", &build_info,
        "Version, torch and CUDA versions built against, compiled GPU architectures.");
}
