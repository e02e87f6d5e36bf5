"""Triton kernels of weighted_gather_sum, registered as its CUDA kernels (and used by
hashed_lookup, whose forward and backward are a weighted gather-sum of table rows).

Forward: one program per (token block, table, column block) loops over the B entries of its
bags, gathers each selected row's column slice and accumulates in fp32.
Backward: entries (t, b) sorted by row (stable torch.sort: deterministic), then one program per
block of rows walks each row's entries in token order: the table gradient of each element is a
sequential fp32 sum in a fixed order, written once, without atomics.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import acc_dtype, on_input_device, tuned


# (tokens, columns, warps) per program; none spills on sm_90 (ptxas: 47 to 125 registers).
# 1024 columns hold whole mem-base rows: each index and weight is read by one program only.
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
    for bt, bd, w in [(16, 256, 4), (32, 256, 8), (32, 128, 4), (64, 128, 8), (16, 512, 8),
                      (64, 64, 4), (8, 512, 4), (16, 128, 4), (8, 1024, 8), (4, 1024, 4)]
]


@tuned(_FORWARD_CONFIGS, key=["d", "B", "HAS_WEIGHTS"])
@triton.jit
def _gather_sum_kernel(idx_ptr, w_ptr, table_ptr, bias_ptr, out_ptr, T, B, d, rows_per_table,
                       HAS_WEIGHTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    num_d_blocks = tl.cdiv(d, BLOCK_D)
    m = tl.program_id(1) // num_d_blocks
    cols = (tl.program_id(1) % num_d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = tokens < T
    c_mask = cols < d
    mask = t_mask[:, None] & c_mask[None, :]
    table_m = table_ptr + m.to(tl.int64) * rows_per_table * d
    entries = idx_ptr + tokens * B
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC_DTYPE)
    # Table rows are re-read by other token blocks: kept in L2 (evict_last).
    # Software-pipelined by hand: the gather and weight of entry b + 1 and the index of entry
    # b + 2 are in flight while entry b is accumulated (the compiler does not pipeline these
    # indirect loads itself).
    row = tl.load(entries + 1, mask=t_mask & (1 < B), other=0).to(tl.int64)
    first = tl.load(entries, mask=t_mask & (0 < B), other=0).to(tl.int64)
    vals = tl.load(table_m + first[:, None] * d + cols[None, :], mask=mask & (0 < B), other=0.0,
                   eviction_policy="evict_last")
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + tokens * B, mask=t_mask & (0 < B), other=0.0)
    for b in range(0, B):
        vals_next = tl.load(table_m + row[:, None] * d + cols[None, :],
                            mask=mask & (b + 1 < B), other=0.0, eviction_policy="evict_last")
        row = tl.load(entries + b + 2, mask=t_mask & (b + 2 < B), other=0).to(tl.int64)
        if HAS_WEIGHTS:
            w_next = tl.load(w_ptr + tokens * B + b + 1, mask=t_mask & (b + 1 < B), other=0.0)
            acc += w.to(ACC_DTYPE)[:, None] * vals.to(ACC_DTYPE)
            w = w_next
        else:
            acc += vals.to(ACC_DTYPE)
        vals = vals_next
    if HAS_BIAS:
        acc += tl.load(bias_ptr + m * d + cols, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :]
    out_ptrs = out_ptr + (m.to(tl.int64) * T + tokens[:, None]) * d + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum(table, idx, weights, bias, rows_per_table, out):
    """out [M, T, d] = sum_b weights[:, b] * table[m, idx[:, b]] (+ bias[m]); table [M, rows, d]."""
    M, T, d = out.shape
    meta = {} if not interpreting() else {"BLOCK_T": 16, "BLOCK_D": 32}

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]), M * triton.cdiv(d, meta["BLOCK_D"]))

    _gather_sum_kernel[grid](
        idx, weights if weights is not None else table, table,
        bias if bias is not None else table, out, T, idx.shape[1], d, rows_per_table,
        HAS_WEIGHTS=weights is not None, HAS_BIAS=bias is not None,
        ACC_DTYPE=acc_dtype(table.dtype), **meta)
    return out


@on_input_device
def weighted_gather_sum(table, idx, weights):
    """table [M, R, d], idx [T, B], weights [T, B] or None -> y [M, T, d]."""
    table = table.contiguous()
    M, R, d = table.shape
    out = torch.empty((M, idx.shape[0], d), device=table.device, dtype=table.dtype)
    if out.numel() == 0:
        return out
    return gather_sum(table, idx.contiguous(), weights.contiguous() if weights is not None
                       else None, None, R, out)


# BLOCK_D comes from d alone (see _segment_block_d): it sets grad_weights' summation order.
# BLOCK_R (rows per program) changes no sum, so the tuner may pick it.
# BLOCK_R = 32 with 16-aligned pointers and d fails triton 3.6's layout passes ('tt.load'
# mask/ptr type mismatch, seen on the H200): at most 16 rows per program.
_SEGMENT_CONFIGS = [triton.Config({"BLOCK_R": r}, num_warps=w)
                    for r in (2, 4, 8, 16) for w in (4, 8)]


def _prune_segment_configs(configs, named_args, **kwargs):
    """Tiles of 1024 to 8192 elements (fewer only where d is tiny), at most 32 per thread
    (more spill: the tile lives in registers twice, accumulator and table rows)."""
    block_d = kwargs["BLOCK_D"]
    fits = [c for c in configs if c.kwargs["BLOCK_R"] * block_d <= 8192
            and c.kwargs["BLOCK_R"] * block_d <= 32 * 32 * c.num_warps]
    largest = max(c.kwargs["BLOCK_R"] for c in fits) * block_d
    return [c for c in fits if c.kwargs["BLOCK_R"] * block_d >= min(1024, largest)]


@tuned(_SEGMENT_CONFIGS, key=["d", "B", "HAS_WEIGHTS", "WEIGHTS_GRAD"],
        prune_configs_by={"early_config_prune": _prune_segment_configs})
@triton.jit
def _segment_sum_kernel(grad_ptr, table_ptr, order_ptr, offsets_ptr, w_ptr, grad_table_ptr,
                        grad_w_ptr, R, B, T, d, n,
                        HAS_WEIGHTS: tl.constexpr, WEIGHTS_GRAD: tl.constexpr,
                        ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    num_d_blocks = tl.cdiv(d, BLOCK_D)
    m = (tl.program_id(1) // num_d_blocks).to(tl.int64)
    d_block = tl.program_id(1) % num_d_blocks
    cols = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_mask = rows < R
    c_mask = cols < d
    tile_mask = r_mask[:, None] & c_mask[None, :]
    start = tl.load(offsets_ptr + rows, mask=r_mask, other=0)
    length = tl.load(offsets_ptr + rows + 1, mask=r_mask, other=0) - start
    row_ptrs = (m * R + rows[:, None]) * d + cols[None, :]
    if WEIGHTS_GRAD:
        table_rows = tl.load(table_ptr + row_ptrs, mask=tile_mask, other=0.0,
                             eviction_policy="evict_first").to(ACC_DTYPE)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC_DTYPE)
    grad_m = grad_ptr + m * T * d
    # Entry j of every row at once; each row's entries in token order: a fixed summation order.
    # dy rows are re-read by other rows' entries: kept in L2; table rows and ids stream once.
    for j in range(0, tl.max(length, axis=0)):
        live = j < length  # rows past R have length 0
        p = tl.load(order_ptr + start + j, mask=live, other=0)
        g = tl.load(grad_m + (p // B)[:, None] * d + cols[None, :],
                    mask=live[:, None] & c_mask[None, :], other=0.0,
                    eviction_policy="evict_last").to(ACC_DTYPE)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + p, mask=live, other=0.0)
            acc += w.to(ACC_DTYPE)[:, None] * g
        else:
            acc += g
        if WEIGHTS_GRAD:
            partial = tl.sum(g * table_rows, axis=1)
            tl.store(grad_w_ptr + tl.program_id(1).to(tl.int64) * n + p, partial, mask=live)
    tl.store(grad_table_ptr + row_ptrs, acc.to(grad_table_ptr.dtype.element_ty), mask=tile_mask)


def _segment_block_d(d):
    """Columns per program, fixed by d alone: grad_weights' summation order is too. Up to 1024,
    so that one program usually holds whole rows (no partial sums to add)."""
    if interpreting():  # small tiles: d = 300 still spans two column blocks
        return min(triton.next_power_of_2(max(d, 1)), 256)
    return min(triton.next_power_of_2(max(d, 1)), 1024)


def _sort_by_row(idx, R):
    """Entries p = t * B + b of idx sorted by row, stable (so in token order within a row):
    (order int64 [T * B], offsets int64 [R + 1]); row r's entries are
    order[offsets[r]:offsets[r + 1]]. The narrowest key dtype that holds R - 1 cuts the radix
    passes: 2 for hashed_lookup's K * 2**tau = 32,768 rows (int16), 4 for int32."""
    key_dtype = next(dt for dt in (torch.int16, torch.int32, torch.int64)
                     if R - 1 <= torch.iinfo(dt).max)
    keys, order = torch.sort(idx.reshape(-1).to(key_dtype), stable=True)
    starts = torch.searchsorted(keys, torch.arange(R, device=keys.device, dtype=key_dtype))
    return order, torch.cat([starts, starts.new_full((1,), keys.numel())])


