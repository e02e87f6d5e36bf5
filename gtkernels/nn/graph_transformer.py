"""Graph transformer layer: the Dwivedi-Bresson layer and the mesh-transformer block."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from .graph_attention import GraphAttention


class GraphTransformerLayer(nn.Module):
    """Graph attention + feed-forward network with residuals and normalisation, and an
    optional edge-feature stream.

    Two published blocks are options of this one class:

    - Dwivedi & Bresson, "A Generalization of Transformer Networks to Graphs" (2021):
      ``pre_norm=False`` (post-norm), ``norm="batch"`` or ``"layer"``, ``edge_dim`` for the
      edge stream::

          h = Norm(h + Drop(Attn(h, e)));   h = Norm(h + FFN(h))
          e = Norm(e + Drop(O_e s));        e = Norm(e + FFN_e(e))

    - The mesh-transformer block: ``pre_norm=True`` with ``window``/``dilation`` and
      ``global_nodes`` at call time (adjacency + dilated window + global nodes)::

          h = h + Drop(Attn(Norm(h), e));   h = h + FFN(Norm(h))   (the same for e)

    ``FFN(h) = W_2 Drop(ReLU(W_1 h))`` with hidden size ``ffn_mult * dim``.

    Edge term (a documented departure from the paper): the paper gates scores by edge
    features multiplicatively, ``s_ij = (q_i * k_j * E e_ij) / sqrt(D)``, which a fused kernel
    over (q, k, v) cannot take. Here edge features enter TransformerConv-style, added to k_j and
    v_j (see `GraphAttention`), and the edge stream's ``s`` is the per-channel score vector of
    that attention, ``s_ij = q_i * (k_j + E e_ij) / sqrt(D)`` ``[E, dim]``, whose per-head sums
    are exactly the logits used: one gather of q and k per edge, the size of the edge stream.

    Args:
        dim, heads: feature size and heads (dim divisible by heads).
        ffn_mult: FFN hidden size multiplier.
        norm: ``"layer"`` (LayerNorm) or ``"batch"`` (BatchNorm1d over nodes / edges).
        edge_dim: None (no edge stream) or the edge feature size; the edge stream keeps that
            size (``e`` in and out: ``[E, edge_dim]``).
        dropout: dropout probability on the attention outputs and inside the FFNs.
        window, dilation: passed to `GraphAttention`.
        pre_norm: normalise before each sublayer (mesh transformer) instead of after (paper).

    Example::

        layer = gk.nn.GraphTransformerLayer(64, heads=4, norm="batch", edge_dim=16)
        h, e = layer(h, g, edge_attr=e)         # h [N, 64], e [E, 16]
    """

    def __init__(self, dim, heads, ffn_mult=2, norm="layer", edge_dim=None, dropout=0.0,
                 window=0, dilation=1, pre_norm=False):
        super().__init__()
        V.check_choice("norm", norm, ("layer", "batch"))
        V.check_int_range("ffn_mult", ffn_mult, 1, 2**16)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.pre_norm = pre_norm
        self.attn = GraphAttention(dim, heads, edge_dim=edge_dim, window=window,
                                   dilation=dilation)
        self.norm_attn, self.norm_ffn = _norm(norm, dim), _norm(norm, dim)
        self.ffn = _ffn(dim, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)
        self.has_edge_stream = edge_dim is not None
        if self.has_edge_stream:
            self.edge_out = nn.Linear(dim, edge_dim)
            self.edge_norm_attn, self.edge_norm_ffn = _norm(norm, edge_dim), _norm(norm, edge_dim)
            self.edge_ffn = _ffn(edge_dim, ffn_mult, dropout)

    def forward(self, x, graph, edge_attr=None, global_nodes=None):
        """x: ``[N, dim]``; graph: as for `GraphAttention`; edge_attr: ``[E, edge_dim]`` (required
        with an edge stream); global_nodes: int64 ``[G]`` or None.

        Returns x' ``[N, dim]``, and ``(x', e')`` with ``e'`` ``[E, edge_dim]`` when the layer
        has an edge stream."""
        if self.has_edge_stream and edge_attr is None and hasattr(graph, "edge_attr"):
            edge_attr = graph.edge_attr
        if self.has_edge_stream and edge_attr is None:
            raise ValueError("edge_attr is required: the layer was built with edge_dim")
        x_in = self.norm_attn(x) if self.pre_norm else x
        e_in = edge_attr
        if self.has_edge_stream and self.pre_norm:
            e_in = self.edge_norm_attn(edge_attr)
        if self.has_edge_stream:
            attn_out, scores = self.attn(x_in, graph, e_in, global_nodes, return_edge_scores=True)
        else:
            attn_out = self.attn(x_in, graph, e_in, global_nodes)
        x = self._residual(x, self.dropout(attn_out), self.norm_attn)
        x = self._residual(x, None, self.norm_ffn, self.ffn)
        if not self.has_edge_stream:
            return x
        e = self._residual(edge_attr, self.dropout(self.edge_out(scores)), self.edge_norm_attn)
        e = self._residual(e, None, self.edge_norm_ffn, self.edge_ffn)
        return x, e

    def _residual(self, x, update, norm, sublayer=None):
        """Post-norm: Norm(x + update); pre-norm: x + update. With `sublayer`, the update is
        sublayer(Norm(x)) (pre-norm) or sublayer(x) (post-norm)."""
        if sublayer is not None:
            update = sublayer(norm(x) if self.pre_norm else x)
        return x + update if self.pre_norm else norm(x + update)


class AutocastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that keeps autocast's low precision: under autocast a bf16 / fp16 input
    ``[..., size]`` is normalised in its own dtype (the kernel's statistics are fp32), with the
    weight and bias rounded to that dtype as autocast rounds a Linear's, and the output has
    that dtype, instead of autocast's fp32 copy in and fp32 result out, which the next
    projection casts back. Same parameters and state dict as nn.LayerNorm; outside autocast,
    or for fp32 / fp64 inputs, it is nn.LayerNorm."""

    def forward(self, x):
        device = x.device.type
        if not (torch.is_autocast_enabled(device) and x.dtype in (torch.bfloat16, torch.float16)):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def _norm(kind, size):
    return AutocastLayerNorm(size) if kind == "layer" else nn.BatchNorm1d(size)


def _ffn(dim, mult, dropout):
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(mult * dim, dim))
