"""References of graph attention: per-edge gather + segment softmax (PyG TransformerConv's
core, in plain torch), and dense attention with the adjacency as mask. Both differentiable,
runnable in float64."""
import torch


def segment_softmax_attention(q, k, v, edge_index, edge_bias=None, edge_attr=None, scale=None,
                              return_lse=False):
    """q, k, v [N, H, D]; edge_index int [2, E] (row 0 source j, row 1 destination i);
    edge_bias [E, H]; edge_attr [E, H, D]. Materialises [E, H, D] per-edge tensors."""
    n, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    src, dst = edge_index[0].long(), edge_index[1].long()
    keys, values = k[src], v[src]
    if edge_attr is not None:
        keys, values = keys + edge_attr, values + edge_attr
    scores = (q[dst] * keys).sum(-1) * scale  # [E, H]
    if edge_bias is not None:
        scores = scores + edge_bias
    row_max = torch.full((n, h), float("-inf"), dtype=scores.dtype, device=q.device)
    row_max = row_max.scatter_reduce(0, dst[:, None].expand(-1, h), scores.detach(), "amax")
    prob = torch.exp(scores - row_max[dst])
    denom = torch.zeros((n, h), dtype=scores.dtype, device=q.device).index_add(0, dst, prob)
    weighted = prob[..., None] * values  # fp32 under autocast (exp runs in fp32 there)
    acc = torch.zeros(q.shape, dtype=weighted.dtype, device=q.device).index_add(0, dst, weighted)
    out = (acc / torch.where(denom > 0, denom, 1.0)[..., None]).to(q.dtype)
    if not return_lse:
        return out
    return out, row_max + torch.log(denom)


def dense_masked_attention(q, k, v, edge_index, scale=None):
    """Dense [H, N, N] attention whose mask is the edge-count matrix: a duplicate edge j -> i
    adds log(count) to the score, i.e. counts as separate terms. Rows without keys give 0."""
    n, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    counts = torch.zeros(n, n, dtype=q.dtype, device=q.device)
    counts.index_put_((edge_index[1].long(), edge_index[0].long()),
                      torch.ones(edge_index.shape[1], dtype=q.dtype, device=q.device),
                      accumulate=True)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale + torch.log(counts)
    has_keys = counts.sum(1) > 0
    prob = torch.softmax(torch.where(has_keys[:, None], scores, 0.0), dim=-1) * has_keys[:, None]
    return torch.einsum("hij,jhd->ihd", prob, v)


def union_key_mask(n, edge_index, window=0, dilation=1, global_nodes=None, device=None):
    """bool [N, N]: mask[i, j] when j is a key of i in graph_attention's augmented set: an
    edge j -> i, j = i + t * dilation with |t| <= window (window > 0), or i or j global."""
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[edge_index[1].long(), edge_index[0].long()] = True
    if window > 0:
        diff = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None]
        mask |= (diff % dilation == 0) & (diff.abs() <= window * dilation)
    if global_nodes is not None:
        mask[:, global_nodes.long()] = True
        mask[global_nodes.long(), :] = True
    return mask


def dense_union_attention(q, k, v, edge_index, edge_bias=None, edge_attr=None, scale=None,
                          window=0, dilation=1, global_nodes=None):
    """Dense [H, N, N] reference of the augmented graph attention (distinct edges): scores
    scale * q_i . k_j on every key of union_key_mask, plus scale * q_i . edge_attr_e +
    edge_bias_e on edge keys, whose values get + edge_attr_e. Returns (out [N, H, D],
    lse [N, H]); rows without keys give 0 and -inf."""
    n, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    src, dst = edge_index[0].long(), edge_index[1].long()
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    edge_scores = torch.zeros(src.numel(), h, dtype=q.dtype, device=q.device)
    if edge_attr is not None:
        edge_scores = edge_scores + (q[dst] * edge_attr).sum(-1) * scale
    if edge_bias is not None:
        edge_scores = edge_scores + edge_bias
    extra = torch.zeros_like(scores).index_put((torch.arange(h)[:, None], dst[None], src[None]),
                                               edge_scores.T)
    mask = union_key_mask(n, edge_index, window, dilation, global_nodes, q.device)
    scores = (scores + extra).masked_fill(~mask, float("-inf"))
    has_keys = mask.any(1)
    prob = torch.softmax(torch.where(has_keys[:, None], scores, 0.0), -1) * has_keys[:, None]
    out = torch.einsum("hij,jhd->ihd", prob, v)
    if edge_attr is not None:
        out = out.index_add(0, dst, prob[:, dst, src].T[..., None] * edge_attr)
    return out, torch.logsumexp(scores, -1).T
