"""The augmented key set of `graph_attention`: in-edges + dilated window + global nodes, each key
once, in one softmax (the op gtkernels::graph_attention_union and its backward).

The key set K_i of node i is split into disjoint parts:
  edges    E_i: the graph kernel (edge_bias / edge_attr apply);
  band     W_i minus E_i: the window kernel with a per-node exclusion mask [N, 2w+1] (a global
           node's row is fully excluded: it attends all nodes, below);
  globals  the global nodes minus (W_i and E_i), for non-global i: live mask [N, G];
  global rows: global node i attends all nodes minus E_i: live mask [G, N].
Forward: the parts' (out, lse) are merged by log-sum-exp (exact: no key is in two parts).
Backward: with the final lse and delta = dO . O - dlse, the flash-attention gradient of each
part is exact on its own; the parts are summed in a fixed order (deterministic). On CUDA the
band kernel continues the edge part's softmax and takes the global keys (and, backward, the
global queries and the edge part's gradients) in the same pass, and delta is computed once,
by the edge part's kernel; the global rows run as small Triton passes
(gtkernels/triton/graph_union.py). On the CPU the edge and band parts are the
C++ kernels and the global parts plain torch.
The masks are built inside the op with torch ops from the CSR, without host syncs, and kept
for as long as the graph's indices and the global_nodes tensor live (unmodified).
"""
import weakref

import torch

from .triton import HAS_TRITON


