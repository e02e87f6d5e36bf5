"""Tile helpers shared by the distillation kernels (code_distill.py, code_distill_split.py)."""
import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import autotune


@triton.jit
def logits(rows_t, rows_s, codes, cn, dot_scale, norm_scale, PRECISION: tl.constexpr):
    """rows [BN, DP] fp32, codes [BK, DP] fp32 -> teacher and student logits [BN, BK]."""
    tdot = tl.dot(rows_t, tl.trans(codes), input_precision=PRECISION)
    sdot = tl.dot(rows_s, tl.trans(codes), input_precision=PRECISION)
    return dot_scale * tdot - norm_scale * cn[None, :], dot_scale * sdot - norm_scale * cn[None, :]


@triton.jit
def load_rows(ptr, rows, mask_rows, cols, D):
    return tl.load(ptr + rows[:, None].to(tl.int64) * D + cols[None, :],
                   mask=mask_rows[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def load_codes(c_ptr, cn_ptr, codes, valid, cols, D):
    """Codes [BK, DP] fp32 and their squared norms [BK] (0 outside `valid`)."""
    return (load_rows(c_ptr, codes, valid, cols, D),
            tl.load(cn_ptr + codes, mask=valid, other=0.0))


@triton.jit
def row_stats(stats_ptr, grad_ptr, rows, row_mask):
    """The forward's (lse_a, lse_b, E_p[a - b]) of rows [BN] and their upstream gradient."""
    lse_a = tl.load(stats_ptr + rows * 3, mask=row_mask, other=0.0)
    lse_b = tl.load(stats_ptr + rows * 3 + 1, mask=row_mask, other=0.0)
    expected = tl.load(stats_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
    return lse_a, lse_b, expected, tl.load(grad_ptr + rows, mask=row_mask, other=0.0)


@triton.jit
def logit_grads(a, b, lse_a, lse_b, expected, g, valid):
    """(dKL/da, dKL/db) * g for a tile of logits a, b; zero outside `valid`. The row stats
    lse_a, lse_b, expected and g come broadcastable to the tile: [BN, 1] for rows x codes,
    [1, BN] for codes x rows."""
    p = tl.exp(a - lse_a)
    q = tl.exp(b - lse_b)
    ga = g * p * (a - b - expected)
    gb = g * (q - p)
    return tl.where(valid, ga, 0.0), tl.where(valid, gb, 0.0)


@triton.jit
def split_tf32(x, PRECISION: tl.constexpr):
    """fp32 x -> (hi, lo): hi = x rounded to tf32 (10 mantissa bits, to nearest), lo = x - hi
    (exact in fp32). hi_a hi_b + hi_a lo_b + lo_a hi_b on tf32 tensor cores is an fp32-like
    product (what input_precision="tf32x3" does). With PRECISION "ieee" (the interpreter, whose
    dots are exact fp32) hi = x and lo = 0."""
    if PRECISION == "ieee":
        return x, tl.zeros_like(x)
    hi = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def triple_dot(a_hi, a_lo, b_hi, b_lo, zero, PRECISION: tl.constexpr):
    """a b from split operands (split_tf32): three tf32 dots into `zero`, the small terms
    first, in the order of Triton's tf32x3 (a_lo b_hi, a_hi b_lo, a_hi b_hi), so that logits
    recomputed here round as the forward's did."""
    small = tl.dot(a_hi, b_lo, tl.dot(a_lo, b_hi, zero, input_precision=PRECISION),
                   input_precision=PRECISION)
    return tl.dot(a_hi, b_hi, small, input_precision=PRECISION)


@triton.jit
def triple_dot_transposed(a_hi, a_lo, b_hi, b_lo, zero, PRECISION: tl.constexpr):
    """triple_dot(b^T, a^T)^T term by term (a_hi b_lo first): transposed logits c t^T that
    round as the forward's t c^T (same products in the same order on the tensor cores)."""
    small = tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, zero, input_precision=PRECISION),
                   input_precision=PRECISION)
    return tl.dot(a_hi, b_hi, small, input_precision=PRECISION)


@triton.jit
def triple_dot_sum(a_hi, a_lo, b_hi, b_lo, big, small, PRECISION: tl.constexpr):
    """(big + a_hi b_hi, small + a_hi b_lo + a_lo b_hi): a running sum of products a b kept in
    two accumulators, so that adding the small terms does not round at the scale of the sum
    (one accumulator erred about 3x as much as one fp32 dot); the sum is big + small."""
    small = tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, small, input_precision=PRECISION),
                   input_precision=PRECISION)
    return tl.dot(a_hi, b_hi, big, input_precision=PRECISION), small


def split_tf32_pairs(x):
    """[R, D] -> fp32 [2, R, D]: (hi, lo) of split_tf32, for operands split once on the host
    ((x, 0) in the interpreter, like split_tf32 with "ieee")."""
    x = x.float()
    if interpreting():
        return torch.stack([x, torch.zeros_like(x)])
    hi = ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return torch.stack([hi, x - hi])


def prune_distill_configs(configs, named_args, **kwargs):
    """The [rows, D] operands live in registers: smaller tiles as D grows."""
    d_pad = max(16, triton.next_power_of_2(named_args["D"]))
    limit = 128 if d_pad <= 64 else 64 if d_pad <= 128 else 32 if d_pad <= 256 else 16
    keep = [c for c in configs if max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) <= limit]
    return keep or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


def tuned(kernel, key, shapes):
    """shapes: (BLOCK_N, BLOCK_K, warps, stages) to try."""
    return autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in shapes],
        key=key, prune_configs_by={"early_config_prune": prune_distill_configs})(kernel)


def launch(kernel, tuned_kernel, grid, *args, dim, precision="tf32x3", **flags):
    """Runs `kernel` over grid(meta) programs: autotuned on a GPU with PRECISION=precision
    ("tf32x3": fp32 dots as 3 tf32 passes, fp32-like accuracy; "tf32" for kernels that split
    their operands themselves), one small configuration with "ieee" in the interpreter."""
    d_pad = max(16, triton.next_power_of_2(dim))
    if interpreting():
        meta = dict(BLOCK_N=16, BLOCK_K=16)
        kernel[grid(meta)](*args, PRECISION="ieee", DP=d_pad, **flags, **meta)
    else:
        tuned_kernel[grid](*args, PRECISION=precision, DP=d_pad, **flags)
