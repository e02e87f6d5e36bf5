"""Triton kernels of the global-node parts of graph_attention's union (the CUDA side of
gtkernels/graph_union.py), and the sums that finish the union's outputs and gradients.

Each kernel is flash-attention over a list of query rows against a list of key rows, either
list being a contiguous range of nodes or the global nodes, with a live mask ([N, G] for the
global keys of every node, [G, N] for the keys of the global nodes):
  `_list_forward_kernel` starts from the merged (out, lse) of the edge and band parts (INIT) or
      from nothing (partials over key chunks, merged by the launcher in a fixed order);
  `_list_dq_kernel` computes delta = dO . O - dlse (COMPUTE_DELTA) and dq, adding the dq of the
      edge and band parts (ADD_PARTS) or writing partials over key chunks;
  `_list_dkdv_kernel` computes dk, dv, adding the edge and band parts' or writing partials.
The backward uses the final lse and delta, so each part's gradient is exact on its own and
the parts are summed in fp32 in a fixed order: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from ..graph_union import merge_stacked
from . import interpreting
from .window_attn import (LN2_K, LOG2E, LOG2E_K, attend_tile, dot_precision, load_rows,
                          prepare_inputs, split_count)
from .window_attn_backward import dkdv_tile, dq_tile

LIST_BLOCK = 16  # tile of the global-node list (G is small)


@triton.jit
def list_rows(list_ptr, offs, ok, FROM_LIST: tl.constexpr):
    """Node ids of list positions offs: list_ptr[offs] or offs itself (int64)."""
    if FROM_LIST:
        return tl.load(list_ptr + offs, mask=ok, other=0).to(tl.int64)
    return offs.to(tl.int64)


@triton.jit
def load_live(live_ptr, q_offs, k_offs, q_ok, k_ok, live_q_stride):
    """bool [len(q_offs), len(k_offs)] of the live mask at (query position, key position)."""
    ptrs = live_ptr + q_offs.to(tl.int64)[:, None] * live_q_stride + k_offs[None, :]
    return tl.load(ptrs, mask=q_ok[:, None] & k_ok[None, :], other=0) != 0


@triton.jit
def load_node_tile(ptr, rows, ok, h, H, D, cols):
    """[len(rows), BLOCK_D] fp32 of a contiguous [N, H, D] tensor at head h."""
    return tl.load(ptr + (rows * H + h)[:, None] * D + cols[None, :],
                   mask=ok[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def load_state(out_ptr, lse_ptr, rows, ok, h, H, D, cols):
    """Online-softmax state (m, l, acc) of a part's (out, lse) in the log2 domain; rows with
    lse = -inf (no keys) give m = -inf, l = 0, acc = 0."""
    m = tl.load(lse_ptr + rows * H + h, mask=ok, other=float("-inf")) * LOG2E_K
    weight = tl.where(m == float("-inf"), 0.0, 1.0)
    return m, weight, load_node_tile(out_ptr, rows, ok, h, H, D, cols) * weight[:, None]


@triton.jit
def merge_state(m_a, l_a, acc_a, m_b, l_b, acc_b):
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    alpha = tl.exp2(m_a - m_safe)
    beta = tl.exp2(m_b - m_safe)
    return m, l_a * alpha + l_b * beta, acc_a * alpha[:, None] + acc_b * beta[:, None]


@triton.jit
def load_list_rows(list_ptr, pos, ok, FROM_LIST: tl.constexpr, a_ptr, a_stride, b_ptr, b_stride,
                   cols, D):
    """Node rows of list positions `pos` (list_ptr[pos], or pos itself) and the [len(pos),
    BLOCK_D] tiles of two row-strided tensors there (k and v, or q and dO)."""
    rows = list_rows(list_ptr, pos, ok, FROM_LIST)
    return (rows, load_rows(a_ptr, rows, ok, a_stride, cols, D),
            load_rows(b_ptr, rows, ok, b_stride, cols, D))


@triton.jit
def load_final_lse(lse_ptr, rows, ok, h, H):
    """Final lse in the log2 domain, +inf on rows without keys (so that p = 0 there)."""
    lse2 = tl.load(lse_ptr + rows * H + h, mask=ok, other=0.0) * LOG2E_K
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def split_range(split, per_split, length):
    lo = split.to(tl.int64) * per_split
    return lo, tl.minimum(lo + per_split, length)


@triton.jit
def _list_forward_kernel(q_ptr, k_ptr, v_ptr, q_list, k_list, live_ptr, a_out, a_lse, b_out,
                         b_lse, out_ptr, lse_ptr, stride_n, stride_h, num_q, num_k, keys_per_split,
                         live_q_stride, H, D, qk_scale, Q_FROM_LIST: tl.constexpr,
                         K_FROM_LIST: tl.constexpr, INIT: tl.constexpr, HAS_B: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows out_ptr[split * num_q + position] (q's node row with INIT, which needs one split)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    h = tl.program_id(2)
    q_ok = offs_m < num_q
    q_rows = list_rows(q_list, offs_m, q_ok, Q_FROM_LIST)
    cols = tl.arange(0, BLOCK_D)
    head = h.to(tl.int64) * stride_h
    if INIT:
        m_i, l_i, acc = load_state(a_out, a_lse, q_rows, q_ok, h, H, D, cols)
        if HAS_B:
            m_b, l_b, acc_b = load_state(b_out, b_lse, q_rows, q_ok, h, H, D, cols)
            m_i, l_i, acc = merge_state(m_i, l_i, acc, m_b, l_b, acc_b)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q = load_rows(q_ptr + head, q_rows, q_ok, stride_n, cols, D)
    lo, hi = split_range(split, keys_per_split, num_k)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ok = offs_n < hi
        _, k, v = load_list_rows(k_list, offs_n, k_ok, K_FROM_LIST, k_ptr + head, stride_n,
                                 v_ptr + head, stride_n, cols, D)
        live = load_live(live_ptr, offs_m, offs_n, q_ok, k_ok, live_q_stride)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, live, qk_scale, True, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = split.to(tl.int64) * num_q + offs_m
    tl.store(out_ptr + (rows * H + h)[:, None] * D + cols[None, :],
             (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None] & (cols < D)[None, :])
    tl.store(lse_ptr + rows * H + h, (m_i + tl.log2(l_safe)) * LN2_K, mask=q_ok)


@triton.jit
def _list_dq_kernel(q_ptr, k_ptr, v_ptr, q_list, k_list, live_ptr, out_ptr, do_ptr, lse_ptr,
                    grad_lse_ptr, delta_ptr, a_dq, b_dq, dq_ptr, stride_n, stride_h, num_q, num_k,
                    keys_per_split, live_q_stride, H, D, qk_scale, scale,
                    Q_FROM_LIST: tl.constexpr, K_FROM_LIST: tl.constexpr,
                    COMPUTE_DELTA: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
                    ADD_PARTS: tl.constexpr, HAS_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq rows dq_ptr[split * num_q + position] (q's node row with ADD_PARTS, one split)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    h = tl.program_id(2)
    q_ok = offs_m < num_q
    cols = tl.arange(0, BLOCK_D)
    head = h.to(tl.int64) * stride_h
    q_rows, q, do = load_list_rows(q_list, offs_m, q_ok, Q_FROM_LIST, q_ptr + head, stride_n,
                                   do_ptr + h * D, H * D, cols, D)
    if COMPUTE_DELTA:
        delta = tl.sum(do.to(tl.float32) * load_node_tile(out_ptr, q_rows, q_ok, h, H, D, cols), 1)
        if HAS_GRAD_LSE:
            delta -= tl.load(grad_lse_ptr + q_rows * H + h, mask=q_ok, other=0.0)
        tl.store(delta_ptr + q_rows * H + h, delta, mask=q_ok)
    else:
        delta = tl.load(delta_ptr + q_rows * H + h, mask=q_ok, other=0.0)
    lse2 = load_final_lse(lse_ptr, q_rows, q_ok, h, H)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = split_range(split, keys_per_split, num_k)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ok = offs_n < hi
        _, k, v = load_list_rows(k_list, offs_n, k_ok, K_FROM_LIST, k_ptr + head, stride_n,
                                 v_ptr + head, stride_n, cols, D)
        live = load_live(live_ptr, offs_m, offs_n, q_ok, k_ok, live_q_stride)
        dq = dq_tile(dq, q, do, lse2, delta, k, v, live, qk_scale, True, DOT_PRECISION)
    dq = dq * scale
    if ADD_PARTS:
        dq += load_node_tile(a_dq, q_rows, q_ok, h, H, D, cols)
        if HAS_B:
            dq += load_node_tile(b_dq, q_rows, q_ok, h, H, D, cols)
    rows = split.to(tl.int64) * num_q + offs_m
    tl.store(dq_ptr + (rows * H + h)[:, None] * D + cols[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=q_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _list_dkdv_kernel(q_ptr, k_ptr, v_ptr, q_list, k_list, live_ptr, do_ptr, lse_ptr, delta_ptr,
                      a_dk, a_dv, b_dk, b_dv, dk_ptr, dv_ptr, stride_n, stride_h, num_q, num_k,
                      queries_per_split, live_q_stride, H, D, qk_scale, scale,
                      Q_FROM_LIST: tl.constexpr, K_FROM_LIST: tl.constexpr,
                      ADD_PARTS: tl.constexpr, HAS_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv rows [split * num_k + position] (k's node row with ADD_PARTS, one split)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    h = tl.program_id(2)
    k_ok = offs_n < num_k
    cols = tl.arange(0, BLOCK_D)
    head = h.to(tl.int64) * stride_h
    k_rows, k, v = load_list_rows(k_list, offs_n, k_ok, K_FROM_LIST, k_ptr + head, stride_n,
                                  v_ptr + head, stride_n, cols, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = split_range(split, queries_per_split, num_q)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_ok = offs_m < hi
        q_rows, q, do = load_list_rows(q_list, offs_m, q_ok, Q_FROM_LIST, q_ptr + head,
                                       stride_n, do_ptr + h * D, H * D, cols, D)
        lse2 = load_final_lse(lse_ptr, q_rows, q_ok, h, H)
        delta = tl.load(delta_ptr + q_rows * H + h, mask=q_ok, other=0.0)
        live_t = tl.load(live_ptr + offs_m.to(tl.int64)[None, :] * live_q_stride
                         + offs_n[:, None], mask=q_ok[None, :] & k_ok[:, None], other=0) != 0
        dk, dv = dkdv_tile(dk, dv, k, v, q, do, lse2, delta, live_t, qk_scale, True,
                           DOT_PRECISION)
    dk = dk * scale
    if ADD_PARTS:
        dk += load_node_tile(a_dk, k_rows, k_ok, h, H, D, cols)
        dv += load_node_tile(a_dv, k_rows, k_ok, h, H, D, cols)
        if HAS_B:
            dk += load_node_tile(b_dk, k_rows, k_ok, h, H, D, cols)
            dv += load_node_tile(b_dv, k_rows, k_ok, h, H, D, cols)
    rows = split.to(tl.int64) * num_k + offs_n
    tile = (rows * H + h)[:, None] * D + cols[None, :]
    tile_ok = k_ok[:, None] & (cols < D)[None, :]
    tl.store(dk_ptr + tile, dk.to(dk_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dv_ptr + tile, dv.to(dv_ptr.dtype.element_ty), mask=tile_ok)


class Launch:
    """Shared arguments of the list kernels for q, k, v [N, H, D] and global nodes glob [G]."""

    def __init__(self, q, k, v, masks, scale):
        self.q, self.k, self.v = prepare_inputs(q, k, v)
        self.n, self.heads, self.dim = q.shape
        self.glob, self.count = masks.glob, masks.glob.numel()
        self.global_keys = masks.global_keys.view(torch.uint8)  # [N, G]: global keys of nodes
        self.global_rows = masks.global_rows.view(torch.uint8)  # [G, N]: global nodes' keys
        self.node_block = 16 if interpreting() else 64
        self.scale = scale
        self.options = dict(DOT_PRECISION=dot_precision(q.dtype),
                            BLOCK_D=max(16, triton.next_power_of_2(self.dim)), num_warps=4)

    def head_args(self):
        return (self.q.stride(0), self.q.stride(1))

    def grid(self, length, block, splits=1):
        return (triton.cdiv(length, block), splits, self.heads)

    def splits(self):
        """(chunks, chunk length) of the node axis for the fp32 partials of the globals."""
        return split_count(self.n, self.count, self.heads, self.node_block)


def union_forward(q, k, v, masks, edge_part, band_part, scale):
    """Final (out [N, H, D] q's dtype, lse [N, H] fp32) of the union from the edge part and
    the optional band part ((out, lse) each), adding the global keys of every node and the
    keys of the global nodes (masks: a graph_union.UnionMasks)."""
    run = Launch(q, k, v, masks, scale)
    glob = run.glob
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:2], dtype=torch.float32)
    if run.n == 0:
        return out, lse
    a_out, a_lse = (t.contiguous() for t in edge_part)
    b_out, b_lse = (a_out, a_lse) if band_part is None else (t.contiguous() for t in band_part)
    qk_scale = scale * LOG2E
    _list_forward_kernel[run.grid(run.n, run.node_block)](
        run.q, run.k, run.v, glob, glob, run.global_keys, a_out, a_lse, b_out, b_lse, out, lse,
        *run.head_args(), run.n, run.count, max(run.count, 1), run.count, run.heads, run.dim,
        qk_scale, Q_FROM_LIST=False, K_FROM_LIST=True, INIT=True, HAS_B=band_part is not None,
        BLOCK_M=run.node_block, BLOCK_N=LIST_BLOCK, **run.options)
    if run.count == 0:
        return out, lse
    splits, per_split = run.splits()
    part_out = q.new_empty((splits, run.count, run.heads, run.dim), dtype=torch.float32)
    part_lse = q.new_empty((splits, run.count, run.heads), dtype=torch.float32)
    _list_forward_kernel[run.grid(run.count, LIST_BLOCK, splits)](
        run.q, run.k, run.v, glob, glob, run.global_rows, out, lse, out, lse, part_out, part_lse,
        *run.head_args(), run.count, run.n, per_split, run.n, run.heads, run.dim, qk_scale,
        Q_FROM_LIST=True, K_FROM_LIST=False, INIT=False, HAS_B=False, BLOCK_M=LIST_BLOCK,
        BLOCK_N=run.node_block, **run.options)
    rows_out, rows_lse = merge_stacked(torch.cat([out[glob].float()[None], part_out]),
                                       torch.cat([lse[glob][None], part_lse]))
    out[glob] = rows_out.to(out.dtype)
    lse[glob] = rows_lse
    return out, lse


def union_backward(grad_out, grad_lse, q, k, v, out, lse, masks, edge_grads, band_grads, scale):
    """(dq, dk, dv) [N, H, D] in q's dtype: the edge part's and the optional band part's
    (dq, dk, dv), computed with the final out and lse, plus the global nodes' parts."""
    run = Launch(q, k, v, masks, scale)
    glob = run.glob
    grads = [q.new_empty(q.shape) for _ in range(3)]
    if run.n == 0:
        return grads
    dq, dk, dv = grads
    grad_out = grad_out.to(q.dtype).contiguous()
    out, lse = out.contiguous(), lse.float().contiguous()
    grad_lse = None if grad_lse is None else grad_lse.float().contiguous()
    a_dq, a_dk, a_dv = (t.contiguous() for t in edge_grads)
    b_dq, b_dk, b_dv = (a_dq, a_dk, a_dv) if band_grads is None else (
        t.contiguous() for t in band_grads)
    delta = torch.empty_like(lse)
    common = dict(HAS_B=band_grads is not None, **run.options)
    scales = (run.heads, run.dim, scale * LOG2E, scale)
    _list_dq_kernel[run.grid(run.n, run.node_block)](
        run.q, run.k, run.v, glob, glob, run.global_keys, out, grad_out, lse,
        lse if grad_lse is None else grad_lse, delta, a_dq, b_dq, dq, *run.head_args(), run.n,
        run.count, max(run.count, 1), run.count, *scales, Q_FROM_LIST=False, K_FROM_LIST=True,
        COMPUTE_DELTA=True, HAS_GRAD_LSE=grad_lse is not None, ADD_PARTS=True,
        BLOCK_M=run.node_block, BLOCK_N=LIST_BLOCK, **common)
    _list_dkdv_kernel[run.grid(run.n, run.node_block)](
        run.q, run.k, run.v, glob, glob, run.global_rows, grad_out, lse, delta, a_dk, a_dv, b_dk,
        b_dv, dk, dv, *run.head_args(), run.count, run.n, max(run.count, 1), run.n, *scales,
        Q_FROM_LIST=True, K_FROM_LIST=False, ADD_PARTS=True, BLOCK_M=LIST_BLOCK,
        BLOCK_N=run.node_block, **common)
    if run.count == 0:
        return grads
    splits, per_split = run.splits()
    part_dq = q.new_empty((splits, run.count, run.heads, run.dim), dtype=torch.float32)
    part_dk, part_dv = torch.empty_like(part_dq), torch.empty_like(part_dq)
    parts_only = dict(ADD_PARTS=False, HAS_B=False, **run.options)
    _list_dq_kernel[run.grid(run.count, LIST_BLOCK, splits)](
        run.q, run.k, run.v, glob, glob, run.global_rows, out, grad_out, lse, lse, delta, dq, dq,
        part_dq, *run.head_args(), run.count, run.n, per_split, run.n, *scales,
        Q_FROM_LIST=True, K_FROM_LIST=False, COMPUTE_DELTA=False, HAS_GRAD_LSE=False,
        BLOCK_M=LIST_BLOCK, BLOCK_N=run.node_block, **parts_only)
    _list_dkdv_kernel[run.grid(run.count, LIST_BLOCK, splits)](
        run.q, run.k, run.v, glob, glob, run.global_keys, grad_out, lse, delta, dk, dv, dk, dv,
        part_dk, part_dv, *run.head_args(), run.n, run.count, per_split, run.count, *scales,
        Q_FROM_LIST=False, K_FROM_LIST=True, BLOCK_M=run.node_block, BLOCK_N=LIST_BLOCK,
        **parts_only)
    for grad, part in zip(grads, (part_dq, part_dk, part_dv)):
        grad[glob] = (grad[glob].float() + part.sum(0)).to(grad.dtype)
    return grads


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed): name, constexprs,
# argument types other than the defaults (*bf16 for *_ptr, i32 otherwise).
_LIST_TYPES = {"q_list": "*i64", "k_list": "*i64", "live_ptr": "*u8", "lse_ptr": "*fp32",
               "qk_scale": "fp32", "scale": "fp32", "delta_ptr": "*fp32",
               "grad_lse_ptr": "*fp32"}
