"""Dense-masked pure-torch forwards of the gtkernels.nn graph layers, reading the layers'
weights: the oracle of tests/test_nn_graph.py. Graphs must be coalesced (one edge per pair)."""
import torch
import torch.nn.functional as F

from tests.graph_cases import random_edge_index


def coalesced_edge_index(num_nodes, num_edges, *, isolated=0):
    """int64 [2, E'] without duplicate pairs, in random (unsorted) order."""
    pairs = torch.unique(random_edge_index(num_nodes, num_edges, isolated=isolated), dim=1)
    return pairs[:, torch.randperm(pairs.shape[1])]


def adjacency_mask(edge_index, n):
    """bool [N, N], mask[i, j] = edge j -> i."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[edge_index[1], edge_index[0]] = True
    return mask


def window_global_mask(n, window, dilation, global_nodes):
    """bool [N, N]: keys i + t * dilation (|t| <= window) and global nodes both ways."""
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    mask = (offset % dilation == 0) & (offset.abs() <= window * dilation) if window else \
        torch.zeros(n, n, dtype=torch.bool)
    if global_nodes is not None:
        mask[global_nodes, :] = True
        mask[:, global_nodes] = True
    return mask


def dense_attention(q, k, v, mask, edge_dense=None):
    """q, k, v [N, H, D]; mask [N, N]; edge_dense [N, N, H, D] added to k_j, v_j for query i.
    Returns out [N, H, D] (zeros for rows without keys) and channel scores [N, N, H, D]."""
    keys = k[None] if edge_dense is None else k[None] + edge_dense
    values = v[None] if edge_dense is None else v[None] + edge_dense
    channel_scores = q[:, None] * keys * q.shape[-1] ** -0.5
    scores = channel_scores.sum(-1).masked_fill(~mask[..., None], float("-inf"))  # [N, N, H]
    has_keys = mask.any(1)[:, None, None]
    prob = torch.softmax(torch.where(has_keys, scores, 0.0), dim=1) * has_keys
    out = torch.einsum("ijh,ijhd->ihd", prob, values.expand(q.shape[0], -1, -1, -1))
    return out, channel_scores


def dense_graph_attention(layer, x, edge_index, edge_attr=None, extra_mask=None):
    """GraphAttention's forward, densely. Returns (out [N, dim], edge scores [E, dim])."""
    n, h, d = x.shape[0], layer.heads, layer.head_dim
    q, k, v = F.linear(x, layer.qkv.weight, layer.qkv.bias).view(n, 3, h, d).unbind(1)
    mask = adjacency_mask(edge_index, n)
    if extra_mask is not None:
        mask = mask | extra_mask
    edge_dense = None
    if edge_attr is not None:
        edge_dense = x.new_zeros(n, n, h, d)
        edge_feat = F.linear(edge_attr, layer.edge_proj.weight).view(-1, h, d)
        edge_dense[edge_index[1], edge_index[0]] = edge_feat
    out, channel_scores = dense_attention(q, k, v, mask, edge_dense)
    out = F.linear(out.reshape(n, -1), layer.out_proj.weight, layer.out_proj.bias)
    return out, channel_scores[edge_index[1], edge_index[0]].reshape(edge_index.shape[1], -1)


def _norm(module, x):
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)


def _ffn(seq, x):
    first, last = seq[0], seq[3]
    return F.linear(F.relu(F.linear(x, first.weight, first.bias)), last.weight, last.bias)


def dense_transformer_layer(layer, x, edge_index, edge_attr=None):
    """GraphTransformerLayer's forward (training-mode batch norm, no dropout), densely."""
    def sublayer(value, update, norm):
        return value + update if layer.pre_norm else _norm(norm, value + update)

    x_in = _norm(layer.norm_attn, x) if layer.pre_norm else x
    e_in = edge_attr
    if edge_attr is not None and layer.pre_norm:
        e_in = _norm(layer.edge_norm_attn, edge_attr)
    attn, scores = dense_graph_attention(layer.attn, x_in, edge_index, e_in)
    x = sublayer(x, attn, layer.norm_attn)
    ffn_in = _norm(layer.norm_ffn, x) if layer.pre_norm else x
    x = sublayer(x, _ffn(layer.ffn, ffn_in), layer.norm_ffn)
    if edge_attr is None:
        return x
    e_update = F.linear(scores, layer.edge_out.weight, layer.edge_out.bias)
    e = sublayer(edge_attr, e_update, layer.edge_norm_attn)
    e_ffn_in = _norm(layer.edge_norm_ffn, e) if layer.pre_norm else e
    return x, sublayer(e, _ffn(layer.edge_ffn, e_ffn_in), layer.edge_norm_ffn)
