"""Model layers built on the gtkernels ops."""
from .memory import MemoryLayer
from .vq import VectorQuantizer

__all__ = ["MemoryLayer", "VectorQuantizer"]
