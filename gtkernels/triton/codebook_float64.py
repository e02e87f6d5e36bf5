"""float64 distances for the exact stages of the codebook search (codebook_exact.py,
codebook_fallback.py).

Their kernels launch with ``enable_fp_fusion=False``: with fma contraction a sum of squares
rounds differently depending on which product the compiler fuses, and on sm_90 it fused
differently for different register slots of one tile, so two copies of one code got float64
distances one ulp apart and the tie went to the wrong copy. Without contraction each product
and sum is rounded once, in an order fixed by the tile layout (the same for every code), so
equal codes get bitwise equal distances and the lowest-index rule decides their order.
"""
import triton
import triton.language as tl

from ..reference.codebook import COSINE_EPS

_COSINE_EPS_K = tl.constexpr(COSINE_EPS)  # the same, readable inside kernels


@triton.jit
def exact_distances(x_rows, row_ok, c_rows, codes, valid, D, sxd, sck, scd,
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
def fold_next(d, codes, valid, prev_d, prev_j, best_d, best_j, K):
    """Folds distances d [R, C] of codes [R, C] into each row's (best_d, best_j) [R]: the
    lexicographically smallest (distance, index) after (prev_d, prev_j)."""
    after = valid & ((d > prev_d[:, None]) | ((d == prev_d[:, None]) & (codes > prev_j[:, None])))
    d = tl.where(after, d, float("inf"))
    m = tl.min(d, axis=1)
    j = tl.min(tl.where(after & (d == m[:, None]), codes, K), axis=1)
    take = (m < best_d) | ((m == best_d) & (j < best_j))
    return tl.where(take, m, best_d), tl.where(take, j, best_j)
