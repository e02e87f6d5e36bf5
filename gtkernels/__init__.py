"""gtkernels: custom torch ops for graph transformers and discrete representations.

Every op is registered under ``torch.ops.gtkernels``; this package holds the public functions
(validation, docstrings, fake kernels and autograd) around them.
"""
from ._loader import load_extension

_C = load_extension()

from . import triton as _triton_kernels  # noqa: E402,F401  (registers Triton CUDA kernels)
from .codebook import code_distill_loss, codebook_search  # noqa: E402
from .gather_sum import weighted_gather_sum  # noqa: E402
from .graph import Graph  # noqa: E402
from .graph_attn import graph_attention  # noqa: E402
from .hashing import hashed_lookup, sign_hash  # noqa: E402
from .window_attn import window_attention  # noqa: E402
from . import nn  # noqa: E402,F401  (model layers: gk.nn.*)

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """Facts of this build: version, torch and CUDA versions built against, compiled archs."""
    return dict(_C.build_info())


__all__ = ["build_info", "code_distill_loss", "codebook_search", "Graph", "graph_attention",
           "hashed_lookup", "sign_hash", "weighted_gather_sum", "window_attention", "__version__"]
