"""The codebook search's chunk scan: k = 1 with small operands (padded D <= CHUNK_MAX_DIM; l2
and ip). Lane j owns the contiguous chunk of codes j * L ... (j + 1) * L - 1 and keeps only its
lowest score, one fma and one min per code (no index, no runner-up). Every code that can be the
nearest lies in a lane whose lowest score is within the row's lowest + 2 eps; those lanes are
the candidates (more than CAND: flagged), and codebook_exact.py walks their chunks.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import autotune
from .codebook_bound import candidate_threshold, store_candidates
from .codebook_operands import dot_dtype

CHUNK_LANES = 128     # lanes (= chunks) of the chunk scan
CHUNK_MAX_DIM = 32    # its largest padded operand width (bf16 / fp16 D <= 32, fp32 D <= 10)


@triton.jit
def _chunk_scan_kernel(x_ptr, c_ptr, nterm_ptr, factor_ptr, eps_ptr, cand_ptr, flag_ptr,
                       N, G, D, num_tiles, sxn, sxg, sxd,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LANES_: tl.constexpr,
                       CAND: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The k = 1 scan of small operands (padded D <= CHUNK_MAX_DIM): lane j owns a
    contiguous chunk of codes, j * num_tiles ... (j + 1) * num_tiles - 1, and keeps only its
    lowest score: one fma and one min per code. c_ptr holds the codes tile-major
    [G, num_tiles, LANES, D_PAD] and nterm_ptr their score terms [G, num_tiles, LANES]
    (``_chunk_layout``: zeros and +inf past K, so no tile needs a mask). The lanes whose
    lowest score is within the row's lowest + 2 eps hold every code that can be the nearest;
    their numbers go to cand_ptr, and codebook_exact.py walks their chunks."""
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lanes = tl.arange(0, LANES_)
    dk = tl.arange(0, D_PAD)
    x_rows = x_ptr + g.to(tl.int64) * sxg + rows[:, None].to(tl.int64) * sxn
    x_tile = tl.load(x_rows + dk[None, :] * sxd, mask=row_mask[:, None] & (dk[None, :] < D),
                     other=0.0).to(DOT_DTYPE)
    neg_factor = -tl.load(factor_ptr + rows * G + g, mask=row_mask, other=0.0)[:, None]
    tile = (c_ptr + g.to(tl.int64) * num_tiles * LANES_ * D_PAD + lanes[None, :] * D_PAD
            + dk[:, None])
    terms = nterm_ptr + g.to(tl.int64) * num_tiles * LANES_ + lanes
    best = tl.full([BLOCK_N, LANES_], float("inf"), dtype=tl.float32)
    for _ in range(num_tiles):
        acc = tl.dot(x_tile, tl.load(tile).to(DOT_DTYPE), input_precision=PRECISION)
        best = tl.minimum(best, tl.load(terms)[None, :] + acc * neg_factor)
        tile += LANES_ * D_PAD
        terms += LANES_
    eps = tl.load(eps_ptr + rows * G + g, mask=row_mask, other=0.0)
    threshold = candidate_threshold(tl.min(best, axis=1), eps)
    count = store_candidates(best, tl.broadcast_to(lanes[None, :], [BLOCK_N, LANES_]),
                             threshold, row_mask,
                             cand_ptr + (rows.to(tl.int64) * G + g) * CAND,
                             CAND, BLOCK_N)
    tl.store(flag_ptr + rows * G + g, (count > CAND).to(tl.int8), mask=row_mask)


# The chunk scan keeps one value per lane: (rows, warps) with at most 64 per thread.
_chunk_scan_kernel_tuned = autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bn, w in ((32, 4), (64, 4), (64, 8), (128, 8)) for st in (3, 4)],
    key=["D", "DOT_DTYPE"],
)(_chunk_scan_kernel)


def _chunk_layout(cs, nterm, d_pad):
    """The chunk scan's tile-major copies of the codes cs [G, K, D'] and their score terms
    nterm [G, K]: codes [G, tiles, LANES, d_pad] where tile t, lane j holds code
    j * tiles + t (zeros past K and past D'), terms [G, tiles, LANES] (+inf past K), with
    tiles = ceil(K / LANES). Returns them and tiles (the chunk length)."""
    num_groups, num_codes, op_dim = cs.shape
    tiles = triton.cdiv(num_codes, CHUNK_LANES)
    spare = CHUNK_LANES * tiles - num_codes
    codes = torch.nn.functional.pad(cs, (0, d_pad - op_dim, 0, spare))
    codes = codes.view(num_groups, CHUNK_LANES, tiles, d_pad).transpose(1, 2).contiguous()
    terms = torch.nn.functional.pad(nterm, (0, spare), value=float("inf"))
    terms = terms.view(num_groups, CHUNK_LANES, tiles).transpose(1, 2).contiguous()
    return codes, terms, tiles


def launch_chunk_scan(xs, cs, terms, factor, eps, cand, flag, d_pad):
    """k = 1, padded D <= CHUNK_MAX_DIM, l2 or ip: ``_chunk_scan_kernel`` writes the
    candidate lanes (chunks) to cand and flags; returns the chunk length."""
    num_rows, num_groups, op_dim = xs.shape
    codes, terms, tiles = _chunk_layout(cs, terms, d_pad)
    args = (xs, codes, terms, factor, eps, cand, flag, num_rows, num_groups, op_dim, tiles,
            *xs.stride())
    options = dict(DOT_DTYPE=dot_dtype(xs.dtype), PRECISION="ieee", LANES_=CHUNK_LANES,
                   CAND=cand.shape[-1], D_PAD=d_pad)
    if interpreting():
        _chunk_scan_kernel[(triton.cdiv(num_rows, 16), num_groups)](*args, **options,
                                                                    BLOCK_N=16)
    else:
        grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]), num_groups)  # noqa: E731
        _chunk_scan_kernel_tuned[grid](*args, **options)
    return tiles


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {"x_ptr": "*fp16", "c_ptr": "*fp16", "nterm_ptr": "*fp32", "factor_ptr": "*fp32",
          "eps_ptr": "*fp32", "cand_ptr": "*i32", "flag_ptr": "*i8"}
_BF16_TYPES = dict(_TYPES, x_ptr="*bf16", c_ptr="*bf16")
COMPILE_CASES = [
    ("_chunk_scan_kernel", dict(DOT_DTYPE=tl.bfloat16, PRECISION="ieee", LANES_=128, CAND=16,
                                D_PAD=16, BLOCK_N=32), _BF16_TYPES),
    # fp32 inputs with D = 8 as fp16 pairs: 24 operand dims in 32.
    ("_chunk_scan_kernel", dict(DOT_DTYPE=tl.float16, PRECISION="ieee", LANES_=128, CAND=16,
                                D_PAD=32, BLOCK_N=64), _TYPES),
]
