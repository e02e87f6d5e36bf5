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