@on_input_device
def weighted_gather_sum_backward(grad, table, idx, weights, weights_grad):
    """grad [M, T, d], table [M, R, d], idx [T, B], weights [T, B] or None ->
    (grad_table [M, R, d], grad_weights [T, B] in weights' dtype, or [0] if not weights_grad)."""
    table, idx = table.contiguous(), idx.contiguous()
    grad = grad.to(table.dtype).contiguous()
    M, R, d = table.shape
    T, B = idx.shape
    n = T * B
    grad_w_dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    grad_table = torch.empty_like(table)
    block_d = _segment_block_d(d)
    num_d_blocks = triton.cdiv(d, block_d)
    partial_w = torch.empty((M * num_d_blocks, n if weights_grad else 0), device=table.device,
                            dtype=grad_w_dtype)
    if grad_table.numel() > 0:
        order, offsets = _sort_by_row(idx, R)
        meta = {} if not interpreting() else {"BLOCK_R": 4}
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), M * num_d_blocks)  # noqa: E731
        _segment_sum_kernel[grid](
            grad, table, order, offsets,
            weights.contiguous() if weights is not None else table, grad_table,
            partial_w if weights_grad else table, R, B, T, d, n,
            HAS_WEIGHTS=weights is not None, WEIGHTS_GRAD=weights_grad,
            ACC_DTYPE=acc_dtype(table.dtype), BLOCK_D=block_d, **meta)
    elif weights_grad:
        partial_w.zero_()
    if not weights_grad:
        return grad_table, partial_w.reshape(0)
    grad_w = partial_w[0] if partial_w.shape[0] == 1 else partial_w.sum(0)
    return grad_table, grad_w.view(T, B).to(weights.dtype)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed): name, constexprs,
