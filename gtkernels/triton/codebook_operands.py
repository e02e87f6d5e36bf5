"""The scan's fp16 operands of fp32 / fp64 inputs, made in one pass per side.

Each row v (a row of x, or a code) is scaled by a power of two s (per row of x, per
sub-codebook), so that its largest magnitude lands below 2**14 (fp16's maximum is 65504),
and rounded to fp16: v s = high + residual, exactly. Up to D = SPLIT_MAX_DIM, where the select
and not the dot limits the scan, the residual is rounded too (residual = low + rest) and the
operands are concatenations: x' = [xh, xh, xl] and c' = [ch, cl, ch], so that <x', c'> =
<xh, ch> + <xh, cl> + <xl, ch> misses only products with a residual of a residual (about
2**-22 of ||x|| ||c||, where one fp16 term misses 2**-11).

Per row the kernel also writes fp32 (mag, res, cross), in v's units, such that
sum_i |x'_i c'_i| / (s_x s_c) <= mag_x mag_c and the operands' dot, scaled back, differs from
<x, c> by at most res_x ||c|| + mag_x res_c + cross_x cross_c:
- one term: mag = ||high|| / s, res = ||residual|| / s, cross = 0;
- split: mag = (||high|| + ||low||) / s, res = ||rest|| / s, cross = ||low|| / s
  (<xs, cs> - <x', c'> = <xh, rest_c> + <xl, low_c> + <xl, rest_c> + <rest_x, cs>).
The norms are computed in fp32 and inflated by their relative rounding bound.
"""
import torch
import triton
import triton.language as tl

from . import interpreting

SPLIT_MAX_DIM = 21     # fp32 / fp64 inputs up to this D scan as fp16 pairs (3 D + 1 <= 64)
FP16_SCALE_EXP = 14    # scaled inputs stay below 2**14 in magnitude
UNIT = 2.0 ** -24      # fp32 unit roundoff


def fp32_norm_rel(dim):
    """Relative bound 2 (dim + 8) u on a sum of dim squares computed in fp32 (any order)."""
    return 2.0 * (dim + 8) * UNIT


