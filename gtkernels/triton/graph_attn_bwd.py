"""Triton backward of graph_attention (the CUDA kernel of graph_attention_backward), without
float atomics, in two passes over the same segment work lists as the forward:

1. destination pass (CSR): p_e = exp(s_e - lse_i), ds_e = p_e (dO_i . (v_j + a_e) - delta_i),
   delta_i = dO_i . O_i - dlse_i; dq_i = scale sum_e ds_e (k_j + a_e); p and ds are kept per
   edge ([E, H] fp32), d_edge_attr_e = scale ds_e q_i + p_e dO_i is written per edge, and
   optionally delta ([N, H] fp32, for graph_attention's union: its other parts reuse it).
2. source pass (CSC): dk_j = scale sum_e ds_e q_i, dv_j = sum_e p_e dO_i.
Hub rows/columns write fp32 partial sums that `_sum_combine_kernel` adds in segment order.
"""
import torch
import triton
import triton.language as tl

from .graph_attn import (COMPILE_TYPES, DEFAULT_CONFIG, _edge_key_value, _head_offsets,
                         _segment_bounds, block_sizes, compile_shapes, node_rows)
from .graph_schedule import cached_segment_schedule


@triton.jit
def _destination_kernel(indptr, indices, q, k, v, dout, out, lse, grad_lse, edge_bias,
                        edge_attr, dq, prob, dscore, d_edge_attr, part_dq, delta_out,
                        seg_row, seg_count, seg_end, part_end, num_rows, num_segments, scale,
                        stride_q, stride_kv,
                        H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_ATTR: tl.constexpr,
                        HAS_GRAD_LSE: tl.constexpr, STORE_DELTA: tl.constexpr):
    row, live, start, stop, count, slot = _segment_bounds(
        indptr, seg_row, seg_count, seg_end, part_end, num_rows, num_segments,
        tl.program_id(0), BLOCK_S, CHUNK)
    hs, head_ok, hd, hd_ok = _head_offsets(H, D, BLOCK_H, BLOCK_D)
    row_mask = live[:, None, None] & hd_ok
    row_off = row[:, None, None] * (H * D) + hd
    q_i = tl.load(q + row[:, None, None] * stride_q + hd, mask=row_mask,
                  other=0.0).to(tl.float32)
    do_i = tl.load(dout + row_off, mask=row_mask, other=0.0).to(tl.float32)
    o_i = tl.load(out + row_off, mask=row_mask, other=0.0).to(tl.float32)
    head_mask = live[:, None] & head_ok[None, :]
    delta = tl.sum(do_i * o_i, axis=2)
    if HAS_GRAD_LSE:
        delta -= tl.load(grad_lse + row[:, None] * H + hs[None, :], mask=head_mask,
                         other=0.0).to(tl.float32)
    if STORE_DELTA:  # the segments of a hub row store the same value (same computation)
        tl.store(delta_out + row[:, None] * H + hs[None, :], delta, mask=head_mask)
    lse_i = tl.load(lse + row[:, None] * H + hs[None, :], mask=head_mask, other=0.0)
    lse_i = lse_i.to(tl.float32) * 1.4426950408889634
    dq_acc = tl.zeros([BLOCK_S, BLOCK_H, BLOCK_D], tl.float32)
    j_next = tl.load(indices + start, mask=start < stop, other=0)
    for t in range(0, tl.max(stop - start, axis=0)):
        e = start + t
        on = e < stop
        j = j_next.to(tl.int64)  # prefetched one edge ahead, as in the forward
        j_next = tl.load(indices + e + 1, mask=e + 1 < stop, other=0)
        k_j, v_j = _edge_key_value(k, v, edge_attr, j, e, on, hd, hd_ok, stride_kv, H, D,
                                   HAS_ATTR)
        s = tl.sum(q_i * k_j, axis=2) * (scale * 1.4426950408889634)
        edge_mask = on[:, None] & head_ok[None, :]
        if HAS_BIAS:
            b = tl.load(edge_bias + e[:, None] * H + hs[None, :], mask=edge_mask, other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
        p = tl.where(edge_mask & (s > float("-inf")), tl.exp2(s - lse_i), 0.0)  # bias may be -inf
        d_s = p * (tl.sum(do_i * v_j, axis=2) - delta)
        dq_acc += d_s[:, :, None] * k_j
        tl.store(prob + e[:, None] * H + hs[None, :], p, mask=edge_mask)
        tl.store(dscore + e[:, None] * H + hs[None, :], d_s, mask=edge_mask)
        if HAS_ATTR:
            grad_a = (scale * d_s)[:, :, None] * q_i + p[:, :, None] * do_i
            tl.store(d_edge_attr + e[:, None, None] * (H * D) + hd,
                     grad_a.to(d_edge_attr.dtype.element_ty), mask=on[:, None, None] & hd_ok)
    dq_acc = dq_acc * scale
    tl.store(dq + row_off, dq_acc.to(dq.dtype.element_ty), mask=(count == 1)[:, None, None] & row_mask)
    tl.store(part_dq + slot[:, None, None] * (H * D) + hd, dq_acc,
             mask=(count > 1)[:, None, None] & row_mask)


@triton.jit
def _source_kernel(csc_indptr, csc_indices, csc_edge_ids, q, dout, prob, dscore, dk, dv,
                   part_dk, part_dv, seg_row, seg_count, seg_end, part_end, num_rows,
                   num_segments, scale, stride_q, H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    col, live, start, stop, count, slot = _segment_bounds(
        csc_indptr, seg_row, seg_count, seg_end, part_end, num_rows, num_segments,
        tl.program_id(0), BLOCK_S, CHUNK)
    hs, head_ok, hd, hd_ok = _head_offsets(H, D, BLOCK_H, BLOCK_D)
    dk_acc = tl.zeros([BLOCK_S, BLOCK_H, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_S, BLOCK_H, BLOCK_D], tl.float32)
    i_next = tl.load(csc_indices + start, mask=start < stop, other=0)
    e_next = tl.load(csc_edge_ids + start, mask=start < stop, other=0)
    for t in range(0, tl.max(stop - start, axis=0)):
        c = start + t
        on = c < stop
        i = i_next.to(tl.int64)  # destination and edge id prefetched one edge ahead
        e = e_next.to(tl.int64)
        i_next = tl.load(csc_indices + c + 1, mask=c + 1 < stop, other=0)
        e_next = tl.load(csc_edge_ids + c + 1, mask=c + 1 < stop, other=0)
        edge_mask = on[:, None] & head_ok[None, :]
        p = tl.load(prob + e[:, None] * H + hs[None, :], mask=edge_mask, other=0.0)
        d_s = tl.load(dscore + e[:, None] * H + hs[None, :], mask=edge_mask, other=0.0)
        node_mask = on[:, None, None] & hd_ok
        node_off = i[:, None, None] * (H * D) + hd
        q_i = tl.load(q + i[:, None, None] * stride_q + hd, mask=node_mask,
                      other=0.0).to(tl.float32)
        do_i = tl.load(dout + node_off, mask=node_mask, other=0.0).to(tl.float32)
        dk_acc += d_s[:, :, None] * q_i
        dv_acc += p[:, :, None] * do_i
    dk_acc = dk_acc * scale
    col_mask = live[:, None, None] & hd_ok
    col_off = col[:, None, None] * (H * D) + hd
    whole = (count == 1)[:, None, None] & col_mask
    tl.store(dk + col_off, dk_acc.to(dk.dtype.element_ty), mask=whole)
    tl.store(dv + col_off, dv_acc.to(dv.dtype.element_ty), mask=whole)
    split = (count > 1)[:, None, None] & col_mask
    tl.store(part_dk + slot[:, None, None] * (H * D) + hd, dk_acc, mask=split)
    tl.store(part_dv + slot[:, None, None] * (H * D) + hd, dv_acc, mask=split)


@triton.jit
def _sum_combine_kernel(split_row, seg_count, part_end, part, dst, num_rows,
                        HD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HD: tl.constexpr):
    """dst[row] = sum of the row's partials, added in slot order."""
    row = tl.load(split_row + tl.program_id(0))
    live = row < num_rows
    row = tl.where(live, row, 0).to(tl.int64)
    count = tl.where(live, tl.load(seg_count + row), 0)
    first = tl.load(part_end + row) - count
    ps = tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_HD)
    acc = tl.zeros([BLOCK_HD], tl.float32)
    for p0 in range(0, count, BLOCK_P):
        slot = (first + p0 + ps).to(tl.int64)
        mask = ((p0 + ps) < count)[:, None] & (cols < HD)[None, :]
        acc += tl.sum(tl.load(part + slot[:, None] * HD + cols[None, :], mask=mask, other=0.0),
                      axis=0)
    tl.store(dst + row * HD + cols, acc.to(dst.dtype.element_ty), mask=live & (cols < HD))


def _combine_sums(sched, part, dst, config):
    if sched.num_split == 0:
        return
    hd = dst.shape[1] * dst.shape[2]
    block_hd = triton.next_power_of_2(hd)
    _sum_combine_kernel[(sched.num_split,)](
        sched.split_row, sched.seg_count, sched.part_end, part, dst, sched.num_rows, HD=hd,
        BLOCK_P=max(1, config.combine_tile // block_hd), BLOCK_HD=block_hd,
        num_warps=config.combine_warps)


def graph_attention_backward(grad_out, grad_lse, q, k, v, out, lse, indptr, indices, csc_indptr,
                             csc_indices, csc_edge_ids, edge_bias, edge_attr, scale,
                             config=DEFAULT_CONFIG, delta=None):
    """The CUDA kernel of torch.ops.gtkernels.graph_attention_backward (same arguments and
    results); `config` as in graph_attention_forward; `delta`: optional fp32 [N, H]
    (contiguous), filled with delta = dO . O - dlse."""
    q, k, v, stride_q, stride_kv = node_rows(q, k, v)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    n, h, d = q.shape
    num_edges = indices.numel()
    dq, dk, dv = (torch.empty((n, h, d), device=q.device, dtype=q.dtype) for _ in range(3))
    d_edge_attr = q.new_empty(edge_attr.shape if edge_attr is not None else (0,))
    prob = torch.empty((num_edges, h), device=q.device, dtype=torch.float32)
    dscore = torch.empty_like(prob)
    if n == 0 or h == 0:
        d_edge_bias = q.new_empty(edge_bias.shape if edge_bias is not None else (0,))
        return dq, dk, dv, d_edge_bias, d_edge_attr
    block_s, block_h, block_d = block_sizes(h, d, config.bwd_tile)

    rows = cached_segment_schedule(indptr, num_edges, config.chunk)
    part = torch.empty((rows.num_partials, h, d), device=q.device, dtype=torch.float32)
    _destination_kernel[(triton.cdiv(rows.num_segments, block_s),)](
        indptr, indices, q, k, v, grad_out, out, lse,
        grad_lse.contiguous() if grad_lse is not None else lse,
        edge_bias.contiguous() if edge_bias is not None else q,
        edge_attr.contiguous() if edge_attr is not None else q,
        dq, prob, dscore, d_edge_attr, part, lse if delta is None else delta, rows.seg_row,
        rows.seg_count, rows.seg_end, rows.part_end, n, rows.num_segments, scale, stride_q,
        stride_kv, H=h, D=d,
        BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d, CHUNK=config.chunk,
        HAS_BIAS=edge_bias is not None, HAS_ATTR=edge_attr is not None,
        HAS_GRAD_LSE=grad_lse is not None, STORE_DELTA=delta is not None,
        num_warps=config.num_warps)
    _combine_sums(rows, part, dq, config)

    cols = cached_segment_schedule(csc_indptr, num_edges, config.chunk)
    part_dk = torch.empty((cols.num_partials, h, d), device=q.device, dtype=torch.float32)
    part_dv = torch.empty_like(part_dk)
    _source_kernel[(triton.cdiv(cols.num_segments, block_s),)](
        csc_indptr, csc_indices, csc_edge_ids, q, grad_out, prob, dscore, dk, dv, part_dk,
        part_dv, cols.seg_row, cols.seg_count, cols.seg_end, cols.part_end, n,
        cols.num_segments, scale, stride_q, H=h, D=d, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d,
        CHUNK=config.chunk, num_warps=config.num_warps)
    _combine_sums(cols, part_dk, dk, config)
    _combine_sums(cols, part_dv, dv, config)
    d_edge_bias = dscore.to(q.dtype) if edge_bias is not None else q.new_empty((0,))
    return dq, dk, dv, d_edge_bias, d_edge_attr


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed); types and shapes as for
# the forward (graph_attn.COMPILE_TYPES).
COMPILE_CASES = [
    case for rows, shape in compile_shapes(DEFAULT_CONFIG.bwd_tile) for case in (
        ("_destination_kernel", dict(rows, HAS_BIAS=True, HAS_ATTR=True, HAS_GRAD_LSE=True,
                                         STORE_DELTA=True),
         COMPILE_TYPES, {"num_warps": DEFAULT_CONFIG.num_warps}),
        ("_source_kernel", rows, COMPILE_TYPES, {"num_warps": DEFAULT_CONFIG.num_warps}),
        ("_sum_combine_kernel", dict(HD=shape["H"] * shape["D"], BLOCK_P=8,
                                     BLOCK_HD=shape["BLOCK_H"] * shape["BLOCK_D"]),
         COMPILE_TYPES, {"num_warps": DEFAULT_CONFIG.combine_warps}))
]