# argument types other than bf16 pointers and int32 scalars.
_INDEX_TYPES = {"idx_ptr": "*i32", "order_ptr": "*i64", "offsets_ptr": "*i64",
                "w_ptr": "*fp32", "grad_w_ptr": "*fp32"}
COMPILE_CASES = [
    ("_gather_sum_kernel", dict(HAS_WEIGHTS=True, HAS_BIAS=True, ACC_DTYPE=tl.float32,
                                BLOCK_T=16, BLOCK_D=256), _INDEX_TYPES),
    ("_gather_sum_kernel", dict(HAS_WEIGHTS=False, HAS_BIAS=False, ACC_DTYPE=tl.float64,
                                BLOCK_T=64, BLOCK_D=64),
     dict(_INDEX_TYPES, idx_ptr="*i64", table_ptr="*fp64", out_ptr="*fp64")),
    # B = T = d = 1: the JIT turns integer arguments equal to 1 into constants.
    ("_gather_sum_kernel", dict(HAS_WEIGHTS=True, HAS_BIAS=True, ACC_DTYPE=tl.float32,
                                BLOCK_T=16, BLOCK_D=32, B=1, T=1, d=1), _INDEX_TYPES),
    ("_segment_sum_kernel", dict(HAS_WEIGHTS=True, WEIGHTS_GRAD=True, ACC_DTYPE=tl.float32,
                                 BLOCK_R=4, BLOCK_D=1024), _INDEX_TYPES),
    ("_segment_sum_kernel", dict(HAS_WEIGHTS=True, WEIGHTS_GRAD=True, ACC_DTYPE=tl.float32,
                                 BLOCK_R=16, BLOCK_D=16, B=1, d=1, n=1, T=1), _INDEX_TYPES),
    ("_segment_sum_kernel", dict(HAS_WEIGHTS=False, WEIGHTS_GRAD=False, ACC_DTYPE=tl.float32,
                                 BLOCK_R=16, BLOCK_D=128), _INDEX_TYPES),
]
