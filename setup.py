"""Build of gtkernels._C (C++ always, CUDA when a CUDA torch and nvcc are there).

Environment:
  GTKERNELS_CPU_ONLY=1      build the C++ kernels only, even with a CUDA toolkit present.
  FORCE_CUDA=1              build the CUDA kernels even when no GPU is visible (CI, wheels).
  TORCH_CUDA_ARCH_LIST      e.g. "9.0a" or "8.0;9.0a". Default: the visible GPUs (9.0 -> 9.0a),
                            else the architectures the installed torch was built for.
  MAX_JOBS                  parallel compile jobs (ninja).
The wheel's local version names CUDA, torch and the architectures: 0.1.0+cu130.torch2.14.sm90a.
"""
import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def read_sources():
    """Expands csrc/SOURCES into {"cpp": [...], "cuda": [...], "python": [...]}."""
    groups, section = {}, None
    with open(os.path.join(ROOT, "csrc", "SOURCES")) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                groups[section] = []
                continue
            groups[section] += sorted(os.path.relpath(p, ROOT)
                                      for p in glob.glob(os.path.join(ROOT, line)))
    return groups


def want_cuda():
    if os.environ.get("GTKERNELS_CPU_ONLY", "0") == "1":
        return False
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def default_arch_list():
    """Visible GPUs first (Hopper gets its arch-specific 9.0a); else the installed torch's."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if caps:
        return ";".join(f"{a}.{b}" + ("a" if (a, b) == (9, 0) else "") for a, b in caps)
    archs = [a.split("_")[1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    return ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)


def local_version(cuda, arch_list):
    torch_tag = "torch" + ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if not cuda:
        return f"cpu.{torch_tag}"
    cuda_tag = "cu" + torch.version.cuda.replace(".", "")
    arch_tags = [("sm" + a.replace(".", "").replace("+PTX", "")).lower()
                 for a in re.split(r"[;\s]+", arch_list) if a]
    return ".".join([cuda_tag, torch_tag] + arch_tags)


def write_build_meta(cuda, arch_list):
    """Facts the package checks at import time, before loading _C (ABI guard)."""
    torch_version = torch.__version__.split("+")[0]
    with open(os.path.join(ROOT, "gtkernels", "_build_meta.py"), "w") as f:
        f.write("# Written by setup.py at build time; not tracked.\n")
        f.write(f"TORCH_VERSION = {torch_version!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda if cuda else None!r}\n")
        f.write(f"ARCH_LIST = {arch_list if cuda else ''!r}\n")


def make_extension():
    sources = read_sources()
    cuda = want_cuda()
    arch_list = ""
    if cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    version = f"{VERSION}+{local_version(cuda, arch_list)}"
    write_build_meta(cuda, arch_list)

    defines = [
        ("GTK_VERSION", f'"{version}"'),
        ("GTK_TORCH_VERSION", f'"{torch.__version__}"'),
        ("GTK_CUDA_VERSION", f'"{torch.version.cuda if cuda else ""}"'),
        ("GTK_ARCH_LIST", f'"{arch_list}"'),
    ]
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard it needs
    files = sources["cpp"] + sources["python"]
    kwargs = dict(name="gtkernels._C", define_macros=defines,
                  include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if cuda:
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            sources=files + sources["cuda"],
            extra_compile_args={"cxx": cxx_flags + ["-DGTK_WITH_CUDA"],
                                "nvcc": nvcc_flags + ["-DGTK_WITH_CUDA"]},
            **kwargs)
    else:
        ext = cpp_extension.CppExtension(sources=files, extra_compile_args={"cxx": cxx_flags},
                                         **kwargs)
    return ext, version


extension, full_version = make_extension()

setup(
    version=full_version,
    packages=find_packages(include=["gtkernels", "gtkernels.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
