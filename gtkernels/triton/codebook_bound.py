"""The codebook scan's error bound: per row, how far an approximate score can be from the
exact one (``score_bound``), the candidates it implies (``candidate_threshold``,
``store_candidates``), and the packed scan's bias (``packed_bias``).

A dot of op_dim products accumulated in fp32 in any order errs by at most ~op_dim u
sum_i |x'_i c'_i| <= op_dim u mag_x mag_c (u = 2**-24; tensor-core accumulation taken as
4 (op_dim + 16) u); norms computed in fp32 err by ~D u ||c||^2. The operands' own error
(``scan_operands``) adds res_x ||c|| + mag_x res_c + cross_x cross_c. With C = max_j ||c_j||:
l2: 2 dot_err + norm_rel C^2, ip: dot_err, cosine: dot_err / ||c_j||, bounded with the
largest ratios over the codes; all times SAFETY, plus final roundings.
"""
import torch
import triton
import triton.language as tl

from ..reference.codebook import COSINE_EPS
from . import interpreting
from .codebook_operands import FP16_SCALE_EXP, UNIT, fp32_norm_rel

SAFETY = 2.0
_UNIT_K = tl.constexpr(UNIT)
_SAFETY_K = tl.constexpr(SAFETY)


@triton.jit
def _row_bound_kernel(x_sq_ptr, x_err_ptr, norm_max_ptr, c_max_ptr, eps_ptr, R, G, norm_rel,
                      acc_rel, METRIC: tl.constexpr, HAS_ERR: tl.constexpr,
                      BLOCK: tl.constexpr):
    """eps [R = N G] from the rows' x_sq [R] (||x||^2 in fp32), the largest ||c||^2 of each
    sub-codebook norm_max [G] and, for fp32 / fp64 inputs (HAS_ERR), the operands' error
    terms x_err [R, 3] = (mag, res, cross) with their group maxima c_max [G, 3] (for cosine
    the maxima over the codes of c_err / ||c_j||). Square roots are correctly rounded and
    inflated by (1 + 4 u), so x_norm >= ||x|| and code_norm >= C."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < R
    g = r % G
    grow = 1.0 + 4.0 * _UNIT_K
    x_norm = tl.sqrt_rn(tl.load(x_sq_ptr + r, mask=ok, other=0.0) * (1.0 + norm_rel)) * grow
    code_norm = tl.sqrt_rn(tl.load(norm_max_ptr + g, mask=ok, other=0.0) * (1.0 + norm_rel)) * grow
    if HAS_ERR:
        x_mag = tl.load(x_err_ptr + r * 3, mask=ok, other=0.0)
        x_res = tl.load(x_err_ptr + r * 3 + 1, mask=ok, other=0.0)
        x_cross = tl.load(x_err_ptr + r * 3 + 2, mask=ok, other=0.0)
        c_mag = tl.load(c_max_ptr + g * 3, mask=ok, other=0.0)
        c_res = tl.load(c_max_ptr + g * 3 + 1, mask=ok, other=0.0)
        c_cross = tl.load(c_max_ptr + g * 3 + 2, mask=ok, other=0.0)
    else:  # bf16 / fp16: the operands are the inputs
        x_mag = x_norm
        x_res = 0.0
        x_cross = 0.0
        c_mag = code_norm
        if METRIC == 2:
            c_mag = 1.0  # ||c_j|| / ||c_j||
        c_res = 0.0
        c_cross = 0.0
    dot_err = acc_rel * x_mag * c_mag + x_mag * c_res + x_cross * c_cross
    if METRIC == 0:
        eps = (2.0 * (dot_err + x_res * code_norm) + 4.0 * _UNIT_K * x_norm * code_norm
               + (norm_rel + 2.0 * _UNIT_K) * code_norm * code_norm)
    elif METRIC == 1:
        eps = dot_err + x_res * code_norm + 2.0 * _UNIT_K * x_norm * code_norm
    else:
        eps = dot_err + x_res + (norm_rel + 6.0 * _UNIT_K) * x_norm
    tl.store(eps_ptr + r, eps * _SAFETY_K + 1e-30, mask=ok)


@triton.jit
def candidate_threshold(lowest, eps):
    """lowest + 2 eps (every code that can rank before a code with score `lowest` scores
    at most this), raised by 4 u of itself for the rounding of that sum."""
    threshold = lowest + 2.0 * eps
    return threshold + 4.0 * _UNIT_K * tl.abs(threshold)


@triton.jit
def store_candidates(best, ids, threshold, row_mask, out, CAND: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Writes ids [BLOCK_N, LANES] of the lanes whose best <= threshold [BLOCK_N], compacted
    in lane order into CAND slots per row at out [BLOCK_N] pointers (-1 = empty slot), and
    returns their count per row (more than CAND: the row must be flagged)."""
    is_cand = best <= threshold[:, None]
    slot = tl.cumsum(is_cand.to(tl.int32), axis=1) - 1
    count = tl.sum(is_cand.to(tl.int32), axis=1)
    tl.store(out[:, None] + slot, ids, mask=row_mask[:, None] & is_cand & (slot < CAND))
    slots = tl.arange(0, CAND)
    tl.store(out[:, None] + slots[None, :], tl.full([BLOCK_N, CAND], -1, dtype=tl.int32),
             mask=row_mask[:, None] & (slots[None, :] >= count[:, None]))
    return count