def union_attention(q, k, v, g, edge_bias, edge_attr, scale, window, dilation, global_nodes):
    """(out [N, H, D] q's dtype, lse [N, H] fp32 / fp64) of the union; edge tensors in CSR
    order, global_nodes int [G] distinct in [0, N) or None, g coalesced."""
    n = q.shape[0]
    if window > 0:  # bounded by N, keeping the same key set (window 0 would mean no band)
        dilation = min(dilation, max(n, 1))
        window = max(1, min(window, max(n - 1, 0) // dilation))
    else:
        dilation = 1
    return torch.ops.gtkernels.graph_attention_union(
        g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids, q, k, v, edge_bias,
        edge_attr, float(scale), window, dilation, global_nodes)


_MASKS = {}  # (id(indices), id(global_nodes)) -> (weakrefs, stamp, UnionMasks)


def cached_union_masks(indptr, indices, window, dilation, global_nodes):
    """UnionMasks of the CSR (indptr, indices) and global_nodes (int [G] or None), computed
    once for as long as both tensors live unmodified."""
    tensors = (indices,) if global_nodes is None else (indices, global_nodes)
    key = tuple(id(t) for t in tensors)
    stamp = (window, dilation, indptr.numel()) + tuple(t._version for t in tensors)
    entry = _MASKS.get(key)
    if entry is not None and all(r() is t for r, t in zip(entry[0], tensors)) \
            and entry[1] == stamp:
        return entry[2]
    glob = (torch.zeros(0, dtype=torch.long, device=indices.device) if global_nodes is None
            else global_nodes.to(torch.long, copy=True))  # no reference to the key tensor
    masks = UnionMasks(indptr, indices, window, dilation, glob)
    refs = tuple(weakref.ref(t, lambda _: _MASKS.pop(key, None)) for t in tensors)
    _MASKS[key] = (refs, stamp, masks)
    return masks


class UnionMasks:
    """Which keys of each part are live (bool tensors on the graph's device).

    glob: int64 [G], the global nodes.
    band_exclude: [N, 2w+1], True where window key i + t * dilation (column t + w) is an edge
        of i, and on every column of a global node's row (None if window = 0).
    global_keys: [N, G], True where global node g is a key of non-global i outside W_i and E_i.
    global_rows: [G, N], True where node j is a key of global node g outside E_g.
    """

    def __init__(self, indptr, indices, window, dilation, glob):
        n, count, device = indptr.numel() - 1, glob.numel(), indices.device
        self.glob = glob
        dst = torch.repeat_interleave(torch.arange(n, device=device), indptr.diff(),
                                      output_size=indices.numel())
        src = indices.long()
        slot = torch.full((n,), count, dtype=torch.long, device=device)  # G: not global
        slot[glob] = torch.arange(count, device=device)
        is_global = slot < count
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
        edge_from_global[dst, slot[src]] = True
        self.global_keys = ~(seen | edge_from_global[:, :count])
        edge_into_global = torch.zeros((count + 1, n), dtype=torch.bool, device=device)
        edge_into_global[slot[dst], src] = True
        self.global_rows = ~edge_into_global[:count]


def in_window(offset, window, dilation):
    """offset = key - query: inside the window (|t| <= window, offset = t * dilation)?"""
    if window == 0:
        return torch.zeros_like(offset, dtype=torch.bool)
    return (offset % dilation == 0) & (offset.abs() <= window * dilation)


def merge_stacked(outs, lses):
    """One softmax over disjoint key sets from stacked parts: outs [P, ..., D], lses [P, ...]
    -> (out, lse); rows without keys give 0 and -inf. Fixed order: deterministic."""
    shift = lses.amax(0)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    weights = torch.exp(lses - shift)
    total = weights.sum(0)
    has_keys = total > 0
    safe_total = torch.where(has_keys, total, 1.0)
    out = (weights[..., None] * outs).sum(0) / safe_total[..., None]
    return out, torch.where(has_keys, shift + torch.log(safe_total), float("-inf"))


def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_scores(q_rows, keys, live, scale):
    """scale * q . k [R, H, C] in the accumulation dtype, -inf where live [R, C] is False."""
    acc = _accumulation_dtype(q_rows.dtype)
    scores = torch.einsum("rhd,chd->rhc", q_rows.to(acc), keys.to(acc)) * scale
    return scores.masked_fill(~live[:, None, :], float("-inf"))


def _dense_part(q_rows, keys, values, live, scale):
    """(out [R, H, D], lse [R, H]) of q_rows over keys/values [C, H, D] where live [R, C]."""
    scores = _masked_scores(q_rows, keys, live, scale)
    lse = torch.logsumexp(scores, -1)
    prob = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("rhc,chd->rhd", prob, values.to(scores.dtype)), lse


def _dense_part_backward(q_rows, keys, values, grad_out, lse, delta, live, scale):
    """(dq [R, H, D], dk, dv [C, H, D]) of _dense_part given the final lse and delta."""
    scores = _masked_scores(q_rows, keys, live, scale)
    prob = torch.exp(scores - lse[..., None]).masked_fill(~live[:, None, :], 0.0)
    grad_out = grad_out.to(scores.dtype)
    dscore = prob * (torch.einsum("rhd,chd->rhc", grad_out, values.to(scores.dtype))
                     - delta[..., None])
    return (torch.einsum("rhc,chd->rhd", dscore, keys.to(scores.dtype)) * scale,
            torch.einsum("rhc,rhd->chd", dscore, q_rows.to(scores.dtype)) * scale,
            torch.einsum("rhc,rhd->chd", prob, grad_out))


def _on_triton(q):
    return q.device.type == "cuda" and HAS_TRITON


def _union_forward(indptr, indices, csc_indptr, csc_indices, csc_edge_ids, q, k, v, edge_bias,
                   edge_attr, scale, window, dilation, global_nodes):
    graph = (indptr, indices, csc_indptr, csc_indices, csc_edge_ids)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # one copy for all the parts
    masks = cached_union_masks(indptr, indices, window, dilation, global_nodes)
    glob, global_keys, global_rows = masks.glob, masks.global_keys, masks.global_rows
    edge_part = torch.ops.gtkernels.graph_attention(*graph, q, k, v, edge_bias, edge_attr, scale)
    if _on_triton(q):
        from .triton.graph_union import union_forward

        return union_forward(q, k, v, masks, edge_part, window, dilation, scale)
    acc = _accumulation_dtype(q.dtype)
    parts = [edge_part]
    if window > 0:
        out, lse = torch.ops.gtkernels.window_attention(q[None], k[None], v[None], window,
                                                        dilation, 0, False, scale,
                                                        masks.band_exclude)
        parts.append((out[0], lse[0]))
    if glob.numel() > 0:
        parts.append(_dense_part(q, k[glob], v[glob], global_keys, scale))
    out, lse = merge_stacked(torch.stack([o.to(acc) for o, _ in parts]),
                             torch.stack([lse.to(acc) for _, lse in parts]))
    if glob.numel() > 0:
        rows = _dense_part(q[glob], k, v, global_rows, scale)
        out[glob], lse[glob] = merge_stacked(torch.stack([out[glob], rows[0]]),
                                             torch.stack([lse[glob], rows[1]]))
    return out.to(q.dtype), lse


def _union_backward(grad_out, grad_lse, q, k, v, out, lse, indptr, indices, csc_indptr,
                    csc_indices, csc_edge_ids, edge_bias, edge_attr, scale, window, dilation,
                    global_nodes):
    graph = (indptr, indices, csc_indptr, csc_indices, csc_edge_ids)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    masks = cached_union_masks(indptr, indices, window, dilation, global_nodes)
    glob, global_keys, global_rows = masks.glob, masks.global_keys, masks.global_rows
    if _on_triton(q):
        from .triton.graph_union import union_backward

        return union_backward(grad_out, grad_lse, q, k, v, out, lse, graph, edge_bias,
                              edge_attr, masks, window, dilation, scale)
    dq, dk, dv, d_bias, d_attr = torch.ops.gtkernels.graph_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, *graph, edge_bias, edge_attr, scale)
    acc = _accumulation_dtype(q.dtype)
    dq, dk, dv = dq.to(acc), dk.to(acc), dv.to(acc)
    if window > 0:
        band_grads = torch.ops.gtkernels.window_attention_backward(
            grad_out[None], None if grad_lse is None else grad_lse[None], q[None], k[None],
            v[None], out[None], lse[None], window, dilation, 0, False, scale,
            masks.band_exclude)
        dq, dk, dv = dq + band_grads[0][0], dk + band_grads[1][0], dv + band_grads[2][0]
    if glob.numel() > 0:
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        dq_c, dk_c, dv_c = _dense_part_backward(q, k[glob], v[glob], grad_out, lse, delta,
                                                global_keys, scale)
        dq_d, dk_d, dv_d = _dense_part_backward(q[glob], k, v, grad_out[glob], lse[glob],
                                                delta[glob], global_rows, scale)
        dq, dk, dv = dq + dq_c, dk + dk_d, dv + dv_d
        dq[glob] += dq_d
        dk[glob] += dk_c
        dv[glob] += dv_c
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), d_bias, d_attr


