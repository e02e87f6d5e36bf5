"""The float64 stages of the exact codebook search (after the tensor-core scan of codebook.py).

- ``_rerank_kernel``: float64 distances of a row's candidate codes (one candidate slot at a
  time, for the slots in use), the k smallest (ties to the lowest index), ROWS rows per
  program. Rows the scan flagged are skipped (and listed).
- ``_chunk_exact_kernel``: the same for the chunk scan (k = 1), whose candidates are lanes:
  the row's nearest code over the chunks of codes those lanes own (fp32 scores first, float64
  for the codes within the bound of the lowest; rows where that is not one code per tile
  position are flagged).
- ``_lane_topk_kernel``: rows whose candidates' lanes hold more than one code within the
  bound (FLAG_LANES): the k best in float64 among all codes of those lanes.
- Rows flagged FLAG_ALL (more candidates than slots) take an exact float64 scan of all
  codes, split over the codebook so that a few such rows do not serialise on one program
  each: the re-rank kernels list them on the device (no host synchronisation),
  ``_split_topk_kernel`` has a fixed set of programs walk the (batch of rows, code chunk)
  items and write each chunk's k best per row (a batch shares every code tile it loads: 8
  rows where the codebook exceeds half the L2 cache, else 1), and ``_merge_topk_kernel``
  merges a row's chunks. Ties go to the lowest index everywhere, so the result does not
  depend on the split.

The float64 kernels launch with ``enable_fp_fusion=False``: with fma contraction a sum of
squares rounds differently depending on which product the compiler fuses, and on sm_90 it fused
differently for different register slots of one tile, so two copies of one code got float64
distances one ulp apart and the tie went to the wrong copy. Without contraction each product
and sum is rounded once, in an order fixed by the tile layout (the same for every code), so
equal codes get bitwise equal distances and the lowest-index rule decides their order.
"""
import torch
import triton
import triton.language as tl

from ..reference.codebook import COSINE_EPS
from . import interpreting
from .codebook_bound import candidate_threshold

_COSINE_EPS_K = tl.constexpr(COSINE_EPS)  # the same, readable inside kernels
SPLIT_CODES = 512           # codes per chunk of a flagged row's exact scan (at least)
SPLIT_ROWS = 8              # flagged rows that share each code tile of a large codebook
PARTIALS_BYTES = 64 << 20   # bound on the chunk results kept for the merge
CHUNK_ROWS = 8              # rows per program of the chunk search's exact stage
FLAG_ALL = 1                # flag values: the exact scan of all codes,
FLAG_LANES = 2              # or of every code of the candidates' lanes (interleaved scan)
_FLAG_ALL_K, _FLAG_LANES_K = tl.constexpr(FLAG_ALL), tl.constexpr(FLAG_LANES)


