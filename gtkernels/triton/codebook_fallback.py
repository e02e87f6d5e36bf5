"""The float64 walks of the rows that the codebook search's re-rank flags (codebook_exact.py
lists them on the device, with no host synchronisation).

- ``_lane_topk_kernel``: rows whose candidates' lanes hold more than one code within the
  bound (FLAG_LANES): the k best in float64 among all codes of those lanes.
- Rows flagged FLAG_ALL (more candidates than slots) take an exact float64 scan of all
  codes, split over the codebook so that a few such rows do not serialise on one program
  each: ``_split_topk_kernel`` has a fixed set of programs walk the (batch of rows, code
  chunk) items and write each chunk's k best per row (a batch shares every code tile it
  loads: 8 rows where the codebook exceeds half the L2 cache, else 1), and
  ``_merge_topk_kernel`` merges a row's chunks. Ties go to the lowest index everywhere, so
  the result does not depend on the split.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from .codebook_float64 import exact_distances, fold_next

SPLIT_CODES = 512           # codes per chunk of a flagged row's exact scan (at least)
SPLIT_ROWS = 8              # flagged rows that share each code tile of a large codebook
PARTIALS_BYTES = 64 << 20   # bound on the chunk results kept for the merge
SCRATCH_BYTES = 64 << 20    # bound on the float64 distances kept between the k passes


@triton.jit
def _distances(x_rows, row_ok, c_rows, codes, valid, D, sxd, sck, scd, kept, t,
               METRIC: tl.constexpr, SCRATCH: tl.constexpr, BLOCK_D: tl.constexpr):
    """exact_distances of the codes; with SCRATCH, pass t = 0 also stores them at `kept`
    (pointers shaped like codes) and later passes load them from there instead."""
    if SCRATCH:
        if t == 0:
            d = exact_distances(x_rows, row_ok, c_rows, codes, valid, D, sxd, sck, scd,
                                METRIC, BLOCK_D)
            tl.store(kept, d, mask=valid)
        else:
            d = tl.load(kept, mask=valid, other=float("inf"))
    else:
        d = exact_distances(x_rows, row_ok, c_rows, codes, valid, D, sxd, sck, scd, METRIC,
                            BLOCK_D)
    return d


@triton.jit
def _lane_topk_kernel(x_ptr, c_ptr, cand_ptr, order_ptr, count_ptr, dist_ptr, idx_ptr,
                      scratch_ptr, G, K, D, lanes, sxn, sxg, sxd, scg, sck, scd,
                      METRIC: tl.constexpr, K_SEL: tl.constexpr, CAND: tl.constexpr,
                      SCRATCH: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows flagged FLAG_LANES (order[:count]): their K_SEL best codes, exactly, among all
    codes of their candidates' lanes (code j sits in lane j % lanes: the codes lane,
    lane + lanes, ...), each found as the lexicographically next (dist, index) after the
    previous one. One row per program at a time. With SCRATCH the first pass keeps the
    distances in the program's [CAND, ceil(K / lanes)] float64 slice of scratch_ptr and the
    later passes read them back instead of recomputing them."""
    offs = tl.arange(0, BLOCK)
    per_lane = tl.cdiv(K, lanes)
    one = tl.full([1], 0, dtype=tl.int64)  # [1]-shaped row tensors
    own = scratch_ptr + tl.program_id(0).to(tl.int64) * CAND * per_lane
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
                    kept = own + s * per_lane + (i0 + offs)[None, :]
                    d = _distances(x_row, one == 0, c_row, codes, valid, D, sxd, sck, scd, kept,
                                   t, METRIC, SCRATCH, BLOCK_D)
                    best_d, best_j = fold_next(d, codes, valid, prev_d, prev_j, best_d,
                                               best_j, K)
            tl.store(dist_ptr + row * K_SEL + t + one, best_d)
            tl.store(idx_ptr + row * K_SEL + t + one, best_j.to(tl.int64))
            prev_d = best_d
            prev_j = best_j
            if SCRATCH:  # this pass's scratch writes (or reads) are done before the next's
                tl.debug_barrier()


