"""Exact codebook search on tensor cores.

1. ``_scan_kernel``: one program owns BLOCK_N rows and streams over all K codes in tiles of
   LANES codes (tl.dot over D chunks, fp32 accumulation). bf16 / fp16 inputs go in as they
   are; fp32 / fp64 inputs are first rounded to fp16 after a power-of-two scaling (per row of
   x, per sub-codebook), up to D = 21 as fp16 pairs (value and residual), and what the
   operands miss enters the error bound (``scan_operands``). The approximate
   score s_j (l2: ||c_j||^2 - 2<x, c_j>; ip: -<x, c_j>; cosine: -<x, c_j> / ||c_j||) errs by
   at most eps (``score_bound``). Code j sits in lane j % LANES; per row and lane the kernel
   keeps the lane's best score and index, and the lane's ``runner_up`` = the best score of
   its codes that are not the lane's best (a per-lane min/max, reduced over lanes once at the
   end). With T = (k-th smallest lane best) + 2 eps, every code of the exact top-k has
   s_j <= T (k codes have true distance <= their s + eps <= k-th + eps). If the row's
   runner-up > T, the lane bests with s <= T are all the candidates, compacted into CAND
   slots; otherwise those codes still lie in the candidates' lanes, and the row is flagged
   for an exact walk of those lanes (FLAG_LANES), or with more than CAND candidates for
   the exact scan of all codes (FLAG_ALL). LANES is 32-128
   (128 for k > 16). Cheap per-code updates: only the last tile is masked; the runner-up is
   (best + s) - new best (two fp32 adds, their rounding <= 4 u max(|lowest|, |T|) is added to
   the flag test). Packed scan (l2, D < padded D): the spare dimension D carries a per-row
   bias (~||x||^2, ``packed_bias``) so scores are distances, and the tile number replaces the
   low ``tile_bits`` significand bits of each score: one min per code tracks best and index.
   A packed score errs by < 2**tile_bits ulps, i.e. 2**(tile_bits - 23) |s|; over the scores
   that matter (between the row's lowest and T) this adds 2**(tile_bits - 22) (max(|lowest|,
   |k-th|) + 2 eps) to eps (the factor 2 covers T's own growth), so the proof above holds
   with the larger eps.
2. codebook_chunk_scan.py replaces it for k = 1 with small operands (padded D <= 32; l2 and
   ip): lane j owns the contiguous chunk of codes j * L ... (j + 1) * L - 1 and keeps only
   its lowest score, one fma and one min per code (no index, no runner-up). Every code that
   can be the nearest lies in a lane whose lowest score is within the row's lowest + 2 eps;
   those lanes are the candidates (more than CAND: flagged).
3. codebook_exact.py: float64 re-rank of the candidate codes (or, after the chunk scan, of
   the candidate lanes' chunks); codebook_fallback.py: for flagged rows, a float64 walk of
   their candidates' lanes or an exact float64 scan of all codes, split over the codebook.
No host synchronisation anywhere.
"""
import torch
import triton
import triton.language as tl

from ..reference.codebook import COSINE_EPS
from . import interpreting
from ._common import autotune
from .codebook_bound import candidate_threshold, packed_bias, score_bound, store_candidates
from .codebook_chunk_scan import CHUNK_MAX_DIM, launch_chunk_scan
from .codebook_exact import FLAG_ALL_K, FLAG_LANES_K, rerank_and_fallback
from .codebook_operands import UNIT, dot_dtype, scan_operands
from .norms import row_sq_norms

