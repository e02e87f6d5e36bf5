"""The augmented key set of `graph_attention`: in-edges + dilated window + global nodes, each key
once, in one softmax.

The key set of query i is split into disjoint parts, each computed by its own kernel and
returning (out, lse); the parts are merged by log-sum-exp (exact, since no key is in two parts):
  edges    E_i: the graph kernel (edge_bias / edge_attr apply);
  band     W_i minus E_i: the window kernel with a per-node exclusion mask [N, 2w+1]
           (a global node's row is fully excluded: its keys are all nodes, below);
  globals  G minus (W_i and E_i), for non-global i: dense [N, G] block;
  global rows: a global node i attends all nodes minus E_i: dense [G, N] block.
Masks are built with torch ops from the CSR, without host syncs. The backward of each part is
its kernel's (deterministic), chained by autograd through the merge.
"""
import torch



def union_attention(q, k, v, g, edge_bias, edge_attr, scale, window, dilation, global_nodes):
    """(out [N, H, D] q's dtype, lse [N, H] fp32 / fp64) of the union; edge tensors in CSR
    order, global_nodes int64 [G] distinct in [0, N) or None, g coalesced."""
    n = q.shape[0]
    glob = (global_nodes.long() if global_nodes is not None
            else torch.zeros(0, dtype=torch.long, device=q.device))
    if window > 0:  # bounded by N, keeping the same key set (window 0 would mean no band)
        dilation = min(dilation, max(n, 1))
        window = max(1, min(window, max(n - 1, 0) // dilation))
    else:
        dilation = 1
    masks = UnionMasks(g, window, dilation, glob)
    parts = [torch.ops.gtkernels.graph_attention(
        g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids, q, k, v, edge_bias,
        edge_attr, float(scale))]
    if window > 0:
        out, lse = torch.ops.gtkernels.window_attention(
            q[None], k[None], v[None], window, dilation, 0, False, float(scale),
            masks.band_exclude)
        parts.append((out[0], lse[0]))
    if glob.numel() > 0:
        parts.append(dense_part(q, k[glob], v[glob], masks.global_keys, scale))
        out, lse = dense_part(q[glob], k, v, masks.global_rows, scale)
        parts.append((torch.cat([out, out.new_zeros((1,) + out.shape[1:])])[masks.slot],
                      torch.cat([lse, lse.new_full((1,) + lse.shape[1:], float("-inf"))])
                      [masks.slot]))
    out, lse = merge_parts(parts)
    return out.to(q.dtype), lse


class UnionMasks:
    """Which keys of each part are live (bool tensors on the graph's device).

    slot: int64 [N], the index of node i in global_nodes, G if i is not global.
    band_exclude: [N, 2w+1], True where window key i + t * dilation (column t + w) is an edge
        of i, and on every column of a global node's row (None if window = 0).
    global_keys: [N, G], True where global node g is a key of non-global i outside W_i and E_i.
    global_rows: [G, N], True where node j is a key of global node g outside E_g.
    """

    def __init__(self, g, window, dilation, glob):
        n, count, device = g.num_nodes, glob.numel(), g.device
        dst = torch.repeat_interleave(torch.arange(n, device=device), g.indptr.diff(),
                                      output_size=g.num_edges)
        src = g.indices.long()
        self.slot = torch.full((n,), count, dtype=torch.long, device=device)
        self.slot[glob] = torch.arange(count, device=device)
        is_global = self.slot < count
        self.band_exclude = None
        if window > 0:
            in_band = in_window(src - dst, window, dilation)
            column = torch.where(in_band, (src - dst) // dilation + window, 2 * window + 1)
            exclude = torch.zeros((n, 2 * window + 2), dtype=torch.bool, device=device)
            exclude[dst, column] = True
            self.band_exclude = (exclude[:, :-1] | is_global[:, None]).contiguous()
        nodes = torch.arange(n, device=device)
        seen = in_window(glob[None, :] - nodes[:, None], window, dilation) | is_global[:, None]
        edge_from_global = torch.zeros((n, count + 1), dtype=torch.bool, device=device)
        edge_from_global[dst, self.slot[src]] = True
        self.global_keys = ~(seen | edge_from_global[:, :count])
        edge_into_global = torch.zeros((count + 1, n), dtype=torch.bool, device=device)
        edge_into_global[self.slot[dst], src] = True
        self.global_rows = ~edge_into_global[:count]


def in_window(offset, window, dilation):
    """offset = key - query: inside the window (|t| <= window, offset = t * dilation)?"""
    if window == 0:
        return torch.zeros_like(offset, dtype=torch.bool)
    return (offset % dilation == 0) & (offset.abs() <= window * dilation)


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_part(q_rows, keys, values, live, scale):
    """Masked softmax attention of q_rows [R, H, D] over keys/values [C, H, D] where live [R, C]
    -> (out [R, H, D], lse [R, H]) in the accumulation dtype; rows without keys give 0, -inf."""
    acc = accumulation_dtype(q_rows.dtype)
    scores = torch.einsum("rhd,chd->rhc", q_rows.to(acc), keys.to(acc)) * scale
    scores = scores.masked_fill(~live[:, None, :], float("-inf"))
    row_max = scores.detach().amax(-1, keepdim=True)
    prob = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, 0.0))
    return normalise(torch.einsum("rhc,chd->rhd", prob, values.to(acc)), prob.sum(-1),
                     torch.where(torch.isfinite(row_max), row_max, 0.0)[..., 0])


def normalise(acc, total, shift):
    """(acc / total, shift + log total), and (0, -inf) where total = 0."""
    has_keys = total > 0
    safe_total = torch.where(has_keys, total, 1.0)
    lse = torch.where(has_keys, shift + torch.log(safe_total), float("-inf"))
    return acc / safe_total[..., None], lse


def merge_parts(parts):
    """One softmax over disjoint key sets given each set's (out [N, H, D], lse [N, H])."""
    acc = accumulation_dtype(parts[0][0].dtype)
    lses = torch.stack([lse.to(acc) for _, lse in parts])
    shift = lses.detach().amax(0)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    weights = torch.exp(lses - shift)
    merged = sum(w[..., None] * out.to(acc) for w, (out, _) in zip(weights, parts))
    return normalise(merged, weights.sum(0), shift)
