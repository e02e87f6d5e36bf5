"""Triton kernels of gtkernels, registered as the CUDA implementations of some ops.

Triton is optional: without it (or without a GPU) the C++ kernels serve. In CI the kernels
run on the CPU through Triton's interpreter (TRITON_INTERPRET=1), called through their
launchers directly at small sizes.
"""
import os

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


def interpreting():
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
