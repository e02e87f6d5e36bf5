"""Multi-head graph attention layer: projections around `gtkernels.graph_attention`."""
import torch
from torch import nn

from .. import _validate as V
from ..graph_attn import graph_attention
from ._graph_input import GraphInputCache, edge_endpoints


class GraphAttention(nn.Module):
    """Multi-head attention of every node over its in-neighbours (edge j -> i), optionally
    with edge features, a dilated sequence window and global nodes.

    Args:
        dim: feature size of x; divisible by ``heads`` (head size ``D = dim // heads``).
        heads: number of heads H.
        edge_dim: size of edge features, or None for none. Edge features are mapped by a
            linear layer (no bias) to ``[E, H, D]`` and added to k_j and v_j on their edge
            (PyG TransformerConv's ``edge_dim`` semantics).
        window, dilation: node i also attends nodes ``i + t * dilation`` for ``|t| <= window``
            (the mesh-transformer window in the node order of the graph), each key once:
            the adjacency + window union of `gtkernels.graph_attention` (the graph must be
            coalesced; edge features apply where a window key is also an edge).
        bias: bias of the q/k/v and output projections.

    Shapes: ``x`` ``[N, dim]`` float (any dtype graph_attention takes; autocast is honoured
    by the projections) -> ``[N, dim]``::

        q, k, v = x W_q, x W_k, x W_v   (split into H heads of size D)
        out_i   = W_o concat_h sum_{j -> i} softmax_j(q_i . (k_j + e_ij) / sqrt(D)) (v_j + e_ij)

    ``attention_fn`` (an attribute, default `gtkernels.graph_attention`) is the attention
    kernel called; a function with the same signature may replace it for comparisons.

    Example::

        layer = gk.nn.GraphAttention(128, heads=4, edge_dim=3)
        g = gk.Graph.from_edge_index(edge_index, num_nodes=x.shape[0])   # build once, reuse
        y = layer(x, g, edge_attr=rel_pos)                               # [N, 128]
    """

    def __init__(self, dim, heads, edge_dim=None, window=0, dilation=1, bias=True):
        super().__init__()
        V.check_int_range("heads", heads, 1, 2**16)
        V.check_int_range("dim", dim, 1, 2**31 - 1)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim = {dim}, heads = {heads}")
        if edge_dim is not None:
            V.check_int_range("edge_dim", edge_dim, 1, 2**31 - 1)
        V.check_int_range("window", window, 0, 2**31 - 1)
        V.check_int_range("dilation", dilation, 1, 2**31 - 1)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window, self.dilation = window, dilation
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.edge_proj = None if edge_dim is None else nn.Linear(edge_dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.attention_fn = graph_attention
        self._graph_cache = GraphInputCache()

    def extra_repr(self):
        return (f"dim={self.dim}, heads={self.heads}, edge_dim="
                f"{None if self.edge_proj is None else self.edge_proj.in_features}, "
                f"window={self.window}, dilation={self.dilation}")

    def forward(self, x, graph, edge_attr=None, global_nodes=None, *, return_edge_scores=False):
        """x: ``[N, dim]``; graph: a `Graph` (fastest: built once), an int ``edge_index``
        ``[2, E]`` (its Graph is cached for the next call with the same tensor) or a PyG
        ``Data``/``Batch`` (its ``edge_attr`` is used when ``edge_attr`` is None);
        edge_attr: ``[E, edge_dim]`` in the graph's edge order; global_nodes: int64 ``[G]``.

        Returns ``[N, dim]``; with ``return_edge_scores`` also ``[E, dim]``: the per-channel
        terms ``q_i * (k_j + e_ij) / sqrt(D)`` of each edge, whose sums over a head's channels
        are that edge's attention logits (the Dwivedi-Bresson edge output, before ``O_e``).
        """
        V.check_tensor("x", x, dtypes=V.FLOAT_DTYPES, dim=2)
        if x.shape[1] != self.dim:
            raise ValueError(f"x must be [N, dim] = [N, {self.dim}], got {list(x.shape)}")
        g, data_edge_attr = self._graph_cache.resolve(graph, x.shape[0], x.device)
        if edge_attr is None and self.edge_proj is not None:
            edge_attr = data_edge_attr
        n, h, d = x.shape[0], self.heads, self.head_dim
        q, k, v = self.qkv(x).view(n, 3, h, d).unbind(1)
        edge_feat = self._project_edges(edge_attr, g.num_edges)
        out = self.attention_fn(q, k, v, g, edge_attr=edge_feat, window=self.window,
                                dilation=self.dilation, global_nodes=global_nodes)
        out = self.out_proj(out.reshape(n, self.dim))
        if not return_edge_scores:
            return out
        src, dst = edge_endpoints(g)
        keys = k.index_select(0, src)
        if edge_feat is not None:
            keys = keys + edge_feat
        scores = q.index_select(0, dst) * keys * d ** -0.5
        return out, scores.reshape(-1, self.dim)

    def _project_edges(self, edge_attr, num_edges):
        if self.edge_proj is None:
            if edge_attr is not None:
                raise ValueError("edge_attr given but the layer was built with edge_dim=None")
            return None
        if edge_attr is None:
            raise ValueError(f"edge_attr [E, {self.edge_proj.in_features}] is required "
                             "(the layer was built with edge_dim)")
        V.check_tensor("edge_attr", edge_attr, dtypes=V.FLOAT_DTYPES, dim=2)
        V.check_shape("edge_attr", edge_attr, (num_edges, self.edge_proj.in_features),
                      "E, edge_dim")
        return self.edge_proj(edge_attr).view(num_edges, self.heads, self.head_dim)
