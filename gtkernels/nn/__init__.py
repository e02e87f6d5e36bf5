"""Model layers built on the gtkernels ops."""
from .graph_attention import GraphAttention
from .graph_transformer import GraphTransformerLayer
from .positional import laplacian_pe, random_sign_flip, random_walk_se

__all__ = ["GraphAttention", "GraphTransformerLayer", "laplacian_pe", "random_sign_flip",
           "random_walk_se"]
