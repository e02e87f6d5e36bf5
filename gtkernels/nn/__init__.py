"""Model layers built on the gtkernels ops."""
from .graph_attention import GraphAttention
from .graph_transformer import GraphTransformerLayer
from .memory import MemoryLayer
from .positional import laplacian_pe, random_sign_flip, random_walk_se
from .vq import VectorQuantizer

__all__ = ["GraphAttention", "GraphTransformerLayer", "MemoryLayer", "VectorQuantizer",
           "laplacian_pe", "random_sign_flip", "random_walk_se"]