@triton.jit
def _power_of_two_scale(amax):
    """fp32 2**(14 - e) with amax < 2**e, the exponent clamped to [-126, 126] (2**14 for
    amax = 0). amax's fp32 exponent field gives e; rounding amax to fp32 can only raise e,
    which keeps the scaled values in range."""
    biased = (amax.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF
    exponent = tl.minimum(tl.maximum(140 - biased, -126), 126)  # 14 - (biased - 126)
    exponent = tl.where(amax == 0, 14, exponent)
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_norms(v):
    """||v_r|| of the rows of v [R, D], in fp32."""
    v = v.to(tl.float32)
    return tl.sqrt(tl.sum(v * v, axis=1))


@triton.jit
def _operand_rows_kernel(v_ptr, group_amax_ptr, out_ptr, err_ptr, scale_ptr, R, inner, D,
                         s_outer, s_inner, s_d, inflate, IS_X: tl.constexpr, SPLIT: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r = (outer, inner) of v [outer, inner, D]: x [N, G, D] (IS_X: one scale per row,
    written to scale_ptr [N, G] as 1 / (s_x s_c) with s_c from group_amax_ptr[g]) or the
    codebook [G, K, D] (the scale of group_amax_ptr[g]). Writes the operand row out [R, D']
    (D' = 3 D when SPLIT, else D) and err [R, 3] = (mag, res, cross)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols[None, :] < D)
    outer = rows // inner
    base = outer.to(tl.int64) * s_outer + (rows % inner).to(tl.int64) * s_inner
    v = tl.load(v_ptr + base[:, None] + cols[None, :] * s_d, mask=mask, other=0.0)
    if IS_X:
        scale = _power_of_two_scale(tl.max(tl.abs(v), axis=1))
        code_scale = _power_of_two_scale(tl.load(group_amax_ptr + rows % inner, mask=row_ok,
                                                 other=0.0))
        tl.store(scale_ptr + rows, 1.0 / (scale * code_scale), mask=row_ok)
    else:
        scale = _power_of_two_scale(tl.load(group_amax_ptr + outer, mask=row_ok, other=0.0))
    scaled = v * scale[:, None].to(v.dtype)
    high = scaled.to(tl.float16)
    residual = scaled - high.to(v.dtype)  # exact: a value minus its rounding
    out_dim = 3 * D if SPLIT else D
    out = out_ptr + rows[:, None].to(tl.int64) * out_dim + cols[None, :]
    tl.store(out, high, mask=mask)
    unscale = inflate / scale
    high_norm = _row_norms(high) * unscale
    if SPLIT:
        low = residual.to(tl.float16)
        rest = residual - low.to(v.dtype)
        if IS_X:
            tl.store(out + D, high, mask=mask)
            tl.store(out + 2 * D, low, mask=mask)
        else:
            tl.store(out + D, low, mask=mask)
            tl.store(out + 2 * D, high, mask=mask)
        low_norm = _row_norms(low) * unscale
        mag = high_norm + low_norm
        res = _row_norms(rest) * unscale
        cross = low_norm
    else:
        mag = high_norm
        res = _row_norms(residual) * unscale
        cross = tl.zeros_like(res)
    tl.store(err_ptr + rows * 3, mag, mask=row_ok)
    tl.store(err_ptr + rows * 3 + 1, res, mask=row_ok)
    tl.store(err_ptr + rows * 3 + 2, cross, mask=row_ok)


def _operand_rows(v3, group_amax, is_x, split, scale=None):
    """v3 [A, B, D] (any strides) -> (operands [A, B, D'] fp16, err [A, B, 3] fp32)."""
    outer, inner, dim = v3.shape
    rows = outer * inner
    out = torch.empty((outer, inner, 3 * dim if split else dim), device=v3.device,
                      dtype=torch.float16)
    err = torch.empty((outer, inner, 3), device=v3.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(dim))
    block_r = max(1, min(64, 4096 // block_d))
    # The division by a power of two is exact.
    inflate = (1 + fp32_norm_rel(dim)) * (1 + 4 * UNIT)
    _operand_rows_kernel[(triton.cdiv(rows, block_r),)](
        v3, group_amax, out, err, scale if scale is not None else err, rows, inner, dim,
        *v3.stride(), inflate, IS_X=is_x, SPLIT=split, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4)
    return out, err


def dot_dtype(dtype):
    """The scan's tl.dot operand type for inputs of `dtype` (after scan_operands)."""
    if interpreting():  # the interpreter's bf16 dot is unreliable; fp32 is exact for bf16 too
        return tl.float32
    return {torch.bfloat16: tl.bfloat16}.get(dtype, tl.float16)


def scan_operands(x3, cb3):
    """The scan's tensor-core operands, the dot's scale and the operands' error terms.

    x3 [N, G, D] and cb3 [G, K, D] of one dtype. bf16 / fp16 inputs are used as they are.
    Returns (xs [N, G, D'], cs [G, K, D'], scale [N, G] fp32 = 1 / (s_x s_c), x_err, c_err):
    x_err fp32 [N, G, 3] = (mag, res, cross) per row, c_err the same [G, K, 3] per code (see
    the module docstring), or None for bf16 / fp16 inputs.
    """
    num_rows, num_groups, dim = x3.shape
    if x3.dtype in (torch.bfloat16, torch.float16):
        ones = torch.ones((num_rows, num_groups), device=x3.device, dtype=torch.float32)
        return x3, cb3, ones, None, None
    split = dim <= SPLIT_MAX_DIM
    group_amax = cb3.abs().amax(dim=(1, 2)).contiguous()                 # [G]
    cs, c_err = _operand_rows(cb3, group_amax, False, split)
    scale = torch.empty((num_rows, num_groups), device=x3.device, dtype=torch.float32)
    xs, x_err = _operand_rows(x3, group_amax, True, split, scale)
    return xs, cs, scale, x_err, c_err


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {"v_ptr": "*fp32", "group_amax_ptr": "*fp32", "out_ptr": "*fp16", "err_ptr": "*fp32",
          "scale_ptr": "*fp32", "inflate": "fp32"}
COMPILE_CASES = [
    ("_operand_rows_kernel", dict(IS_X=True, SPLIT=True, BLOCK_R=64, BLOCK_D=16), _TYPES),
    ("_operand_rows_kernel", dict(IS_X=False, SPLIT=False, BLOCK_R=16, BLOCK_D=256), _TYPES),
    ("_operand_rows_kernel", dict(IS_X=True, SPLIT=False, BLOCK_R=4, BLOCK_D=1024),
     dict(_TYPES, v_ptr="*fp64", group_amax_ptr="*fp64")),
]