_BLOCKS = (("DOT_PRECISION", "tf32"), ("BLOCK_D", 32))
COMPILE_CASES = [
    ("_list_forward_kernel", (("Q_FROM_LIST", False), ("K_FROM_LIST", True), ("INIT", True),
                              ("HAS_B", True), ("BLOCK_M", 64), ("BLOCK_N", 16)) + _BLOCKS,
     dict(_LIST_TYPES, a_out="*bf16", a_lse="*fp32", b_out="*bf16", b_lse="*fp32")),
    ("_list_forward_kernel", (("Q_FROM_LIST", True), ("K_FROM_LIST", False), ("INIT", False),
                              ("HAS_B", False), ("BLOCK_M", 16), ("BLOCK_N", 64)) + _BLOCKS,
     dict(_LIST_TYPES, a_out="*bf16", a_lse="*fp32", b_out="*bf16", b_lse="*fp32",
          out_ptr="*fp32")),
    ("_list_dq_kernel", (("Q_FROM_LIST", False), ("K_FROM_LIST", True), ("COMPUTE_DELTA", True),
                         ("HAS_GRAD_LSE", True), ("ADD_PARTS", True), ("HAS_B", True),
                         ("BLOCK_M", 64), ("BLOCK_N", 16)) + _BLOCKS,
     dict(_LIST_TYPES, a_dq="*bf16", b_dq="*bf16")),
    ("_list_dkdv_kernel", (("Q_FROM_LIST", True), ("K_FROM_LIST", False), ("ADD_PARTS", True),
                           ("HAS_B", True), ("BLOCK_M", 16), ("BLOCK_N", 64)) + _BLOCKS,
     dict(_LIST_TYPES, a_dk="*bf16", a_dv="*bf16", b_dk="*bf16", b_dv="*bf16")),
    ("_list_dkdv_kernel", (("Q_FROM_LIST", False), ("K_FROM_LIST", True), ("ADD_PARTS", False),
                           ("HAS_B", False), ("BLOCK_M", 64), ("BLOCK_N", 16)) + _BLOCKS,
     dict(_LIST_TYPES, a_dk="*bf16", a_dv="*bf16", b_dk="*bf16", b_dv="*bf16",
          dk_ptr="*fp32", dv_ptr="*fp32")),
]