@triton.jit
def _exact_distances(x_rows, row_ok, c_rows, codes, valid, D, sxd, sck, scd,
                     METRIC: tl.constexpr, BLOCK_D: tl.constexpr):
    """float64 distances [R, C] of rows (x_rows: [R] pointers, read where row_ok) to codes
    [R, C] (c_rows: [R] pointers to each row's sub-codebook); invalid entries get +inf."""
    dk = tl.arange(0, BLOCK_D)
    acc = tl.zeros(codes.shape, dtype=tl.float64)
    xx = tl.zeros([codes.shape[0], 1], dtype=tl.float64)
    cc = tl.zeros(codes.shape, dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dk
        xv = tl.load(x_rows[:, None] + dd[None, :] * sxd, mask=row_ok[:, None] & (dd[None, :] < D),
                     other=0.0)
        xv = xv.to(tl.float64)[:, None, :]
        cv = tl.load(c_rows[:, None, None] + codes[:, :, None].to(tl.int64) * sck
                     + dd[None, None, :] * scd,
                     mask=valid[:, :, None] & (dd[None, None, :] < D), other=0.0).to(tl.float64)
        if METRIC == 0:
            diff = xv - cv
            acc += tl.sum(diff * diff, axis=2)
        else:
            acc += tl.sum(xv * cv, axis=2)
            xx += tl.sum(xv * xv, axis=2)
            cc += tl.sum(cv * cv, axis=2)
    if METRIC == 1:
        acc = -acc
    elif METRIC == 2:
        x_norm = tl.maximum(tl.sqrt(xx), _COSINE_EPS_K)
        c_norm = tl.maximum(tl.sqrt(cc), _COSINE_EPS_K)
        acc = 1.0 - acc / (x_norm * c_norm)
    return tl.where(valid, acc, float("inf"))


@triton.jit
def _append_flagged(rows, flagged, order_ptr, count_ptr):
    """Appends the rows where flagged to the list order (count_ptr: its length so far), in
    whatever order the atomics give: each row's result does not depend on it."""
    slot = tl.atomic_add(count_ptr + tl.zeros_like(rows), 1, mask=flagged)
    tl.store(order_ptr + slot, rows, mask=flagged)


@triton.jit
def _rerank_kernel(x_ptr, c_ptr, cand_ptr, flag_ptr, order_ptr, count_ptr, dist_ptr, idx_ptr,
                   NG, G, K, D, sxn, sxg, sxd, scg, sck, scd,
                   METRIC: tl.constexpr, K_SEL: tl.constexpr, CAND: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows with flag 0: the k best of their candidate codes. Flagged rows are listed:
    FLAG_ALL in order_ptr / count_ptr[0], FLAG_LANES in order_ptr + NG / count_ptr[1]."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # over N * G
    live = (rows < NG)
    flag = tl.load(flag_ptr + rows, mask=live, other=0)
    _append_flagged(rows, live & (flag == _FLAG_ALL_K), order_ptr, count_ptr)
    _append_flagged(rows, live & (flag == _FLAG_LANES_K), order_ptr + NG, count_ptr + 1)
    live = live & (flag == 0)
    g = rows % G
    x_rows = x_ptr + (rows // G) * sxn + g * sxg
    c_rows = c_ptr + g * scg
    slots = tl.arange(0, CAND)
    codes = tl.load(cand_ptr + rows[:, None] * CAND + slots[None, :], mask=live[:, None],
                    other=-1)
    count = tl.sum((codes >= 0).to(tl.int32), axis=1)  # the candidates fill the first slots
    codes = tl.where(codes >= 0, codes, K)
    # One candidate slot at a time, up to the block's largest count (most rows hold one or
    # two candidates of CAND slots): float64 work for the slots in use only.
    d = tl.full([ROWS, CAND], float("inf"), dtype=tl.float64)
    for s in range(tl.max(count, axis=0)):
        code = tl.load(cand_ptr + rows * CAND + s, mask=live & (s < count), other=-1)
        ds = _exact_distances(x_rows, live, c_rows, tl.maximum(code, 0)[:, None],
                              (code >= 0)[:, None], D, sxd, sck, scd, METRIC, BLOCK_D)
        d = tl.where(slots[None, :] == s, ds, d)
    for t in tl.static_range(K_SEL):
        m = tl.min(d, axis=1)
        j = tl.min(tl.where(d == m[:, None], codes, K), axis=1)
        tl.store(dist_ptr + rows * K_SEL + t, m, mask=live)
        tl.store(idx_ptr + rows * K_SEL + t, j.to(tl.int64), mask=live)
        d = tl.where(codes == j[:, None], float("inf"), d)


@triton.jit
def _chunk_exact_kernel(x_ptr, c_ptr, terms_ptr, eps_ptr, cand_ptr, flag_ptr, order_ptr,
                        count_ptr, dist_ptr, idx_ptr, NG, G, K, D, chunk, sxn, sxg, sxd, scg, sck,
                        scd,
                        METRIC: tl.constexpr, CAND: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """After the chunk scan (k = 1): a row's nearest code over the chunks
    [lane * chunk, min((lane + 1) * chunk, K)) of its candidate lanes (cand [N G, CAND],
    compacted, -1 = empty), ties to the lowest index; ROWS rows per program, each walking
    its own chunks in tiles of BLOCK codes.

    First fp32 scores s (terms - 2 <x, c> for l2, -<x, c> for ip; an fp32 dot of D products
    errs by at most D u sum |x_i c_i|, within the scan's bound eps), kept per tile position
    as the lowest (and its code) and the second lowest, with no reduction inside the loop.
    Every code that can be the nearest has s <= lowest + 2 eps; where a position's second
    lowest is within that too the row is flagged for the exact scan, else each position
    holds at most one such code, and those get float64 distances. Flagged rows (by the scan
    or here) are appended to order for the exact scan."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # over N * G
    live = rows < NG
    flagged = live & (tl.load(flag_ptr + rows, mask=live, other=0) != 0)
    live = live & ~flagged
    g = rows % G
    x_rows = x_ptr + (rows // G) * sxn + g * sxg
    c_rows = c_ptr + g * scg
    terms = terms_ptr + g * K
    dk = tl.arange(0, D_PAD)
    x = tl.load(x_rows[:, None] + dk[None, :] * sxd, mask=live[:, None] & (dk[None, :] < D),
                other=0.0).to(tl.float32)
    lanes = tl.load(cand_ptr + rows[:, None] * CAND + tl.arange(0, CAND)[None, :],
                    mask=live[:, None], other=-1)
    count = tl.sum((lanes >= 0).to(tl.int32), axis=1)
    offs = tl.arange(0, BLOCK)
    best = tl.full([ROWS, BLOCK], float("inf"), dtype=tl.float32)
    second = tl.full([ROWS, BLOCK], float("inf"), dtype=tl.float32)
    best_j = tl.full([ROWS, BLOCK], K, dtype=tl.int32)
    for slot in range(tl.max(count, axis=0)):
        lane = tl.load(cand_ptr + rows * CAND + slot, mask=slot < count, other=-1)
        lo = tl.maximum(lane, 0) * chunk
        hi = tl.where(lane >= 0, tl.minimum(lo + chunk, K), lo)
        for k0 in range(0, tl.max(hi - lo, axis=0), BLOCK):
            codes = lo[:, None] + k0 + offs[None, :]
            valid = codes < hi[:, None]
            cv = tl.load(c_rows[:, None, None] + codes[:, :, None].to(tl.int64) * sck
                         + dk[None, None, :] * scd,
                         mask=valid[:, :, None] & (dk[None, None, :] < D), other=0.0)
            dot = tl.sum(cv.to(tl.float32) * x[:, None, :], axis=2)
            if METRIC == 0:
                dot = 2.0 * dot
            s = tl.load(terms[:, None] + codes, mask=valid, other=float("inf")) - dot
            second = tl.minimum(second, tl.maximum(best, s))
            best_j = tl.where(s < best, codes, best_j)
            best = tl.minimum(best, s)
    threshold = candidate_threshold(tl.min(best, axis=1),
                                    tl.load(eps_ptr + rows, mask=live, other=0.0))
    crowded = tl.max((second <= threshold[:, None]).to(tl.int32), axis=1) > 0
    near = live[:, None] & (best <= threshold[:, None])
    d = _exact_distances(x_rows, live, c_rows, best_j, near, D, sxd, sck, scd, METRIC, BLOCK_D)
    m = tl.min(d, axis=1)
    j = tl.min(tl.where(d == m[:, None], best_j, K), axis=1)
    tl.store(dist_ptr + rows, m, mask=live & ~crowded)
    tl.store(idx_ptr + rows, j.to(tl.int64), mask=live & ~crowded)
    tl.store(flag_ptr + rows, tl.full([ROWS], 1, dtype=tl.int8), mask=live & crowded)
    _append_flagged(rows, flagged | (live & crowded), order_ptr, count_ptr)


@triton.jit
def _fold_next(d, codes, valid, prev_d, prev_j, best_d, best_j, K):
    """Folds distances d [R, C] of codes [R, C] into each row's (best_d, best_j) [R]: the
    lexicographically smallest (distance, index) after (prev_d, prev_j)."""
    after = valid & ((d > prev_d[:, None]) | ((d == prev_d[:, None]) & (codes > prev_j[:, None])))
    d = tl.where(after, d, float("inf"))
    m = tl.min(d, axis=1)
    j = tl.min(tl.where(after & (d == m[:, None]), codes, K), axis=1)
    take = (m < best_d) | ((m == best_d) & (j < best_j))
    return tl.where(take, m, best_d), tl.where(take, j, best_j)


@triton.jit
def _lane_topk_kernel(x_ptr, c_ptr, cand_ptr, order_ptr, count_ptr, dist_ptr, idx_ptr, G, K, D,
                      lanes, sxn, sxg, sxd, scg, sck, scd, METRIC: tl.constexpr,
                      K_SEL: tl.constexpr, CAND: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Rows flagged FLAG_LANES (order[:count]): their K_SEL best codes, exactly, among all
    codes of their candidates' lanes (code j sits in lane j % lanes: the codes lane,
    lane + lanes, ...), each found as the lexicographically next (dist, index) after the
    previous one. One row per program at a time."""
    offs = tl.arange(0, BLOCK)
    per_lane = tl.cdiv(K, lanes)
    one = tl.full([1], 0, dtype=tl.int64)  # [1]-shaped row tensors
    for slot in range(tl.program_id(0), tl.load(count_ptr), tl.num_programs(0)):
        row = tl.load(order_ptr + slot)
        g = row % G
        x_row = x_ptr + (row // G) * sxn + g * sxg + one
        c_row = c_ptr + g * scg + one
        prev_d = tl.full([1], float("-inf"), dtype=tl.float64)
        prev_j = tl.full([1], -1, dtype=tl.int32)
        for t in range(K_SEL):
            best_d = tl.full([1], float("inf"), dtype=tl.float64)
            best_j = tl.full([1], K, dtype=tl.int32)
            for s in range(CAND):
                code = tl.load(cand_ptr + row * CAND + s)
                lane = tl.maximum(code, 0) % lanes
                for i0 in range(0, tl.where(code >= 0, per_lane, 0), BLOCK):
                    codes = (lane + (i0 + offs) * lanes)[None, :]
                    valid = codes < K
                    d = _exact_distances(x_row, one == 0, c_row, codes, valid, D, sxd, sck, scd,
                                         METRIC, BLOCK_D)
                    best_d, best_j = _fold_next(d, codes, valid, prev_d, prev_j, best_d,
                                                best_j, K)
            tl.store(dist_ptr + row * K_SEL + t + one, best_d)
            tl.store(idx_ptr + row * K_SEL + t + one, best_j.to(tl.int64))
            prev_d = best_d
            prev_j = best_j


@triton.jit
def _split_topk_kernel(x_ptr, c_ptr, order_ptr, count_ptr, part_d_ptr, part_i_ptr,
                       G, K, D, sxn, sxg, sxd, scg, sck, scd, num_splits, split_codes,
                       METRIC: tl.constexpr, K_SEL: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Item (batch, s): the K_SEL best codes of chunk s for the ROWS flagged rows
    order[batch * ROWS ...], each found as the lexicographically next (dist, index) after the
    previous one. The rows of a batch share the chunk's code tiles."""
    offs = tl.arange(0, BLOCK)
    count = tl.load(count_ptr)
    total = tl.cdiv(count, ROWS) * num_splits
    for item in range(tl.program_id(0), total, tl.num_programs(0)):
        slots = (item // num_splits) * ROWS + tl.arange(0, ROWS)
        row_ok = slots < count
        row = tl.load(order_ptr + slots, mask=row_ok, other=0)
        lo = ((item % num_splits) * split_codes).to(tl.int32)  # code numbers are int32
        hi = tl.minimum(lo + split_codes, K)
        g = row % G
        x_rows = x_ptr + (row // G) * sxn + g * sxg
        c_rows = c_ptr + g * scg
        prev_d = tl.full([ROWS], float("-inf"), dtype=tl.float64)
        prev_j = tl.full([ROWS], -1, dtype=tl.int32)
        for t in range(K_SEL):
            best_d = tl.full([ROWS], float("inf"), dtype=tl.float64)
            best_j = tl.full([ROWS], K, dtype=tl.int32)
            for k0 in range(lo, hi, BLOCK):
                codes = tl.broadcast_to((k0 + offs)[None, :], [ROWS, BLOCK])
                valid = codes < hi
                d = _exact_distances(x_rows, row_ok, c_rows, codes, valid, D, sxd, sck, scd,
                                     METRIC, BLOCK_D)
                best_d, best_j = _fold_next(d, codes, valid, prev_d, prev_j, best_d, best_j, K)
            out = ((slots * num_splits + item % num_splits) * K_SEL + t).to(tl.int64)
            tl.store(part_d_ptr + out, best_d, mask=row_ok)
            tl.store(part_i_ptr + out, best_j.to(tl.int64), mask=row_ok)
            prev_d = best_d
            prev_j = best_j


@triton.jit
def _merge_topk_kernel(order_ptr, count_ptr, part_d_ptr, part_i_ptr, dist_ptr, idx_ptr, K,
                       num_parts, K_SEL: tl.constexpr, BLOCK: tl.constexpr):
    """Flagged row order[slot]: the K_SEL best of its num_parts chunk results (slot-major)."""
    offs = tl.arange(0, BLOCK)
    inf64 = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    for slot in range(tl.program_id(0), tl.load(count_ptr), tl.num_programs(0)):
        row = tl.load(order_ptr + slot)
        base = slot * num_parts
        prev_d = -tl.max(inf64, axis=0)
        prev_j = tl.min(offs * 0 - 1, axis=0).to(tl.int64)
        for t in range(K_SEL):
            best_d = tl.max(inf64, axis=0)
            best_j = tl.min(offs * 0 + K, axis=0).to(tl.int64)
            for p0 in range(0, num_parts, BLOCK):
                p = p0 + offs
                valid = p < num_parts
                d = tl.load(part_d_ptr + base + p, mask=valid, other=float("inf"))
                j = tl.load(part_i_ptr + base + p, mask=valid, other=K)
                after = valid & ((d > prev_d) | ((d == prev_d) & (j > prev_j)))
                d = tl.where(after, d, float("inf"))
                m = tl.min(d, axis=0)
                jm = tl.min(tl.where(after & (d == m), j, K), axis=0)
                take = (m < best_d) | ((m == best_d) & (jm < best_j))
                best_d = tl.where(take, m, best_d)
                best_j = tl.where(take, jm, best_j)
            tl.store(dist_ptr + row * K_SEL + t, best_d)
            tl.store(idx_ptr + row * K_SEL + t, best_j)
            prev_d = best_d
            prev_j = best_j


def _rows_per_batch(cb3):
    """Flagged rows that share each code tile: SPLIT_ROWS where the codebook would stream
    from memory once per row (over half the L2 cache), 1 where it stays in L2 and sharing
    would only cost parallelism. The interpreter takes SPLIT_ROWS (tests set it)."""
    if interpreting():
        return SPLIT_ROWS
    l2_bytes = torch.cuda.get_device_properties(cb3.device).L2_cache_size
    return SPLIT_ROWS if cb3.numel() * cb3.element_size() > l2_bytes // 2 else 1


def _num_programs(device):
    if interpreting():
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def rerank_and_fallback(x3, cb3, cand, flag, dist, idx, k, metric_id, strides, chunk=None,
                        lanes=0):
    """Fills dist, idx [N, G, k] from the scan's candidates; flagged rows get an exact walk.
    The candidates are codes (the interleaved scan with `lanes` lanes), or with
    chunk = (length, terms [G, K], eps [N, G]) from the chunk scan (k = 1) lanes whose
    chunks of `length` codes hold them."""
    num_rows, num_groups, dim = x3.shape
    num_codes = cb3.shape[1]
    rows = num_rows * num_groups
    cand_slots = cand.shape[-1]
    # float64 tiles of at most 2048 values: no register spills (ptxas, sm_90a).
    block_d = min(16, triton.next_power_of_2(dim))
    order = torch.empty(2 * rows, device=x3.device, dtype=torch.int64)  # the flagged rows
    counts = torch.zeros(2, device=x3.device, dtype=torch.int64)  # FLAG_ALL, FLAG_LANES
    count = counts[:1]
    if chunk is not None:
        length, terms, eps = chunk
        d_pad = triton.next_power_of_2(dim)
        _chunk_exact_kernel[(triton.cdiv(rows, CHUNK_ROWS),)](
            x3, cb3, terms, eps, cand, flag, order, count, dist, idx, rows, num_groups, num_codes,
            dim, length, *strides, METRIC=metric_id, CAND=cand_slots, ROWS=CHUNK_ROWS,
            BLOCK=2048 // (CHUNK_ROWS * d_pad), D_PAD=d_pad, BLOCK_D=block_d, num_warps=4,
            enable_fp_fusion=False)
    else:
        rerank_rows = 16  # [16, CAND <= 128] float64 distances: 154 registers (ptxas, sm_90a)
        _rerank_kernel[(triton.cdiv(rows, rerank_rows),)](
            x3, cb3, cand, flag, order, counts, dist, idx, rows, num_groups, num_codes, dim,
            *strides, METRIC=metric_id, K_SEL=k, CAND=cand_slots, ROWS=rerank_rows,
            BLOCK_D=block_d, num_warps=4, enable_fp_fusion=False)
        if lanes:  # rows flagged FLAG_LANES (none without the scan's lane count)
            _lane_topk_kernel[(_num_programs(x3.device),)](
                x3, cb3, cand, order[rows:], counts[1:], dist, idx, num_groups, num_codes, dim,
                lanes, *strides, METRIC=metric_id, K_SEL=k, CAND=cand_slots,
                BLOCK=2048 // block_d, BLOCK_D=block_d, num_warps=4, enable_fp_fusion=False)
    # Chunks of SPLIT_CODES codes, fewer where every row's k results per chunk would not fit.
    max_splits = max(1, PARTIALS_BYTES // (16 * k * rows))
    num_splits = min(triton.cdiv(num_codes, SPLIT_CODES), max_splits)
    split_codes = triton.cdiv(num_codes, num_splits)
    part_d = torch.empty(rows * num_splits * k, device=x3.device, dtype=torch.float64)
    part_i = torch.empty(rows * num_splits * k, device=x3.device, dtype=torch.int64)
    programs = _num_programs(x3.device)
    batch = _rows_per_batch(cb3)
    _split_topk_kernel[(programs,)](
        x3, cb3, order, count, part_d, part_i, num_groups, num_codes, dim, *strides,
        num_splits, split_codes, METRIC=metric_id, K_SEL=k, ROWS=batch,
        BLOCK=2048 // (batch * block_d), BLOCK_D=block_d, num_warps=4, enable_fp_fusion=False)
    _merge_topk_kernel[(programs,)](order, count, part_d, part_i, dist, idx, num_codes,
                                    num_splits * k, K_SEL=k, BLOCK=128, num_warps=4)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {"x_ptr": "*fp32", "c_ptr": "*fp32", "cand_ptr": "*i32", "flag_ptr": "*i8",
          "dist_ptr": "*fp32", "idx_ptr": "*i64", "order_ptr": "*i64", "count_ptr": "*i64",
          "part_d_ptr": "*fp64", "part_i_ptr": "*i64"}
_NO_FMA = {"enable_fp_fusion": False}
COMPILE_CASES = [
    ("_rerank_kernel", dict(METRIC=0, K_SEL=1, CAND=16, ROWS=16, BLOCK_D=16), _TYPES, _NO_FMA),
    # Unit strides as the JIT specialises them: the tile layout that fused unevenly (k = 8).
    ("_rerank_kernel", dict(METRIC=0, K_SEL=8, CAND=16, ROWS=16, BLOCK_D=16, sxd=1, scd=1),
     _TYPES, _NO_FMA),
    ("_chunk_exact_kernel", dict(METRIC=0, CAND=16, ROWS=8, BLOCK=32, D_PAD=8, BLOCK_D=8),
     dict(_TYPES, x_ptr="*bf16", c_ptr="*bf16", terms_ptr="*fp32", eps_ptr="*fp32"), _NO_FMA),
    ("_chunk_exact_kernel", dict(METRIC=1, CAND=16, ROWS=8, BLOCK=8, D_PAD=32, BLOCK_D=16),
     dict(_TYPES, terms_ptr="*fp32", eps_ptr="*fp32"), _NO_FMA),
    ("_split_topk_kernel", dict(METRIC=0, K_SEL=1, ROWS=8, BLOCK=16, BLOCK_D=16), _TYPES,
     _NO_FMA),
    ("_split_topk_kernel", dict(METRIC=0, K_SEL=1, ROWS=1, BLOCK=128, BLOCK_D=16), _TYPES,
     _NO_FMA),
    ("_split_topk_kernel", dict(METRIC=2, K_SEL=4, ROWS=8, BLOCK=32, BLOCK_D=8), _TYPES,
     _NO_FMA),
    ("_lane_topk_kernel", dict(METRIC=0, K_SEL=1, CAND=16, BLOCK=128, BLOCK_D=16), _TYPES,
     _NO_FMA),
    ("_lane_topk_kernel", dict(METRIC=2, K_SEL=4, CAND=16, BLOCK=256, BLOCK_D=8), _TYPES,
     _NO_FMA),
    ("_merge_topk_kernel", dict(K_SEL=1, BLOCK=128), _TYPES),
    ("_merge_topk_kernel", dict(K_SEL=8, BLOCK=128), _TYPES),
]
