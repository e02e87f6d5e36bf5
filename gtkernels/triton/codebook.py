"""Exact codebook search on tensor cores.

1. ``_scan_kernel``: one program owns BLOCK_N rows and streams over all K codes in tiles of
   LANES codes (tl.dot over D chunks, fp32 accumulation; fp32 inputs on tf32). The approximate
   score s_j (l2: ||c_j||^2 - 2<x, c_j>; ip: -<x, c_j>; cosine: -<x, c_j> / ||c_j||) errs by at
   most eps (a bound from the rounding analysis, see ``score_bound``). Code j sits in lane
   j % LANES; per row and lane the kernel keeps the lane's best score and index, and per row
   ``runner_up`` = the best score of any code that is not its lane's best. With
   T = (k-th smallest lane best) + 2 eps, every code of the exact top-k has s_j <= T (k codes
   have true distance <= their s + eps <= k-th + eps). If runner_up > T, the lane bests with
   s <= T are all the candidates, compacted into CAND slots; otherwise (or with more than
   CAND candidates) the row is flagged. LANES is 64 (128 for k > 16).
2. ``_rerank_kernel``: float64 distances of a row's candidates, k smallest (ties to the lowest
   index), ROWS rows per program. Flagged rows are skipped.
3. ``_fallback_kernel``: for flagged rows only (others return at once), an exact float64 scan
   of all codes, k times, each time the lexicographically next (dist, index).
No host synchronisation anywhere.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from .norms import row_sq_norms

METRIC_IDS = {"l2": 0, "ip": 1, "cosine": 2}
COSINE_EPS = 1e-8
_COSINE_EPS_K = tl.constexpr(COSINE_EPS)  # the same, readable inside kernels
UNIT = 2.0 ** -24  # fp32 unit roundoff
TF32_PRODUCT_REL = 2.0 ** -9  # two operands truncated to 10 mantissa bits
SAFETY = 2.0


@triton.jit
def _dot_chunked(x_rows, row_mask, c_base, cols, D, sxd, sck, scd,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                 LANES_: tl.constexpr, BLOCK_D: tl.constexpr):
    """<x_n, c_j> of a [BLOCK_N, LANES] tile, looping over D in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_N, LANES_], dtype=tl.float32)
    dk = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dk
        xb = tl.load(x_rows + dd[None, :] * sxd, mask=row_mask[:, None] & (dd[None, :] < D), other=0.0)
        cb = tl.load(c_base + cols[None, :] * sck + dd[:, None] * scd,
                     mask=(dd[:, None] < D), other=0.0)
        acc = tl.dot(xb.to(DOT_DTYPE), cb.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _scan_kernel(x_ptr, c_ptr, nterm_ptr, eps_ptr, cand_ptr, flag_ptr,
                 N, G, K, D, sxn, sxg, sxd, scg, sck, scd,
                 METRIC: tl.constexpr, K_SEL: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, LANES_: tl.constexpr, CAND: tl.constexpr,
                 D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lanes = tl.arange(0, LANES_)
    x_rows = x_ptr + g.to(tl.int64) * sxg + rows[:, None].to(tl.int64) * sxn
    c_base = c_ptr + g.to(tl.int64) * scg
    if D_PAD <= BLOCK_D:  # the rows' x stays in registers for the whole scan
        dk = tl.arange(0, BLOCK_D)
        x_tile = tl.load(x_rows + dk[None, :] * sxd, mask=row_mask[:, None] & (dk[None, :] < D),
                         other=0.0).to(DOT_DTYPE)
    best = tl.full([BLOCK_N, LANES_], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N, LANES_], dtype=tl.int32)
    runner_up = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    for k0 in range(0, K, LANES_):
        cols = k0 + lanes
        # Codes past K read code K-1 (in bounds) and are masked to +inf below.
        safe_cols = tl.minimum(cols, K - 1)
        if D_PAD <= BLOCK_D:
            cb = tl.load(c_base + safe_cols[None, :] * sck + dk[:, None] * scd,
                         mask=dk[:, None] < D, other=0.0)
            acc = tl.dot(x_tile, cb.to(DOT_DTYPE), input_precision=PRECISION)
        else:
            acc = _dot_chunked(x_rows, row_mask, c_base, safe_cols, D, sxd, sck, scd, DOT_DTYPE,
                               PRECISION, BLOCK_N, LANES_, BLOCK_D)
        nt = tl.load(nterm_ptr + g * K + safe_cols)
        if METRIC == 0:
            s = nt[None, :] - 2.0 * acc
        elif METRIC == 1:
            s = -acc
        else:
            s = -acc * nt[None, :]
        s = tl.where(cols[None, :] < K, s, float("inf"))
        runner_up = tl.minimum(runner_up, tl.min(tl.maximum(best, s), axis=1))
        better = s < best
        best = tl.where(better, s, best)
        best_idx = tl.where(better, cols[None, :], best_idx)
    # k-th smallest lane best: take the smallest out k - 1 times (once per row block).
    remaining = best
    for _ in tl.static_range(K_SEL - 1):
        low = tl.min(remaining, axis=1)
        first = tl.min(tl.where(remaining == low[:, None], lanes[None, :], LANES_), axis=1)
        remaining = tl.where(lanes[None, :] == first[:, None], float("inf"), remaining)
    kth = tl.min(remaining, axis=1)
    eps = tl.load(eps_ptr + rows * G + g, mask=row_mask, other=0.0)
    threshold = kth + 2.0 * eps
    # Compact the candidate lanes into CAND slots per row (-1 = empty); more than CAND
    # candidates also sends the row to the exact fallback.
    is_cand = best <= threshold[:, None]
    slot = tl.cumsum(is_cand.to(tl.int32), axis=1) - 1
    count = tl.sum(is_cand.to(tl.int32), axis=1)
    out = cand_ptr + (rows.to(tl.int64) * G + g) * CAND
    tl.store(out[:, None] + slot, best_idx, mask=row_mask[:, None] & is_cand & (slot < CAND))
    slots = tl.arange(0, CAND)
    tl.store(out[:, None] + slots[None, :], tl.full([BLOCK_N, CAND], -1, dtype=tl.int32),
             mask=row_mask[:, None] & (slots[None, :] >= count[:, None]))
    flag = (runner_up <= threshold) | (count > CAND)
    tl.store(flag_ptr + rows * G + g, flag.to(tl.int8), mask=row_mask)


def _prune_scan_configs(configs, named_args, **kwargs):
    """x in registers (BLOCK_D = padded D) up to D = 256, D chunks of 32 or 64 above 64."""
    d_pad = max(16, triton.next_power_of_2(named_args["D"]))
    keep = [c for c in configs if (c.kwargs["BLOCK_D"] == d_pad and d_pad <= 256)
            or (d_pad > 64 and c.kwargs["BLOCK_D"] in (32, 64))]
    return keep or configs[:1]


_scan_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
             for bd in (16, 32, 64, 128, 256)
             for bn, w, st in [(64, 4, 3), (128, 8, 3), (64, 4, 2), (128, 8, 2)]],
    key=["D", "METRIC", "K_SEL", "LANES_"],
    prune_configs_by={"early_config_prune": _prune_scan_configs},
)(_scan_kernel)


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
def _rerank_kernel(x_ptr, c_ptr, cand_ptr, flag_ptr, dist_ptr, idx_ptr,
                   NG, G, K, D, sxn, sxg, sxd, scg, sck, scd,
                   METRIC: tl.constexpr, K_SEL: tl.constexpr, CAND: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # over N * G
    live = (rows < NG)
    live = live & (tl.load(flag_ptr + rows, mask=live, other=1) == 0)
    g = rows % G
    codes = tl.load(cand_ptr + rows[:, None] * CAND + tl.arange(0, CAND)[None, :],
                    mask=live[:, None], other=-1)
    valid = codes >= 0
    codes = tl.where(valid, codes, 0)
    d = _exact_distances(x_ptr + (rows // G) * sxn + g * sxg, live, c_ptr + g * scg, codes,
                         valid, D, sxd, sck, scd, METRIC, BLOCK_D)
    for t in tl.static_range(K_SEL):
        m = tl.min(d, axis=1)
        j = tl.min(tl.where(d == m[:, None], codes, K), axis=1)
        tl.store(dist_ptr + rows * K_SEL + t, m, mask=live)
        tl.store(idx_ptr + rows * K_SEL + t, j.to(tl.int64), mask=live)
        d = tl.where(codes == j[:, None], float("inf"), d)


@triton.jit
def _fallback_kernel(x_ptr, c_ptr, flag_ptr, dist_ptr, idx_ptr,
                     G, K, D, sxn, sxg, sxd, scg, sck, scd,
                     METRIC: tl.constexpr, K_SEL: tl.constexpr, BLOCK: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(flag_ptr + row) == 0:
        return
    g = row % G
    x_row = tl.zeros([1], dtype=tl.int64) + ((row // G) * sxn + g * sxg)
    c_row = tl.zeros([1], dtype=tl.int64) + g * scg
    offs = tl.arange(0, BLOCK)
    inf64 = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    prev_d = -tl.max(inf64, axis=0)
    prev_j = tl.min(offs * 0 - 1, axis=0)
    for t in range(K_SEL):
        best_d = tl.max(inf64, axis=0)
        best_j = tl.min(offs * 0 + K, axis=0)
        for k0 in range(0, K, BLOCK):
            codes = k0 + offs
            valid = codes < K
            d = _exact_distances(x_ptr + x_row, x_row >= 0, c_ptr + c_row, codes[None, :],
                                 valid[None, :], D, sxd, sck, scd, METRIC, BLOCK_D)
            d = tl.reshape(d, [BLOCK])
            after = (d > prev_d) | ((d == prev_d) & (codes > prev_j))
            d = tl.where(valid & after, d, float("inf"))
            m = tl.min(d, axis=0)
            j = tl.min(tl.where(valid & after & (d == m), codes, K), axis=0)
            take = (m < best_d) | ((m == best_d) & (j < best_j))
            best_d = tl.where(take, m, best_d)
            best_j = tl.where(take, j, best_j)
        tl.store(dist_ptr + row * K_SEL + t, best_d)
        tl.store(idx_ptr + row * K_SEL + t, best_j.to(tl.int64))
        prev_d = best_d
        prev_j = best_j


def score_bound(x3, norms, metric):
    """Per-row bound eps [N, G] (float32) on |approximate score - exact score| of the scan.

    A length-D dot product accumulated in fp32 in any order errs by at most ~D u sum|x_i c_i|
    <= D u ||x|| ||c|| (u = 2**-24; tensor-core accumulation taken as 4 D u); tf32 operands
    (fp32 inputs) add 2**-9 relative per product; norms computed in fp32 err by ~D u ||c||^2.
    With C = max_j ||c_j||: l2: 2 dot_rel ||x|| C + norm_rel C^2, ip: dot_rel ||x|| C,
    cosine: (dot_rel + norm_rel) ||x||; all times SAFETY, plus final roundings.
    """
    dim = x3.shape[-1]
    acc_rel = 4.0 * (dim + 16) * UNIT
    input_rel = {torch.float32: TF32_PRODUCT_REL, torch.float64: TF32_PRODUCT_REL + 2 * UNIT}
    dot_rel = input_rel.get(x3.dtype, 0.0) + acc_rel
    norm_rel = 2.0 * (dim + 8) * UNIT + (2 * UNIT if x3.dtype == torch.float64 else 0.0)
    code_norm_max = (norms.amax(dim=1) * (1 + norm_rel)).sqrt() * (1 + 4 * UNIT)  # [G]
    x_norm = row_sq_norms(x3.reshape(-1, dim)).view(x3.shape[0], x3.shape[1])
    x_norm = (x_norm * (1 + norm_rel)).sqrt() * (1 + 4 * UNIT)
    if metric == "l2":
        eps = ((2 * dot_rel + 4 * UNIT) * x_norm * code_norm_max
               + (norm_rel + 2 * UNIT) * code_norm_max ** 2)
    elif metric == "ip":
        eps = (dot_rel + 2 * UNIT) * x_norm * code_norm_max
    else:
        eps = (dot_rel + norm_rel + 6 * UNIT) * x_norm
    return (SAFETY * eps + 1e-30).float().contiguous()


def _dot_dtype(dtype):
    if interpreting():  # the interpreter's bf16 dot is unreliable; fp32 is exact for bf16 too
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


def codebook_search(x3, cb3, k, metric, codebook_norms=None):
    """x3 [N, G, D], cb3 [G, K, D] (last dims contiguous or not) -> (dist, idx) [N, G, k]."""
    num_rows, num_groups, dim = x3.shape
    num_codes = cb3.shape[1]
    dist_dtype = torch.float64 if x3.dtype == torch.float64 else torch.float32
    dist = torch.empty((num_rows, num_groups, k), device=x3.device, dtype=dist_dtype)
    idx = torch.empty((num_rows, num_groups, k), device=x3.device, dtype=torch.int64)
    if num_rows == 0:
        return dist, idx
    if codebook_norms is None:
        norms = row_sq_norms(cb3.reshape(-1, dim)).view(num_groups, num_codes)
    else:
        norms = codebook_norms.float().contiguous()
    nterm = norms if metric != "cosine" else norms.sqrt().clamp_min(COSINE_EPS).reciprocal()
    eps = score_bound(x3, norms, metric)
    # Lanes (= codes per tile) hold the per-lane best in registers: 64 keeps the scan free of
    # register spills (ptxas, sm_90a); 128 lowers lane collisions (fallback rows) for large k.
    lanes = 64 if k <= 16 else 128
    cand_slots = min(lanes, max(16, 2 * triton.next_power_of_2(k)))
    cand = torch.empty((num_rows, num_groups, cand_slots), device=x3.device, dtype=torch.int32)
    flag = torch.empty((num_rows, num_groups), device=x3.device, dtype=torch.int8)
    metric_id = METRIC_IDS[metric]
    strides = (*x3.stride(), *cb3.stride())
    args = (x3, cb3, nterm.contiguous(), eps, cand, flag, num_rows, num_groups, num_codes, dim,
            *strides)
    options = dict(METRIC=metric_id, K_SEL=k, DOT_DTYPE=_dot_dtype(x3.dtype), LANES_=lanes,
                   CAND=cand_slots, D_PAD=max(16, triton.next_power_of_2(dim)))
    if interpreting():  # one small configuration: the interpreter is slow
        _scan_kernel[(triton.cdiv(num_rows, 16), num_groups)](
            *args, **options, PRECISION="ieee", BLOCK_N=16, BLOCK_D=16)
    else:
        grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]), num_groups)  # noqa: E731
        _scan_kernel_tuned[grid](*args, **options, PRECISION="tf32")
    # [rows, CAND, BLOCK_D] float64 tiles of 2048 values: no register spills (ptxas, sm_90a).
    block_d = min(16, triton.next_power_of_2(dim))
    rows = num_rows * num_groups
    rerank_rows = max(1, 128 // cand_slots)
    _rerank_kernel[(triton.cdiv(rows, rerank_rows),)](
        x3, cb3, cand, flag, dist, idx, rows, num_groups, num_codes, dim, *strides,
        METRIC=metric_id, K_SEL=k, CAND=cand_slots, ROWS=rerank_rows, BLOCK_D=block_d,
        num_warps=4)
    _fallback_kernel[(rows,)](x3, cb3, flag, dist, idx, num_groups, num_codes, dim, *strides,
                              METRIC=metric_id, K_SEL=k, BLOCK=64, BLOCK_D=block_d,
                              num_warps=4)
    return dist, idx
