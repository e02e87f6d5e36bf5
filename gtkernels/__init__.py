"""gtkernels: custom torch ops for graph transformers and discrete representations.

Every op is registered under ``torch.ops.gtkernels``; this package holds the public functions
(validation, docstrings, fake kernels and autograd) around them.
"""
from ._loader import load_extension

_C = load_extension()

from . import triton as _triton_kernels  # noqa: E402,F401  (registers Triton CUDA kernels)
from .codebook import code_distill_loss, codebook_search  # noqa: E402
from .hashing import sign_hash  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """Facts of this build: version, torch and CUDA versions built against, compiled archs."""
    return dict(_C.build_info())


__all__ = ["build_info", "code_distill_loss", "codebook_search", "sign_hash", "__version__"]