@triton.jit
def _split_topk_kernel(x_ptr, c_ptr, order_ptr, count_ptr, part_d_ptr, part_i_ptr,
                       scratch_ptr, G, K, D, sxn, sxg, sxd, scg, sck, scd, num_splits,
                       split_codes, METRIC: tl.constexpr, K_SEL: tl.constexpr,
                       ROWS: tl.constexpr, SCRATCH: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Item (batch, s): the K_SEL best codes of chunk s for the ROWS flagged rows
    order[batch * ROWS ...], each found as the lexicographically next (dist, index) after the
    previous one. The rows of a batch share the chunk's code tiles. With SCRATCH the first
    pass keeps the distances in the program's [ROWS, split_codes] float64 slice of
    scratch_ptr and the later passes read them back instead of recomputing them."""
    offs = tl.arange(0, BLOCK)
    own = (scratch_ptr + tl.program_id(0).to(tl.int64) * ROWS * split_codes
           + tl.arange(0, ROWS)[:, None].to(tl.int64) * split_codes)
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
                d = _distances(x_rows, row_ok, c_rows, codes, valid, D, sxd, sck, scd,
                               own + (codes - lo), t, METRIC, SCRATCH, BLOCK_D)
                best_d, best_j = fold_next(d, codes, valid, prev_d, prev_j, best_d, best_j, K)
            out = ((slots * num_splits + item % num_splits) * K_SEL + t).to(tl.int64)
            tl.store(part_d_ptr + out, best_d, mask=row_ok)
            tl.store(part_i_ptr + out, best_j.to(tl.int64), mask=row_ok)
            prev_d = best_d
            prev_j = best_j
            if SCRATCH:  # this pass's scratch writes (or reads) are done before the next's
                tl.debug_barrier()


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


def num_programs(device):
    if interpreting():
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(k, values, device):
    """float64 [values] for the distances kept between the k passes of a walk, or a [1]
    placeholder (the walk recomputes them) for k = 1 or above SCRATCH_BYTES."""
    keep = k > 1 and 8 * values <= SCRATCH_BYTES
    return torch.empty(values if keep else 1, device=device, dtype=torch.float64)


def walk_lanes(x3, cb3, cand, order, count, dist, idx, k, metric_id, strides, lanes,
               block_d):
    """Rows order[:count] (FLAG_LANES): dist, idx [N, G, k] from every code of their
    candidates' lanes (code j in lane j % lanes)."""
    num_groups, num_codes, dim = cb3.shape[0], cb3.shape[1], x3.shape[2]
    programs = num_programs(x3.device)
    scratch = _scratch(k, programs * cand.shape[-1] * triton.cdiv(num_codes, lanes), x3.device)
    _lane_topk_kernel[(programs,)](
        x3, cb3, cand, order, count, dist, idx, scratch, num_groups, num_codes, dim, lanes,
        *strides, METRIC=metric_id, K_SEL=k, CAND=cand.shape[-1], SCRATCH=scratch.numel() > 1,
        BLOCK=2048 // block_d, BLOCK_D=block_d, num_warps=4, enable_fp_fusion=False)


def scan_all_codes(x3, cb3, order, count, dist, idx, k, metric_id, strides, block_d):
    """Rows order[:count] (FLAG_ALL): dist, idx [N, G, k] from all codes, split over the
    codebook and merged."""
    rows = x3.shape[0] * x3.shape[1]
    num_groups, num_codes, dim = cb3.shape[0], cb3.shape[1], x3.shape[2]
    # Chunks of SPLIT_CODES codes, fewer where every row's k results per chunk would not fit.
    max_splits = max(1, PARTIALS_BYTES // (16 * k * rows))
    num_splits = min(triton.cdiv(num_codes, SPLIT_CODES), max_splits)
    split_codes = triton.cdiv(num_codes, num_splits)
    part_d = torch.empty(rows * num_splits * k, device=x3.device, dtype=torch.float64)
    part_i = torch.empty(rows * num_splits * k, device=x3.device, dtype=torch.int64)
    programs = num_programs(x3.device)
    batch = _rows_per_batch(cb3)
    scratch = _scratch(k, programs * batch * split_codes, x3.device)
    _split_topk_kernel[(programs,)](
        x3, cb3, order, count, part_d, part_i, scratch, num_groups, num_codes, dim, *strides,
        num_splits, split_codes, METRIC=metric_id, K_SEL=k, ROWS=batch,
        SCRATCH=scratch.numel() > 1, BLOCK=2048 // (batch * block_d), BLOCK_D=block_d,
        num_warps=4, enable_fp_fusion=False)
    _merge_topk_kernel[(programs,)](order, count, part_d, part_i, dist, idx, num_codes,
                                    num_splits * k, K_SEL=k, BLOCK=128, num_warps=4)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {"x_ptr": "*fp32", "c_ptr": "*fp32", "cand_ptr": "*i32", "dist_ptr": "*fp32",
          "idx_ptr": "*i64", "order_ptr": "*i64", "count_ptr": "*i64", "part_d_ptr": "*fp64",
          "part_i_ptr": "*i64", "scratch_ptr": "*fp64"}
_NO_FMA = {"enable_fp_fusion": False}
# (METRIC, K_SEL, ROWS or CAND, SCRATCH, BLOCK, BLOCK_D)
COMPILE_CASES = [
    ("_split_topk_kernel", dict(METRIC=m, K_SEL=k, ROWS=r, SCRATCH=keep, BLOCK=b, BLOCK_D=bd),
     _TYPES, _NO_FMA)
    for m, k, r, keep, b, bd in [(0, 1, 8, False, 16, 16), (0, 1, 1, False, 128, 16),
                                 (2, 4, 8, False, 32, 8), (0, 64, 8, True, 16, 16)]
] + [
    ("_lane_topk_kernel", dict(METRIC=m, K_SEL=k, CAND=c, SCRATCH=keep, BLOCK=b, BLOCK_D=bd),
     _TYPES, _NO_FMA)
    for m, k, c, keep, b, bd in [(0, 1, 16, False, 128, 16), (2, 4, 16, False, 256, 8),
                                 (0, 64, 128, True, 128, 16)]
] + [("_merge_topk_kernel", dict(K_SEL=k, BLOCK=128), _TYPES) for k in (1, 8)]
