"""Triton side of graph_attention's union (gtkernels/graph_union.py): the band kernels of
window_attention carry the union (UNION: start from the edge part, add the global keys of each
query and, in the backward, the global queries of each key and the edge part's gradients), and
the list kernels here do the rest: flash-attention over a list of query rows against a list of
key rows, either list being a contiguous range of nodes or the global nodes, with a live mask
([N, G]: global keys of each node; [G, N]: keys of each global node):
  `_list_forward_kernel`: rows of the global nodes over chunks of keys (fp32 partials merged
      in a fixed order) or, without a window, every node from the edge part (INIT) over the
      global keys;
  `_list_dq_kernel`: dq of the global nodes over chunks of keys (partials) or, without a
      window, every node's dq including the edge part's (ADD_PARTS);
  `_list_dkdv_kernel`: dk, dv of the global keys over chunks of queries (partials) or, without
      a window, of every key from the global queries plus the edge part's (ADD_PARTS).
The chunks' fp32 partials are folded into the global nodes' rows by the kernels of
union_partials.py. The backward runs with the final lse and delta = dO . O - dlse, computed
once by the edge part's kernel, so each part's gradient is exact on its own; sums are in fp32
in a fixed order: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from .graph_attn_bwd import graph_attention_backward
from .union_partials import add_global_row_partials, merge_global_rows
from .window_attn import attend_key_list, load_state, window_attention_forward
from .window_attn_backward import window_attention_backward
from .window_attn_backward_tiles import dkdv_query_list, dq_key_list, load_final_lse
from .window_common import (LN2_K, LOG2E, dot_precision, list_rows, load_node_tile, load_rows,
                            prepare_inputs, split_count)

LIST_BLOCK = 16  # tile of the global-node list (G is small)


@triton.jit
def split_range(split, per_split, length):
    lo = split.to(tl.int64) * per_split
    return lo, tl.minimum(lo + per_split, length)


@triton.jit
def _list_forward_kernel(q_ptr, k_ptr, v_ptr, q_list, k_list, live_ptr, init_out, init_lse,
                         out_ptr, lse_ptr, stride_n, stride_h, num_q, num_k, keys_per_split,
                         live_q_stride, H, D, qk_scale, Q_FROM_LIST: tl.constexpr,
                         K_FROM_LIST: tl.constexpr, INIT: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows out_ptr[split * num_q + position] (the query's node row with INIT: one split)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    h = tl.program_id(2)
    q_ok = offs_m < num_q
    q_rows = list_rows(q_list, offs_m, q_ok, Q_FROM_LIST)
    cols = tl.arange(0, BLOCK_D)
    head = h.to(tl.int64) * stride_h
    if INIT:
        m_i, l_i, acc = load_state(init_out, init_lse, q_rows, q_ok, h, H, D, cols)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q = load_rows(q_ptr + head, q_rows, q_ok, stride_n, cols, D)
    lo, hi = split_range(split, keys_per_split, num_k)
    acc, m_i, l_i = attend_key_list(acc, m_i, l_i, q, k_ptr + head, v_ptr + head, k_list,
                                    live_ptr, offs_m, q_ok, lo, hi, live_q_stride, stride_n,
                                    cols, D, qk_scale, K_FROM_LIST, DOT_PRECISION, BLOCK_N)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = split.to(tl.int64) * num_q + offs_m
    tl.store(out_ptr + (rows * H + h)[:, None] * D + cols[None, :],
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None] & (cols < D)[None, :])
    tl.store(lse_ptr + rows * H + h, (m_i + tl.log2(l_safe)) * LN2_K, mask=q_ok)


@triton.jit
def _list_dq_kernel(q_ptr, k_ptr, v_ptr, q_list, k_list, live_ptr, do_ptr, lse_ptr, delta_ptr,
                    init_dq, dq_ptr, stride_n, stride_h, num_q, num_k, keys_per_split,
                    live_q_stride, H, D, qk_scale, scale, Q_FROM_LIST: tl.constexpr,
                    K_FROM_LIST: tl.constexpr, ADD_PARTS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """dq rows dq_ptr[split * num_q + position]; with ADD_PARTS (one split, node rows) plus
    init_dq."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    h = tl.program_id(2)
    q_ok = offs_m < num_q
    q_rows = list_rows(q_list, offs_m, q_ok, Q_FROM_LIST)
    cols = tl.arange(0, BLOCK_D)
    head = h.to(tl.int64) * stride_h
    q = load_rows(q_ptr + head, q_rows, q_ok, stride_n, cols, D)
    do = load_rows(do_ptr + h * D, q_rows, q_ok, H * D, cols, D)
    delta = tl.load(delta_ptr + q_rows * H + h, mask=q_ok, other=0.0)
    lse2 = load_final_lse(lse_ptr, q_rows, q_ok, h, H)
    lo, hi = split_range(split, keys_per_split, num_k)
    dq = dq_key_list(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), q, do, lse2, delta, k_ptr + head,
                     v_ptr + head, k_list, live_ptr, offs_m, q_ok, lo, hi, live_q_stride,
                     stride_n, cols, D, qk_scale, K_FROM_LIST, DOT_PRECISION, BLOCK_N) * scale
    if ADD_PARTS:
        dq += load_node_tile(init_dq, q_rows, q_ok, h, H, D, cols)
    rows = split.to(tl.int64) * num_q + offs_m
    tl.store(dq_ptr + (rows * H + h)[:, None] * D + cols[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=q_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _list_dkdv_kernel(q_ptr, k_ptr, v_ptr, q_list, k_list, live_ptr, do_ptr, lse_ptr, delta_ptr,
                      init_dk, init_dv, dk_ptr, dv_ptr, stride_n, stride_h, num_q, num_k,
                      queries_per_split, live_q_stride, H, D, qk_scale, scale,
                      Q_FROM_LIST: tl.constexpr, K_FROM_LIST: tl.constexpr,
                      ADD_PARTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv rows [split * num_k + position] (the key's node row with ADD_PARTS: one split,
    adding init_dk, init_dv)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    h = tl.program_id(2)
    k_ok = offs_n < num_k
    k_rows = list_rows(k_list, offs_n, k_ok, K_FROM_LIST)
    cols = tl.arange(0, BLOCK_D)
    head = h.to(tl.int64) * stride_h
    k = load_rows(k_ptr + head, k_rows, k_ok, stride_n, cols, D)
    v = load_rows(v_ptr + head, k_rows, k_ok, stride_n, cols, D)
    lo, hi = split_range(split, queries_per_split, num_q)
    dk, dv = dkdv_query_list(tl.zeros([BLOCK_N, BLOCK_D], tl.float32),
                             tl.zeros([BLOCK_N, BLOCK_D], tl.float32), k, v, q_ptr + head,
                             do_ptr, lse_ptr, delta_ptr, q_list, live_ptr, offs_n, k_ok, lo, hi,
                             live_q_stride, stride_n, h, H, cols, D, qk_scale, Q_FROM_LIST,
                             DOT_PRECISION, BLOCK_M)
    dk = dk * scale
    if ADD_PARTS:
        dk += load_node_tile(init_dk, k_rows, k_ok, h, H, D, cols)
        dv += load_node_tile(init_dv, k_rows, k_ok, h, H, D, cols)
    rows = split.to(tl.int64) * num_k + offs_n
    tile = (rows * H + h)[:, None] * D + cols[None, :]
    tile_ok = k_ok[:, None] & (cols < D)[None, :]
    tl.store(dk_ptr + tile, dk.to(dk_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dv_ptr + tile, dv.to(dv_ptr.dtype.element_ty), mask=tile_ok)


class Launch:
    """Arguments of the union's Triton passes for q, k, v [N, H, D] and a graph_union.UnionMasks;
    also the `union` argument of the window launchers (init_* set by the caller)."""

    def __init__(self, q, k, v, masks, scale):
        self.q, self.k, self.v = prepare_inputs(q, k, v)
        self.n, self.heads, self.dim = q.shape
        self.glob, self.count = masks.glob, masks.glob.numel()
        self.keys_live = masks.global_keys.view(torch.uint8)  # [N, G]: global keys of nodes
        self.rows_live = masks.global_rows.view(torch.uint8)  # [G, N]: global nodes' keys
        if self.count == 0:  # never read; empty tensors may have no valid device pointer
            self.glob = self.keys_live = self.rows_live = self.q
        self.node_block = 16 if interpreting() else 64
        self.qk_scale, self.scale = scale * LOG2E, scale
        self.options = dict(DOT_PRECISION=dot_precision(q.dtype),
                            BLOCK_D=max(16, triton.next_power_of_2(self.dim)), num_warps=4)

    def strides(self):
        return (self.q.stride(0), self.q.stride(1))

    def grid(self, length, block, splits=1):
        return (triton.cdiv(length, block), splits, self.heads)

    def splits(self):
        """(chunks, chunk length) of the node axis for the fp32 partials of the globals."""
        return split_count(self.n, self.count, self.heads, self.node_block)


def union_forward(q, k, v, masks, edge_part, window, dilation, scale):
    """Final (out [N, H, D] q's dtype, lse [N, H] fp32) of the union from the edge part
    (out, lse): band (window > 0, masks.band_exclude), global keys, global rows."""
    run = Launch(q, k, v, masks, scale)
    if run.n == 0:
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)
    run.init_out, run.init_lse = (t.contiguous() for t in edge_part)
    if window > 0:
        out, lse = window_attention_forward(run.q[None], run.k[None], run.v[None], window,
                                            dilation, 0, False, scale, masks.band_exclude, run)
        out, lse = out[0], lse[0]
    else:
        out = q.new_empty(q.shape)
        lse = q.new_empty(q.shape[:2], dtype=torch.float32)
        _list_forward_kernel[run.grid(run.n, run.node_block)](
            run.q, run.k, run.v, run.glob, run.glob, run.keys_live, run.init_out, run.init_lse,
            out, lse, *run.strides(), run.n, run.count, max(run.count, 1), run.count,
            run.heads, run.dim, run.qk_scale, Q_FROM_LIST=False, K_FROM_LIST=True, INIT=True,
            BLOCK_M=run.node_block, BLOCK_N=LIST_BLOCK, **run.options)
    if run.count == 0:
        return out, lse
    splits, per_split = run.splits()
    part_out = q.new_empty((splits, run.count, run.heads, run.dim), dtype=torch.float32)
    part_lse = q.new_empty((splits, run.count, run.heads), dtype=torch.float32)
    _list_forward_kernel[run.grid(run.count, LIST_BLOCK, splits)](
        run.q, run.k, run.v, run.glob, run.glob, run.rows_live, out, lse, part_out, part_lse,
        *run.strides(), run.count, run.n, per_split, run.n, run.heads, run.dim, run.qk_scale,
        Q_FROM_LIST=True, K_FROM_LIST=False, INIT=False, BLOCK_M=LIST_BLOCK,
        BLOCK_N=run.node_block, **run.options)
    merge_global_rows(out, lse, run.glob, part_out, part_lse)
    return out, lse


def union_backward(grad_out, grad_lse, q, k, v, out, lse, graph, edge_bias, edge_attr, masks,
                   window, dilation, scale):
    """(dq, dk, dv [N, H, D] in q's dtype, d_edge_bias, d_edge_attr) of the union given the
    final out, lse; graph = (indptr, indices, csc_indptr, csc_indices, csc_edge_ids). The edge
    part's kernel runs first and computes delta = dO . O - dlse for all the passes."""
    grad_out = grad_out.to(q.dtype).contiguous()
    out, lse = out.contiguous(), lse.float().contiguous()
    grad_lse = None if grad_lse is None else grad_lse.float().contiguous()
    delta = torch.empty_like(lse)
    dq, dk, dv, d_edge_bias, d_edge_attr = graph_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, *graph, edge_bias, edge_attr, scale, delta=delta)
    if q.numel() == 0:
        return dq, dk, dv, d_edge_bias, d_edge_attr
    run = Launch(q, k, v, masks, scale)
    run.init_dq, run.init_dk, run.init_dv, run.delta = dq, dk, dv, delta
    scales = (run.heads, run.dim, run.qk_scale, scale)
    if window > 0:
        grads = [t[0] for t in window_attention_backward(
            grad_out[None], None, run.q[None], run.k[None], run.v[None], out[None], lse[None],
            window, dilation, 0, False, scale, masks.band_exclude, run)]
    else:
        grads = [q.new_empty(q.shape) for _ in range(3)]
        _list_dq_kernel[run.grid(run.n, run.node_block)](
            run.q, run.k, run.v, run.glob, run.glob, run.keys_live, grad_out, lse, delta, dq,
            grads[0], *run.strides(), run.n, run.count, max(run.count, 1), run.count, *scales,
            Q_FROM_LIST=False, K_FROM_LIST=True, ADD_PARTS=True, BLOCK_M=run.node_block,
            BLOCK_N=LIST_BLOCK, **run.options)
        _list_dkdv_kernel[run.grid(run.n, run.node_block)](
            run.q, run.k, run.v, run.glob, run.glob, run.rows_live, grad_out, lse, delta, dk,
            dv, grads[1], grads[2], *run.strides(), run.count, run.n, max(run.count, 1), run.n,
            *scales, Q_FROM_LIST=True, K_FROM_LIST=False, ADD_PARTS=True, BLOCK_M=LIST_BLOCK,
            BLOCK_N=run.node_block, **run.options)
    if run.count > 0:
        splits, per_split = run.splits()
        part_dq = q.new_empty((splits, run.count, run.heads, run.dim), dtype=torch.float32)
        part_dk, part_dv = torch.empty_like(part_dq), torch.empty_like(part_dq)
        _list_dq_kernel[run.grid(run.count, LIST_BLOCK, splits)](
            run.q, run.k, run.v, run.glob, run.glob, run.rows_live, grad_out, lse, delta,
            part_dq, part_dq, *run.strides(), run.count, run.n, per_split, run.n, *scales,
            Q_FROM_LIST=True, K_FROM_LIST=False, ADD_PARTS=False, BLOCK_M=LIST_BLOCK,
            BLOCK_N=run.node_block, **run.options)
        _list_dkdv_kernel[run.grid(run.count, LIST_BLOCK, splits)](
            run.q, run.k, run.v, run.glob, run.glob, run.keys_live, grad_out, lse, delta,
            part_dk, part_dv, part_dk, part_dv, *run.strides(), run.n, run.count, per_split,
            run.count, *scales, Q_FROM_LIST=False, K_FROM_LIST=True, ADD_PARTS=False,
            BLOCK_M=run.node_block, BLOCK_N=LIST_BLOCK, **run.options)
        add_global_row_partials(grads, run.glob, (part_dq, part_dk, part_dv))
    return (*grads, d_edge_bias, d_edge_attr)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed): name, constexprs,
# argument types other than the defaults (*bf16 for *_ptr, i32 otherwise).
_LIST_TYPES = {"q_list": "*i64", "k_list": "*i64", "live_ptr": "*u8", "lse_ptr": "*fp32",
               "init_lse": "*fp32", "init_out": "*bf16", "init_dq": "*bf16", "init_dk": "*bf16",
               "init_dv": "*bf16", "qk_scale": "fp32", "scale": "fp32", "delta_ptr": "*fp32",
               }
_BLOCKS = (("DOT_PRECISION", "tf32"), ("BLOCK_D", 32))
_PARTIALS = dict(_LIST_TYPES, out_ptr="*fp32", dq_ptr="*fp32", dk_ptr="*fp32", dv_ptr="*fp32")
COMPILE_CASES = [
    ("_list_forward_kernel", (("Q_FROM_LIST", False), ("K_FROM_LIST", True), ("INIT", True),
                              ("BLOCK_M", 64), ("BLOCK_N", 16)) + _BLOCKS, _LIST_TYPES),
    ("_list_forward_kernel", (("Q_FROM_LIST", True), ("K_FROM_LIST", False), ("INIT", False),
                              ("BLOCK_M", 16), ("BLOCK_N", 64)) + _BLOCKS, _PARTIALS),
    ("_list_dq_kernel", (("Q_FROM_LIST", False), ("K_FROM_LIST", True), ("ADD_PARTS", True),
                         ("BLOCK_M", 64), ("BLOCK_N", 16)) + _BLOCKS,
     _LIST_TYPES),
    ("_list_dq_kernel", (("Q_FROM_LIST", True), ("K_FROM_LIST", False), ("ADD_PARTS", False),
                         ("BLOCK_M", 16), ("BLOCK_N", 64)) + _BLOCKS,
     _PARTIALS),
    ("_list_dkdv_kernel", (("Q_FROM_LIST", True), ("K_FROM_LIST", False), ("ADD_PARTS", True),
                           ("BLOCK_M", 16), ("BLOCK_N", 64)) + _BLOCKS, _LIST_TYPES),
    ("_list_dkdv_kernel", (("Q_FROM_LIST", False), ("K_FROM_LIST", True), ("ADD_PARTS", False),
                           ("BLOCK_M", 64), ("BLOCK_N", 16)) + _BLOCKS, _PARTIALS),
]
