"""The float64 stages of the exact codebook search (after the tensor-core scan of codebook.py).

- ``_rerank_kernel``: float64 distances of a row's candidate codes (one candidate slot at a
  time, for the slots in use), the k smallest (ties to the lowest index), ROWS rows per
  program. Rows the scan flagged are skipped (and listed).
- ``_chunk_exact_kernel``: the same for the chunk scan (k = 1), whose candidates are lanes:
  the row's nearest code over the chunks of codes those lanes own (fp32 scores first, float64
  for the codes within the bound of the lowest; rows where that is not one code per tile
  position are flagged).
The flagged rows then take codebook_fallback.py's walks. float64 distances come from
codebook_float64.py (which says why these kernels run without fma contraction).
"""
import torch
import triton
import triton.language as tl

from .codebook_bound import candidate_threshold
from .codebook_fallback import scan_all_codes, walk_lanes
from .codebook_float64 import exact_distances

CHUNK_ROWS = 8              # rows per program of the chunk search's exact stage
FLAG_ALL = 1                # flag values: the exact scan of all codes,
FLAG_LANES = 2              # or of every code of the candidates' lanes (interleaved scan)
FLAG_ALL_K, FLAG_LANES_K = tl.constexpr(FLAG_ALL), tl.constexpr(FLAG_LANES)  # inside kernels


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
    _append_flagged(rows, live & (flag == FLAG_ALL_K), order_ptr, count_ptr)
    _append_flagged(rows, live & (flag == FLAG_LANES_K), order_ptr + NG, count_ptr + 1)
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
        ds = exact_distances(x_rows, live, c_rows, tl.maximum(code, 0)[:, None],
                             (code >= 0)[:, None], D, sxd, sck, scd, METRIC, BLOCK_D)
        d = tl.where(slots[None, :] == s, ds, d)
    for t in range(K_SEL):  # a loop, not unrolled: k = 64 unrolled took ptxas minutes
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
    d = exact_distances(x_rows, live, c_rows, best_j, near, D, sxd, sck, scd, METRIC, BLOCK_D)
    m = tl.min(d, axis=1)
    j = tl.min(tl.where(d == m[:, None], best_j, K), axis=1)
    tl.store(dist_ptr + rows, m, mask=live & ~crowded)
    tl.store(idx_ptr + rows, j.to(tl.int64), mask=live & ~crowded)
    tl.store(flag_ptr + rows, tl.full([ROWS], 1, dtype=tl.int8), mask=live & crowded)
    _append_flagged(rows, flagged | (live & crowded), order_ptr, count_ptr)


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
        # [rows, CAND] float64 distances of at most 256 values: 16 rows for k <= 8 (CAND 16,
        # 154 registers, ptxas sm_90a), fewer as k grows (at 16 x 128, k = 64, ptxas ran
        # for over ten minutes).
        rerank_rows = max(1, 256 // cand_slots)
        _rerank_kernel[(triton.cdiv(rows, rerank_rows),)](
            x3, cb3, cand, flag, order, counts, dist, idx, rows, num_groups, num_codes, dim,
            *strides, METRIC=metric_id, K_SEL=k, CAND=cand_slots, ROWS=rerank_rows,
            BLOCK_D=block_d, num_warps=4, enable_fp_fusion=False)
        if lanes:  # rows flagged FLAG_LANES (none without the scan's lane count)
            walk_lanes(x3, cb3, cand, order[rows:], counts[1:], dist, idx, k, metric_id, strides,
                       lanes, block_d)
    scan_all_codes(x3, cb3, order, count, dist, idx, k, metric_id, strides, block_d)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {"x_ptr": "*fp32", "c_ptr": "*fp32", "cand_ptr": "*i32", "flag_ptr": "*i8",
          "dist_ptr": "*fp32", "idx_ptr": "*i64", "order_ptr": "*i64", "count_ptr": "*i64"}
_NO_FMA = {"enable_fp_fusion": False}
COMPILE_CASES = [
    ("_rerank_kernel", dict(METRIC=0, K_SEL=1, CAND=16, ROWS=16, BLOCK_D=16), _TYPES, _NO_FMA),
    # Unit strides as the JIT specialises them: the tile layout that fused unevenly (k = 8).
    ("_rerank_kernel", dict(METRIC=0, K_SEL=8, CAND=16, ROWS=16, BLOCK_D=16, sxd=1, scd=1),
     _TYPES, _NO_FMA),
    ("_rerank_kernel", dict(METRIC=0, K_SEL=64, CAND=128, ROWS=2, BLOCK_D=16), _TYPES, _NO_FMA),
    ("_chunk_exact_kernel", dict(METRIC=0, CAND=16, ROWS=8, BLOCK=32, D_PAD=8, BLOCK_D=8),
     dict(_TYPES, x_ptr="*bf16", c_ptr="*bf16", terms_ptr="*fp32", eps_ptr="*fp32"), _NO_FMA),
    ("_chunk_exact_kernel", dict(METRIC=1, CAND=16, ROWS=8, BLOCK=8, D_PAD=32, BLOCK_D=16),
     dict(_TYPES, terms_ptr="*fp32", eps_ptr="*fp32"), _NO_FMA),
]