METRIC_IDS = {"l2": 0, "ip": 1, "cosine": 2}
UNIT_K = tl.constexpr(UNIT)
TRUNCATION_REL = tl.constexpr(2.0 ** -22)  # 2 x the relative error of one unit in the last place


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
def _scan_tile(best, best_idx, runner_up, x_tile, x_rows, row_mask, c_base, nterm_ptr, neg_factor,
               k0, keep_bits, K, D, sxd, sck, scd,
               METRIC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               LANES_: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PACK: tl.constexpr, FULL_D: tl.constexpr,
               LAST: tl.constexpr):
    """Folds the codes k0 .. k0 + LANES - 1 into the per-lane state. Only the LAST tile may
    reach past K: its codes past K read code K - 1 (in bounds) and score +inf."""
    cols = k0 + tl.arange(0, LANES_)
    if LAST:
        cols_in = tl.minimum(cols, K - 1)
    else:
        cols_in = cols
    if D_PAD <= BLOCK_D:
        dk = tl.arange(0, BLOCK_D)
        if FULL_D:  # D = D_PAD, or codes padded to D_PAD (PACK): no mask, so the tiles
            # load as whole vectors and the compiler pipelines them (cp.async on sm_90)
            cb = tl.load(c_base + cols_in[None, :] * sck + dk[:, None] * scd).to(DOT_DTYPE)
        else:
            cb = tl.load(c_base + cols_in[None, :] * sck + dk[:, None] * scd,
                         mask=dk[:, None] < D, other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x_tile, cb, input_precision=PRECISION)
    else:
        acc = _dot_chunked(x_rows, row_mask, c_base, cols_in, D, sxd, sck, scd, DOT_DTYPE,
                           PRECISION, BLOCK_N, LANES_, BLOCK_D)
    nt = tl.load(nterm_ptr + cols_in)
    if METRIC == 0:
        s = nt[None, :] + acc * neg_factor
    elif METRIC == 1:
        s = acc * neg_factor
    else:
        s = acc * neg_factor * nt[None, :]
    if PACK:  # the tile number replaces the score's low significand bits
        s = ((s.to(tl.int32, bitcast=True) & keep_bits) | (k0 // LANES_)).to(
            tl.float32, bitcast=True)
    if LAST:
        s = tl.where(cols[None, :] < K, s, float("inf"))
    if PACK:  # one min per code for the best and its index
        runner_up = tl.minimum(runner_up, tl.maximum(best, s))
        new_best = tl.minimum(best, s)
    else:
        # runner-up = min over codes of max(best before, s) = (best + s) - new best: two fp32
        # adds (off the min/max pipe) whose rounding the flag test allows for.
        better = s < best
        new_best = tl.where(better, s, best)
        best_idx = tl.where(better, cols[None, :], best_idx)
        runner_up = tl.minimum(runner_up, (best + s) - new_best)
    return new_best, best_idx, runner_up


@triton.jit
def _kth_lowest(best, lanes, K_SEL: tl.constexpr, LANES_: tl.constexpr):
    """Per row the k-th smallest of best [BLOCK_N, LANES]: the smallest taken out k - 1
    times (once per row block, not per code; a loop, as unrolled it cost ptxas 5x the time
    at k = 64)."""
    remaining = best
    for _ in range(K_SEL - 1):
        low = tl.min(remaining, axis=1)
        first = tl.min(tl.where(remaining == low[:, None], lanes[None, :], LANES_), axis=1)
        remaining = tl.where(lanes[None, :] == first[:, None], float("inf"), remaining)
    return tl.min(remaining, axis=1)


@triton.jit
def _scan_kernel(x_ptr, c_ptr, nterm_ptr, factor_ptr, bias_ptr, eps_ptr, cand_ptr, flag_ptr,
                 N, G, K, D, sxn, sxg, sxd, scg, sck, scd,
                 METRIC: tl.constexpr, K_SEL: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, LANES_: tl.constexpr, CAND: tl.constexpr,
                 D_PAD: tl.constexpr, PACK: tl.constexpr, FULL_D: tl.constexpr,
                 BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lanes = tl.arange(0, LANES_)
    x_rows = x_ptr + g.to(tl.int64) * sxg + rows[:, None].to(tl.int64) * sxn
    c_base = c_ptr + g.to(tl.int64) * scg
    nterm_g = nterm_ptr + g * K
    x_tile = tl.zeros([BLOCK_N, BLOCK_D], dtype=DOT_DTYPE)
    if D_PAD <= BLOCK_D:  # the rows' x stays in registers for the whole scan
        dk = tl.arange(0, BLOCK_D)
        x_tile = tl.load(x_rows + dk[None, :] * sxd, mask=row_mask[:, None] & (dk[None, :] < D),
                         other=0.0).to(DOT_DTYPE)
        if PACK:
            bias = tl.load(bias_ptr + rows * G + g, mask=row_mask, other=0.0)
            x_tile = tl.where(dk[None, :] == D, bias[:, None].to(DOT_DTYPE), x_tile)
    # Packed scores keep the tile number in their low `tile_bits` bits.
    num_tiles = tl.cdiv(K, LANES_)
    tile_bits = 0
    while (1 << tile_bits) < num_tiles:
        tile_bits += 1
    keep_bits = -(1 << tile_bits)
    best = tl.full([BLOCK_N, LANES_], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N, LANES_], dtype=tl.int32)
    runner_up = tl.full([BLOCK_N, LANES_], float("inf"), dtype=tl.float32)
    # The dot's scale: 2 (l2) or 1, over the operands' power-of-two scalings, negated once
    # here so that every score is one fma (a negated accumulator cost sm_90 an extra XOR per
    # score: ptxas did not fold it into the fma).
    neg_factor = -tl.load(factor_ptr + rows * G + g, mask=row_mask, other=0.0)[:, None]
    full_end = (K // LANES_) * LANES_
    for k0 in range(0, full_end, LANES_):
        best, best_idx, runner_up = _scan_tile(
            best, best_idx, runner_up, x_tile, x_rows, row_mask, c_base, nterm_g, neg_factor, k0,
            keep_bits, K, D, sxd, sck, scd, METRIC, DOT_DTYPE, PRECISION, LANES_,
            D_PAD, BLOCK_N, BLOCK_D, PACK, FULL_D, False)
    if full_end < K:
        best, best_idx, runner_up = _scan_tile(
            best, best_idx, runner_up, x_tile, x_rows, row_mask, c_base, nterm_g, neg_factor,
            full_end, keep_bits, K, D, sxd, sck, scd, METRIC, DOT_DTYPE, PRECISION,
            LANES_, D_PAD, BLOCK_N, BLOCK_D, PACK, FULL_D, True)
    if PACK:
        best_idx = (best.to(tl.int32, bitcast=True) & ~keep_bits) * LANES_ + lanes[None, :]
    # k-th smallest lane best: take the smallest out k - 1 times (once per row block).
    kth = _kth_lowest(best, lanes, K_SEL, LANES_)
    eps = tl.load(eps_ptr + rows * G + g, mask=row_mask, other=0.0)
    if PACK:  # a packed score errs by < 2**tile_bits units in its last place
        lowest = tl.min(best, axis=1)
        span = tl.maximum(tl.abs(lowest), tl.abs(kth)) + 2.0 * eps
        eps += (1 << tile_bits).to(tl.float32) * TRUNCATION_REL * span + 1e-30
    threshold = candidate_threshold(kth, eps)
    # Compact the candidate lanes into CAND slots per row (-1 = empty); more than CAND
    # candidates also sends the row to the exact fallback.
    count = store_candidates(best, best_idx, threshold, row_mask,
                             cand_ptr + (rows.to(tl.int64) * G + g) * CAND, CAND, BLOCK_N)
    # The runner-up's two roundings err by at most 4 u max(|lowest|, |threshold|).
    runner_slack = 4.0 * UNIT_K * tl.maximum(tl.abs(tl.min(best, axis=1)), tl.abs(threshold))
    # A lane with two codes within the threshold: the candidates' lanes still hold every code
    # that can be among the k best (FLAG_LANES); more candidates than slots: FLAG_ALL.
    crowded = tl.min(runner_up, axis=1) <= threshold + runner_slack
    flag = tl.where(count > CAND, FLAG_ALL_K, tl.where(crowded, FLAG_LANES_K, 0))
    tl.store(flag_ptr + rows * G + g, flag.to(tl.int8), mask=row_mask)


def _prune_scan_configs(configs, named_args, **kwargs):
    """x in registers (BLOCK_D = padded D) up to D = 256, D chunks of 32 or 64 above 64; 128
    lanes for k > 16 (more candidate slots); x tiles of at most 128 x 256."""
    d_pad = max(16, triton.next_power_of_2(named_args["D"]))
    keep = [c for c in configs
            if ((c.kwargs["BLOCK_D"] == d_pad and d_pad <= 256)
                or (d_pad > 64 and c.kwargs["BLOCK_D"] in (32, 64)))
            and (kwargs["K_SEL"] <= 16 or c.kwargs["LANES_"] == 128)
            and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] <= 128 * 256]
    return keep or configs[:1]


# (rows, lanes, warps): the per-lane state (best, index, runner-up) is 3 * rows * lanes values
# in registers, at most 96 per thread (packed: 2, but 64 per thread spills, ptxas sm_90a).
_SCAN_SHAPES = [(64, 64, 4), (128, 64, 8), (64, 128, 8), (128, 32, 4), (256, 32, 8),
                (32, 128, 4)]
_scan_kernel_tuned = autotune(
    configs=[triton.Config({"BLOCK_N": bn, "LANES_": lanes, "BLOCK_D": bd}, num_warps=w,
                           num_stages=3)
             for bd in (16, 32, 64, 128, 256) for bn, lanes, w in _SCAN_SHAPES],
    key=["D", "METRIC", "K_SEL", "DOT_DTYPE", "PACK"],
    prune_configs_by={"early_config_prune": _prune_scan_configs},
)(_scan_kernel)



def _padded_codes(cs, d_pad, bias_code):
    """The packed scan's codes [G, K, d_pad] (contiguous, so tiles load as whole vectors
    without a mask): cs in the first D' dims, bias_code in dim D', zeros after."""
    op_dim = cs.shape[-1]
    padded = torch.nn.functional.pad(cs, (0, d_pad - op_dim))
    padded[..., op_dim] = bias_code
    return padded


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
    xs, cs, scale, x_err, c_err = scan_operands(x3, cb3)
    op_dim = xs.shape[-1]  # D, or 3 D for split fp32 operands
    x_sq = row_sq_norms(x3.reshape(-1, dim)).view(num_rows, num_groups)  # read once
    eps = score_bound(x3, x_sq, norms, metric, op_dim, x_err, c_err)
    factor = (2 * scale if metric == "l2" else scale).contiguous()
    d_pad = max(16, triton.next_power_of_2(op_dim))
    cand_slots = min(128, max(16, 2 * triton.next_power_of_2(k)))
    cand = torch.empty((num_rows, num_groups, cand_slots), device=x3.device, dtype=torch.int32)
    flag = torch.empty((num_rows, num_groups), device=x3.device, dtype=torch.int8)
    metric_id = METRIC_IDS[metric]
    chunk, lanes = None, 0
    if k == 1 and metric != "cosine" and d_pad <= CHUNK_MAX_DIM:
        terms = nterm if metric == "l2" else torch.zeros_like(nterm)
        length = launch_chunk_scan(xs, cs, terms, factor, eps, cand, flag, d_pad)
        chunk = (length, terms, eps)
    else:
        lanes = _launch_scan(x3, xs, cs, x_sq, nterm, factor, eps, cand, flag, metric, k, d_pad)
    rerank_and_fallback(x3, cb3, cand, flag, dist, idx, k, metric_id,
                        (*x3.stride(), *cb3.stride()), chunk, lanes)
    return dist, idx


def _launch_scan(x3, xs, cs, x_sq, nterm, factor, eps, cand, flag, metric, k, d_pad):
    """Every other search: ``_scan_kernel`` (lanes interleaved, best, index and runner-up
    per lane) writes candidate codes to cand and flags; returns its number of lanes."""
    num_rows, num_groups, op_dim = xs.shape
    # Packed scores (the tile number in the low bits: one min per code for best and index)
    # where the spare dimension can carry the bias that keeps them small: l2, D < padded D,
    # and x in registers (padded D <= 64; the interpreter's BLOCK_D is 16).
    pack = metric == "l2" and op_dim < d_pad <= (16 if interpreting() else 64)
    bias = factor  # read only when packing
    if pack:
        bias, bias_code, eps = packed_bias(x3, x_sq, xs, factor, eps)
        cs = _padded_codes(cs, d_pad, bias_code)
    # Lanes (= codes per tile, each with its best in registers): the autotuner picks 32, 64
    # or 128, always 128 for k > 16 (fewer lane collisions, so fewer exact-fallback rows).
    args = (xs, cs, nterm.contiguous(), factor, bias, eps, cand, flag, num_rows, num_groups,
            cs.shape[1], op_dim, *xs.stride(), *cs.stride())
    options = dict(METRIC=METRIC_IDS[metric], K_SEL=k, DOT_DTYPE=dot_dtype(xs.dtype),
                   CAND=cand.shape[-1], D_PAD=d_pad, PACK=pack, FULL_D=pack or op_dim == d_pad)
    if interpreting():  # one small configuration: the interpreter is slow
        lanes = 64 if k <= 16 else 128
        _scan_kernel[(triton.cdiv(num_rows, 16), num_groups)](
            *args, **options, PRECISION="ieee", BLOCK_N=16, BLOCK_D=16, LANES_=lanes)
        return lanes
    grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]), num_groups)  # noqa: E731
    _scan_kernel_tuned[grid](*args, **options, PRECISION="ieee")
    return _scan_kernel_tuned.best_config.kwargs["LANES_"]


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_SCAN_TYPES = {"x_ptr": "*fp16", "c_ptr": "*fp16", "nterm_ptr": "*fp32", "factor_ptr": "*fp32",
               "bias_ptr": "*fp32", "eps_ptr": "*fp32", "cand_ptr": "*i32", "flag_ptr": "*i8"}
