"""Triton kernels of weighted_gather_sum, registered as its CUDA kernels (and used by
hashed_lookup, whose forward and backward are a weighted gather-sum of table rows).

Forward: one program per (token block, table, column block) loops over the B entries of its
bags, gathers each selected row's column slice and accumulates in fp32.
Backward: entries (t, b) sorted by row (stable torch.sort: deterministic), then one warp per
block of rows walks each row's entries in token order: the table gradient of each element is a
sequential fp32 sum in a fixed order, written once, without atomics. The same pass computes the
weights' gradient (dy[t] . table row, one dot per entry, reduced inside the warp).
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


# One warp per program sums BLOCK_R rows x BLOCK_D columns as a [BLOCK_R, CHUNKS, CHUNK_D]
# tile: the 32 lanes span a chunk with 16-byte loads (CHUNK_D = 256 bf16 columns) and walk
# whole rows. So each entry's position and weight are read once (not once per column slice),
# its weight-gradient dot reduces inside the warp (shuffles: no shared memory, no barrier) and
# a program's loop waits only for the longest of its few rows. BLOCK_R * BLOCK_D <= 1024 keeps
# the fp32 accumulator and table tile at <= 32 values per thread each: 128 registers at mem-base
# (1 x 1024), no spills on sm_90; <= 512 where a row is narrower (hashed-emb: 2 or 4 x 128).
# BLOCK_R changes no sum, so the tuner may pick it; BLOCK_D and CHUNK_D come from d and the
# dtype alone (see _segment_tile): they set grad_weights' summation order.
_SEGMENT_CONFIGS = [triton.Config({"BLOCK_R": r}, num_warps=1) for r in (1, 2, 4, 8, 16, 32)]


def _prune_segment_configs(configs, named_args, **kwargs):
    """Rows enough for the lanes (no lane repeats another's work), few enough for registers."""
    vector = max(1, 16 // named_args["table_ptr"].element_size())
    rows_per_warp = max(1, 32 // max(1, kwargs["CHUNK_D"] // vector))
    block_d = kwargs["CHUNKS"] * kwargs["CHUNK_D"]
    most_rows = max(rows_per_warp, 512 // block_d)
    fits = [c for c in configs if rows_per_warp <= c.kwargs["BLOCK_R"] <= most_rows]
    return fits or configs[:1]


@tuned(_SEGMENT_CONFIGS, key=["d", "B", "HAS_WEIGHTS", "WEIGHTS_GRAD", "CHUNK_D"],
       prune_configs_by={"early_config_prune": _prune_segment_configs})
@triton.jit
def _segment_sum_kernel(grad_ptr, table_ptr, order_ptr, offsets_ptr, w_ptr, grad_table_ptr,
                        grad_w_ptr, R, T, d, n, B: tl.constexpr,
                        HAS_WEIGHTS: tl.constexpr, WEIGHTS_GRAD: tl.constexpr,
                        ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, CHUNKS: tl.constexpr,
                        CHUNK_D: tl.constexpr):
    num_d_blocks = tl.cdiv(d, CHUNKS * CHUNK_D)
    m = (tl.program_id(1) // num_d_blocks).to(tl.int64)
    d_block = tl.program_id(1) % num_d_blocks
    cols = (d_block * CHUNKS * CHUNK_D + tl.arange(0, CHUNKS)[None, :, None] * CHUNK_D
            + tl.arange(0, CHUNK_D)[None, None, :])                      # [1, CHUNKS, CHUNK_D]
    c_mask = cols < d
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_mask = rows < R
    start = tl.load(offsets_ptr + rows, mask=r_mask, other=0)
    length = tl.load(offsets_ptr + rows + 1, mask=r_mask, other=0) - start  # 0 past R
    row_ptrs = (m * R + rows[:, None, None]) * d + cols
    tile_mask = r_mask[:, None, None] & c_mask
    if WEIGHTS_GRAD:
        table_rows = tl.load(table_ptr + row_ptrs, mask=tile_mask, other=0.0,
                             eviction_policy="evict_first").to(ACC_DTYPE)
    acc = tl.zeros([BLOCK_R, CHUNKS, CHUNK_D], dtype=ACC_DTYPE)
    grad_m = grad_ptr + m * T * d
    # Entry j of every row at once; each row's entries in token order: a fixed summation order.
    # Software-pipelined by hand: the dy rows and weights of entry j + 1 and the positions of
    # entry j + 2 are in flight while entry j is summed. dy rows are re-read by other rows'
    # entries: kept in L2 (evict_last); table rows stream once.
    pos = tl.load(order_ptr + start, mask=0 < length, other=0)
    pos_next = tl.load(order_ptr + start + 1, mask=1 < length, other=0)
    g = tl.load(grad_m + (pos // B)[:, None, None] * d + cols,
                mask=(0 < length)[:, None, None] & c_mask, other=0.0, eviction_policy="evict_last")
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + pos, mask=0 < length, other=0.0)
    for j in range(0, tl.max(length, axis=0)):
        live_next = j + 1 < length
        g_next = tl.load(grad_m + (pos_next // B)[:, None, None] * d + cols,
                         mask=live_next[:, None, None] & c_mask, other=0.0,
                         eviction_policy="evict_last")
        pos_after = tl.load(order_ptr + start + j + 2, mask=j + 2 < length, other=0)
        g32 = g.to(ACC_DTYPE)
        if HAS_WEIGHTS:
            w_next = tl.load(w_ptr + pos_next, mask=live_next, other=0.0)
            acc += w.to(ACC_DTYPE)[:, None, None] * g32
            w = w_next
        else:
            acc += g32
        if WEIGHTS_GRAD:
            dot = tl.sum(tl.sum(g32 * table_rows, axis=1), axis=1)
            tl.store(grad_w_ptr + tl.program_id(1).to(tl.int64) * n + pos, dot, mask=j < length)
        g = g_next
        pos = pos_next
        pos_next = pos_after
    tl.store(grad_table_ptr + row_ptrs, acc.to(grad_table_ptr.dtype.element_ty), mask=tile_mask)


def _segment_tile(d, dtype):
    """(CHUNKS, CHUNK_D) of a program's columns, from d and the dtype alone: grad_weights'
    summation order is too. CHUNK_D: what one warp's 32 lanes load with 16-byte vectors; up to
    1024 columns per program, so that one program usually holds whole rows (no partial sums
    to add). The interpreter gets small chunks, so that the tests span several."""
    columns = triton.next_power_of_2(max(d, 1))
    if interpreting():  # d = 300: two column blocks of 8 chunks
        return min(columns, 256) // min(columns, 32), min(columns, 32)
    chunk_d = min(columns, 32 * max(1, 16 // dtype.itemsize))
    return min(columns, 1024) // chunk_d, chunk_d


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
    chunks, chunk_d = _segment_tile(d, table.dtype)
    num_d_blocks = triton.cdiv(d, chunks * chunk_d)
    partial_w = torch.empty((M * num_d_blocks, n if weights_grad else 0), device=table.device,
                            dtype=grad_w_dtype)
    if grad_table.numel() > 0:
        order, offsets = _sort_by_row(idx, R)
        meta = {} if not interpreting() else {"BLOCK_R": 4}
        grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]), M * num_d_blocks)  # noqa: E731
        _segment_sum_kernel[grid](
            grad, table, order, offsets,
            weights.contiguous() if weights is not None else table, grad_table,
            partial_w if weights_grad else table, R, T, d, n, B=B,
            HAS_WEIGHTS=weights is not None, WEIGHTS_GRAD=weights_grad,
            ACC_DTYPE=acc_dtype(table.dtype), CHUNKS=chunks, CHUNK_D=chunk_d, **meta)
    elif weights_grad:
        partial_w.zero_()
    if not weights_grad:
        return grad_table, partial_w.reshape(0)
    grad_w = partial_w[0] if partial_w.shape[0] == 1 else partial_w.sum(0)
    return grad_table, grad_w.view(T, B).to(weights.dtype)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed): name, constexprs,
# argument types other than bf16 pointers and int32 scalars[, compile options].
_INDEX_TYPES = {"idx_ptr": "*i32", "order_ptr": "*i64", "offsets_ptr": "*i64",
                "w_ptr": "*fp32", "grad_w_ptr": "*fp32"}
_ONE_WARP = {"num_warps": 1}  # as _SEGMENT_CONFIGS
COMPILE_CASES = [
    ("_gather_sum_kernel", dict(HAS_WEIGHTS=True, HAS_BIAS=True, ACC_DTYPE=tl.float32,
                                BLOCK_T=16, BLOCK_D=256), _INDEX_TYPES),
    ("_gather_sum_kernel", dict(HAS_WEIGHTS=False, HAS_BIAS=False, ACC_DTYPE=tl.float64,
                                BLOCK_T=64, BLOCK_D=64),
     dict(_INDEX_TYPES, idx_ptr="*i64", table_ptr="*fp64", out_ptr="*fp64")),
    # B = T = d = 1: the JIT turns integer arguments equal to 1 into constants.
    ("_gather_sum_kernel", dict(HAS_WEIGHTS=True, HAS_BIAS=True, ACC_DTYPE=tl.float32,
                                BLOCK_T=16, BLOCK_D=32, B=1, T=1, d=1), _INDEX_TYPES),
    # mem-base (d = 1024, K = 128) and hashed-emb (d = 128, B = 32), bf16.
    ("_segment_sum_kernel", dict(B=128, HAS_WEIGHTS=True, WEIGHTS_GRAD=True, ACC_DTYPE=tl.float32,
                                 BLOCK_R=1, CHUNKS=4, CHUNK_D=256), _INDEX_TYPES, _ONE_WARP),
    ("_segment_sum_kernel", dict(B=32, HAS_WEIGHTS=True, WEIGHTS_GRAD=True, ACC_DTYPE=tl.float32,
                                 BLOCK_R=4, CHUNKS=1, CHUNK_D=128),
     dict(_INDEX_TYPES, w_ptr="*bf16"), _ONE_WARP),
    ("_segment_sum_kernel", dict(B=1, HAS_WEIGHTS=True, WEIGHTS_GRAD=True, ACC_DTYPE=tl.float32,
                                 BLOCK_R=16, CHUNKS=1, CHUNK_D=1, d=1, n=1, T=1), _INDEX_TYPES,
     _ONE_WARP),
    ("_segment_sum_kernel", dict(B=3, HAS_WEIGHTS=False, WEIGHTS_GRAD=False, ACC_DTYPE=tl.float64,
                                 BLOCK_R=2, CHUNKS=8, CHUNK_D=64),
     dict(_INDEX_TYPES, grad_ptr="*fp64", table_ptr="*fp64", grad_table_ptr="*fp64"), _ONE_WARP),
]