def _union_forward_fake(indptr, indices, csc_indptr, csc_indices, csc_edge_ids, q, k, v,
                        edge_bias, edge_attr, scale, window, dilation, global_nodes):
    lse_dtype = _accumulation_dtype(q.dtype)
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:2], dtype=lse_dtype)


def _union_backward_fake(grad_out, grad_lse, q, k, v, out, lse, indptr, indices, csc_indptr,
                         csc_indices, csc_edge_ids, edge_bias, edge_attr, *options):
    grads = [torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)]
    d_edge_bias = q.new_empty(edge_bias.shape if edge_bias is not None else (0,))
    d_edge_attr = q.new_empty(edge_attr.shape if edge_attr is not None else (0,))
    return (*grads, d_edge_bias, d_edge_attr)


def _setup_context(ctx, inputs, output):
    *graph, q, k, v, edge_bias, edge_attr, scale, window, dilation, global_nodes = inputs
    ctx.save_for_backward(*graph, q, k, v, edge_bias, edge_attr, *output, global_nodes)
    ctx.options = (scale, window, dilation)


def _backward(ctx, grad_out, grad_lse):
    *graph, q, k, v, edge_bias, edge_attr, out, lse, global_nodes = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, d_bias, d_attr = torch.ops.gtkernels.graph_attention_union_backward(
        grad_out, grad_lse, q, k, v, out, lse, *graph, edge_bias, edge_attr, *ctx.options,
        global_nodes)
    return (None,) * 5 + (dq, dk, dv, d_bias if edge_bias is not None else None,
                          d_attr if edge_attr is not None else None) + (None,) * 4


for _name, _impl, _fake in (("graph_attention_union", _union_forward, _union_forward_fake),
                            ("graph_attention_union_backward", _union_backward,
                             _union_backward_fake)):
    torch.library.register_kernel(f"gtkernels::{_name}", ("cpu", "cuda"), _impl)
    torch.library.register_fake(f"gtkernels::{_name}")(_fake)
torch.library.register_autograd("gtkernels::graph_attention_union", _backward,
                                setup_context=_setup_context)