def score_bound(x3, x_sq, norms, metric, op_dim, x_err=None, c_err=None):
    """Per-row bound eps [N, G] (float32) on |approximate score - exact score| of the scan.

    x3 [N, G, D] (its dtype and D), x_sq [N, G] fp32 the rows' ||x||^2 (``row_sq_norms``),
    norms [G, K] fp32 the codes' ||c||^2, op_dim the scan operands' width (D, or 3 D for
    fp16 pairs), x_err [N, G, 3] and c_err [G, K, 3] fp32 from ``scan_operands`` (None for
    bf16 / fp16 inputs). Three small launches: the per-group maxima and one kernel."""
    num_rows, num_groups = x_sq.shape
    norm_rel = fp32_norm_rel(x3.shape[-1]) + (2 * UNIT if x3.dtype == torch.float64 else 0.0)
    norm_max = norms.amax(dim=1).contiguous()
    c_max = norm_max  # read only with the error terms
    if c_err is not None and metric == "cosine":
        code_len = norms.sqrt().clamp_min(COSINE_EPS)
        inflate = (1 + norm_rel) * (1 + 4 * UNIT)
        c_max = ((c_err / code_len[..., None]).amax(dim=1) * inflate).contiguous()
    elif c_err is not None:
        c_max = c_err.amax(dim=1).contiguous()
    eps = torch.empty((num_rows, num_groups), device=x_sq.device, dtype=torch.float32)
    rows = num_rows * num_groups
    block = 128 if interpreting() else 1024
    _row_bound_kernel[(triton.cdiv(rows, block),)](
        x_sq, norm_max if x_err is None else x_err, norm_max, c_max, eps, rows, num_groups,
        norm_rel, _accumulation_rel(op_dim), METRIC={"l2": 0, "ip": 1, "cosine": 2}[metric],
        HAS_ERR=x_err is not None, BLOCK=block)
    return eps


def _accumulation_rel(dim):
    """Relative bound of a tensor-core dot of up to dim + 16 terms (4 (dim + 16) u)."""
    return 4.0 * (dim + 16) * UNIT


def packed_bias(x3, x_sq, xs, factor, eps):
    """The l2 scan's per-row bias in the spare dimension D (D < padded D): x~[:, D] times
    the codes' bias_code in that dimension adds about ||x||^2 to every score of the row, so
    the scores are the distances themselves, small near the best code, where packing the
    tile number into their low bits errs least. Any bias is exact (one constant per row);
    its rounding in the dot joins the bound: returns (bias [N, G] fp32, holding dot-dtype
    values, bias_code, eps + SAFETY acc_rel |bias| bias_code factor)."""
    bias_code = 1.0 if x3.dtype in (torch.bfloat16, torch.float16) else 2.0 ** FP16_SCALE_EXP
    bias = (-x_sq / (factor * bias_code)).clamp(-2.0 ** 15, 2.0 ** 15).to(xs.dtype).float()
    eps = eps + SAFETY * _accumulation_rel(xs.shape[-1]) * bias.abs() * (bias_code * factor)
    return bias.contiguous(), bias_code, eps.contiguous()


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {"x_sq_ptr": "*fp32", "x_err_ptr": "*fp32", "norm_max_ptr": "*fp32",
          "c_max_ptr": "*fp32", "eps_ptr": "*fp32", "norm_rel": "fp32", "acc_rel": "fp32"}
COMPILE_CASES = [
    ("_row_bound_kernel", dict(METRIC=0, HAS_ERR=True, BLOCK=1024), _TYPES),
    ("_row_bound_kernel", dict(METRIC=2, HAS_ERR=False, BLOCK=1024), _TYPES),
]
