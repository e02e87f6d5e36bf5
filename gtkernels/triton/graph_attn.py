"""Triton forward of graph_attention (the CUDA kernel of torch.ops.gtkernels.graph_attention).

One program takes BLOCK_S row segments (see graph_schedule) and all heads: it loads q_i once,
walks the segment's edges gathering the contiguous [H, D] rows k_j, v_j, and keeps an online
softmax in fp32 (scores in log2 units). Segments of hub rows write (m, l, acc) partials that
`_softmax_combine_kernel` merges in segment order.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .graph_schedule import cached_segment_schedule

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class LaunchConfig:
    """Tuning knobs of the graph-attention kernels. The loops are latency-bound gathers, so
    the defaults favour many small resident programs: at H=4, D=32 an sm_90 compile gives
    56 / 80 / 48 registers (forward / destination / source pass) at 2 warps, 18 / 12 / 21
    programs per SM (bench/graph_attn_tune.py measures the alternatives)."""
    chunk: int = 512          # edges per segment: bounds the loop of one program, splits hubs
    fwd_tile: int = 256       # BLOCK_S * BLOCK_H * BLOCK_D of a forward program
    bwd_tile: int = 256       # the same for the backward passes
    combine_tile: int = 4096  # BLOCK_P * BLOCK_H * BLOCK_D: partials merged per combine step
    num_warps: int = 2        # of the row / column passes
    combine_warps: int = 4    # of the combines (one program per hub walks all its partials)


DEFAULT_CONFIG = LaunchConfig()


@triton.jit
def _segment_bounds(indptr, seg_row, seg_count, seg_end, part_end, num_rows, num_segments,
                    pid, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    """Row, edge range [start, stop), segment count and partial slot of BLOCK_S segments."""
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    row = tl.load(seg_row + s, mask=s < num_segments, other=num_rows)
    live = row < num_rows
    row = tl.where(live, row, 0)
    count = tl.load(seg_count + row, mask=live, other=1)
    chunk_id = s - (tl.load(seg_end + row, mask=live, other=0) - count)
    row_start = tl.load(indptr + row, mask=live, other=0)
    row_stop = tl.load(indptr + row + 1, mask=live, other=0)
    start = row_start + chunk_id.to(tl.int64) * CHUNK
    stop = tl.where(live, tl.minimum(start + CHUNK, row_stop), start)
    slot = tl.load(part_end + row, mask=live, other=0) - count + chunk_id
    return row.to(tl.int64), live, start, stop, count, slot.to(tl.int64)


@triton.jit
def _head_offsets(H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """(hs [BH], head_ok [BH], hd [1, BH, BD], hd_ok [1, BH, BD]): head ids and the offsets of
    (head, dim) inside a contiguous [H, D] row, with their masks."""
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    head_ok = hs < H
    hd = (hs[:, None] * D + ds[None, :])[None, :, :]
    hd_ok = (head_ok[:, None] & (ds[None, :] < D))[None, :, :]
    return hs, head_ok, hd, hd_ok


@triton.jit
def _edge_key_value(k, v, edge_attr, j, e, on, hd, hd_ok, stride_kv, H, D,
                    HAS_ATTR: tl.constexpr):
    """k_j, v_j [BS, BH, BD] fp32 of sources j [BS] (int64) on edges e where `on`, plus the
    edge features edge_attr[e] with HAS_ATTR."""
    kv_mask = on[:, None, None] & hd_ok
    kv_off = j[:, None, None] * stride_kv + hd
    k_j = tl.load(k + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
    v_j = tl.load(v + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
    if HAS_ATTR:
        a = tl.load(edge_attr + e[:, None, None] * (H * D) + hd, mask=kv_mask,
                    other=0.0).to(tl.float32)
        k_j += a
        v_j += a
    return k_j, v_j


@triton.jit
def _forward_kernel(indptr, indices, q, k, v, edge_bias, edge_attr, out, lse,
                    part_m, part_l, part_acc, seg_row, seg_count, seg_end, part_end,
                    num_rows, num_segments, scale_log2, stride_q, stride_kv,
                    H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_ATTR: tl.constexpr):
    row, live, start, stop, count, slot = _segment_bounds(
        indptr, seg_row, seg_count, seg_end, part_end, num_rows, num_segments,
        tl.program_id(0), BLOCK_S, CHUNK)
    hs, head_ok, hd, hd_ok = _head_offsets(H, D, BLOCK_H, BLOCK_D)
    q_i = tl.load(q + row[:, None, None] * stride_q + hd, mask=live[:, None, None] & hd_ok,
                  other=0.0).to(tl.float32) * scale_log2
    m = tl.full([BLOCK_S, BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_H, BLOCK_D], tl.float32)
    j_next = tl.load(indices + start, mask=start < stop, other=0)
    for t in range(0, tl.max(stop - start, axis=0)):
        e = start + t
        on = e < stop
        j = j_next.to(tl.int64)  # the next source is loaded while this edge's rows arrive
        j_next = tl.load(indices + e + 1, mask=e + 1 < stop, other=0)
        k_j, v_j = _edge_key_value(k, v, edge_attr, j, e, on, hd, hd_ok, stride_kv, H, D,
                                   HAS_ATTR)
        s = tl.sum(q_i * k_j, axis=2)
        if HAS_BIAS:
            b = tl.load(edge_bias + e[:, None] * H + hs[None, :], mask=on[:, None] & head_ok[None, :],
                        other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
        s = tl.where(on[:, None], s, float("-inf"))
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe)
        l = l * alpha + p
        acc = acc * alpha[:, :, None] + p[:, :, None] * v_j
        m = m_new
    whole = live & (count == 1)
    has = l > 0
    res = acc / tl.where(has, l, 1.0)[:, :, None]
    tl.store(out + row[:, None, None] * (H * D) + hd, res.to(out.dtype.element_ty),
             mask=whole[:, None, None] & hd_ok)
    lse_row = tl.where(has, m * 0.6931471805599453 + tl.log(tl.where(has, l, 1.0)),
                       float("-inf"))
    head_mask = head_ok[None, :]
    tl.store(lse + row[:, None] * H + hs[None, :], lse_row, mask=whole[:, None] & head_mask)
    split = live & (count > 1)
    tl.store(part_m + slot[:, None] * H + hs[None, :], m, mask=split[:, None] & head_mask)
    tl.store(part_l + slot[:, None] * H + hs[None, :], l, mask=split[:, None] & head_mask)
    tl.store(part_acc + slot[:, None, None] * (H * D) + hd, acc, mask=split[:, None, None] & hd_ok)


@triton.jit
def _softmax_combine_kernel(split_row, seg_count, part_end, part_m, part_l, part_acc, out, lse,
                            num_rows, H: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """out/lse of one split row from its partials, merged in slot order."""
    row = tl.load(split_row + tl.program_id(0))
    live = row < num_rows
    row = tl.where(live, row, 0).to(tl.int64)
    count = tl.where(live, tl.load(seg_count + row), 0)
    first = tl.load(part_end + row) - count
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    hd = hs[:, None] * D + ds[None, :]                                    # [BH, BD]
    hd_ok = (hs[:, None] < H) & (ds[None, :] < D)
    ps = tl.arange(0, BLOCK_P)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for p0 in range(0, count, BLOCK_P):
        slot = (first + p0 + ps).to(tl.int64)
        mask = ((p0 + ps) < count)[:, None] & (hs < H)[None, :]
        m_p = tl.load(part_m + slot[:, None] * H + hs[None, :], mask=mask, other=float("-inf"))
        m = tl.maximum(m, tl.max(m_p, axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for p0 in range(0, count, BLOCK_P):
        slot = (first + p0 + ps).to(tl.int64)
        mask = ((p0 + ps) < count)[:, None] & (hs < H)[None, :]
        m_p = tl.load(part_m + slot[:, None] * H + hs[None, :], mask=mask, other=float("-inf"))
        w = tl.exp2(m_p - m_safe[None, :])
        l += tl.sum(tl.load(part_l + slot[:, None] * H + hs[None, :], mask=mask, other=0.0) * w,
                    axis=0)
        a = tl.load(part_acc + slot[:, None, None] * (H * D) + hd[None, :, :],
                    mask=mask[:, :, None] & hd_ok[None, :, :], other=0.0)
        acc += tl.sum(a * w[:, :, None], axis=0)
    has = l > 0
    res = acc / tl.where(has, l, 1.0)[:, None]
    tl.store(out + row * (H * D) + hd, res.to(out.dtype.element_ty), mask=live & hd_ok)
    lse_row = tl.where(has, m * 0.6931471805599453 + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(lse + row * H + hs, lse_row, mask=live & (hs < H))


def node_rows(q, k, v):
    """q, k, v as the kernels read them: rows of contiguous [H, D] blocks at any row stride,
    k and v with the same one (q, k, v sliced from one [N, 3, H, D] projection are read in
    place, not copied). Returns (q, k, v, row stride of q, row stride of k and v)."""
    def rows_ok(t):
        return (t.shape[2] == 1 or t.stride(2) == 1) and (t.shape[1] == 1
                                                          or t.stride(1) == t.shape[2])
    if not rows_ok(q):
        q = q.contiguous()
    if not (rows_ok(k) and rows_ok(v) and k.stride(0) == v.stride(0)):
        k, v = k.contiguous(), v.contiguous()
    return q, k, v, q.stride(0), k.stride(0)


def block_sizes(heads, dim, tile_elems):
    """(BLOCK_S, BLOCK_H, BLOCK_D): all heads and dims of BLOCK_S segments per program."""
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(dim)
    return max(1, tile_elems // (block_h * block_d)), block_h, block_d


def graph_attention_forward(indptr, indices, csc_indptr, csc_indices, csc_edge_ids, q, k, v,
                            edge_bias, edge_attr, scale, config=DEFAULT_CONFIG):
    """The CUDA kernel of torch.ops.gtkernels.graph_attention (same arguments and results);
    `config`: LaunchConfig (tests use a small chunk to split rows at small sizes)."""
    q, k, v, stride_q, stride_kv = node_rows(q, k, v)
    n, h, d = q.shape
    out = torch.empty((n, h, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((n, h), device=q.device,
                      dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    if n == 0 or h == 0:
        return out, lse
    sched = cached_segment_schedule(indptr, indices.numel(), config.chunk)
    block_s, block_h, block_d = block_sizes(h, d, config.fwd_tile)
    part_m = torch.empty((sched.num_partials, h), device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((sched.num_partials, h, d), device=q.device, dtype=torch.float32)
    bias = edge_bias.contiguous() if edge_bias is not None else q
    attr = edge_attr.contiguous() if edge_attr is not None else q
    grid = (triton.cdiv(sched.num_segments, block_s),)
    _forward_kernel[grid](
        indptr, indices, q, k, v, bias, attr, out, lse, part_m, part_l, part_acc,
        sched.seg_row, sched.seg_count, sched.seg_end, sched.part_end, n, sched.num_segments,
        scale * LOG2E, stride_q, stride_kv, H=h, D=d, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d,
        CHUNK=config.chunk, HAS_BIAS=edge_bias is not None, HAS_ATTR=edge_attr is not None,
        num_warps=config.num_warps)
    if sched.num_split > 0:
        _softmax_combine_kernel[(sched.num_split,)](
            sched.split_row, sched.seg_count, sched.part_end, part_m, part_l, part_acc, out, lse,
            n, H=h, D=d, BLOCK_P=max(1, config.combine_tile // (block_h * block_d)),
            BLOCK_H=block_h, BLOCK_D=block_d, num_warps=config.combine_warps)
    return out, lse


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed): index arrays int32
# (indptr int64), node tensors bf16, lse / scratch / partials fp32; H=3, D=20 (odd, masked
# tiles) and the bench's H=4, D=32, with the default launch config.
COMPILE_TYPES = {
    **{n: "*i64" for n in ("indptr", "csc_indptr")},
    **{n: "*i32" for n in ("indices", "csc_indices", "csc_edge_ids", "seg_row", "seg_count",
                           "seg_end", "part_end", "split_row")},
    **{n: "*fp32" for n in ("lse", "grad_lse", "prob", "dscore", "part_m", "part_l", "part_acc",
                            "part_dq", "part_dk", "part_dv", "part", "delta_out")},
    **{n: "*bf16" for n in ("q", "k", "v", "out", "dout", "edge_bias", "edge_attr", "dq", "dk",
                            "dv", "d_edge_attr", "dst")},
    **{n: "fp32" for n in ("scale", "scale_log2")},
}


def compile_shapes(tile):
    """(row-pass constexprs, combine constexprs) per compile-checked (H, D), for `tile`."""
    config = DEFAULT_CONFIG
    for heads, dim in ((3, 20), (4, 32)):
        block_s, block_h, block_d = block_sizes(heads, dim, tile)
        shape = dict(H=heads, D=dim, BLOCK_H=block_h, BLOCK_D=block_d)
        yield dict(shape, BLOCK_S=block_s, CHUNK=config.chunk), shape


COMPILE_CASES = [
    case for rows, shape in compile_shapes(DEFAULT_CONFIG.fwd_tile) for case in (
        ("_forward_kernel", dict(rows, HAS_BIAS=True, HAS_ATTR=True), COMPILE_TYPES,
         {"num_warps": DEFAULT_CONFIG.num_warps}),
        ("_softmax_combine_kernel", dict(shape, BLOCK_P=8), COMPILE_TYPES,
         {"num_warps": DEFAULT_CONFIG.combine_warps}))
]