_BF16_TYPES = dict(_SCAN_TYPES, x_ptr="*bf16", c_ptr="*bf16")
COMPILE_CASES = [
    ("_scan_kernel", dict(METRIC=0, K_SEL=1, DOT_DTYPE=tl.bfloat16, PRECISION="ieee", LANES_=32,
                          CAND=16, D_PAD=16, PACK=True, FULL_D=True, BLOCK_N=128, BLOCK_D=16),
     _BF16_TYPES),
    ("_scan_kernel", dict(METRIC=0, K_SEL=1, DOT_DTYPE=tl.float16, PRECISION="ieee", LANES_=64,
                          CAND=16, D_PAD=16, PACK=False, FULL_D=False, BLOCK_N=128, BLOCK_D=16),
     _SCAN_TYPES),
    # fp32 inputs with D = 8 as fp16 pairs: 24 operand dims, packed.
    ("_scan_kernel", dict(METRIC=0, K_SEL=1, DOT_DTYPE=tl.float16, PRECISION="ieee", LANES_=64,
                          CAND=16, D_PAD=32, PACK=True, FULL_D=True, BLOCK_N=64, BLOCK_D=32),
     _SCAN_TYPES),
    ("_scan_kernel", dict(METRIC=2, K_SEL=4, DOT_DTYPE=tl.bfloat16, PRECISION="ieee", LANES_=64,
                          CAND=16, D_PAD=256, PACK=False, FULL_D=True, BLOCK_N=64, BLOCK_D=256),
     _BF16_TYPES),
    # k = 64 at D = 1000 (the largest GPU test; its compile time is part of the case).
    ("_scan_kernel", dict(METRIC=0, K_SEL=64, DOT_DTYPE=tl.float16, PRECISION="ieee",
                          LANES_=128, CAND=128, D_PAD=1024, PACK=False, FULL_D=False, BLOCK_N=64,
                          BLOCK_D=64),
     _SCAN_TYPES),
]
