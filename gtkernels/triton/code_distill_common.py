"""Tile helpers shared by the distillation kernels (code_distill.py, code_distill_split.py).

Every dot runs on fp16 pairs: x = (hi + lo) / scale with a power-of-two scale, and three fp16
dots, hi hi + hi lo + lo hi, give an fp32-like product (22 significant bits, as tf32x3) at
twice tf32's tensor-core rate and half its register and shared-memory footprint. The inputs
t, s and c come split from the host (split_half_pairs: a scale per row, one for the codebook);
the backward's gradient tiles are split in the kernels with online per-row scales
(rescaled_max), as flash attention rescales its running softmax sums.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import autotune

# Scaled operands stay below 2**HALF_EXPONENT (fp16's largest finite value is 65,504).
HALF_EXPONENT = tl.constexpr(14)
# In-kernel splits scale a row's largest |x| to HALF_TOP; rows start from MIN_SCALE.
HALF_TOP = tl.constexpr(2.0 ** 13)
MIN_SCALE = tl.constexpr(2.0 ** -100)


@triton.jit
def load_pair(ptr, inv_ptr, rows, mask_rows, cols, R, D):
    """Rows of a split operand (split_half_pairs: ptr [2, R, D] fp16, inv_ptr [R] fp32) ->
    hi, lo [BR, DP] fp16 and the rows' inverse scales [BR] fp32 (0 outside mask_rows)."""
    rows64 = rows[:, None].to(tl.int64)
    mask = mask_rows[:, None] & (cols[None, :] < D)
    return (tl.load(ptr + rows64 * D + cols[None, :], mask=mask, other=0.0),
            tl.load(ptr + (rows64 + R) * D + cols[None, :], mask=mask, other=0.0),
            tl.load(inv_ptr + rows, mask=mask_rows, other=0.0))


@triton.jit
def load_row_pairs(t2_ptr, t_inv_ptr, s2_ptr, s_inv_ptr, c_inv_ptr, rows, row_mask, dcols, N, D,
                   dot_scale):
    """A block of rows of the teacher and the student (pairs [BN, DP] fp16) with the scales
    [BN, 1] that turn their pair dots with codes into logits (dot_scale t_inv c_inv), and
    c_inv."""
    t_hi, t_lo, t_inv = load_pair(t2_ptr, t_inv_ptr, rows, row_mask, dcols, N, D)
    s_hi, s_lo, s_inv = load_pair(s2_ptr, s_inv_ptr, rows, row_mask, dcols, N, D)
    c_inv = tl.load(c_inv_ptr)
    return (t_hi, t_lo, (dot_scale * c_inv * t_inv)[:, None], s_hi, s_lo,
            (dot_scale * c_inv * s_inv)[:, None], c_inv)


@triton.jit
def code_tile_logits(t_hi, t_lo, t_scale, s_hi, s_lo, s_scale, c2_ptr, c_inv_ptr, cn_ptr, codes,
                     valid, dcols, K, D, norm_scale, zero):
    """Teacher and student logits a, b [BN, BK] of the rows (load_row_pairs) against a tile of
    codes, and the codes' pairs: one computation for the forward and the row pass, so that the
    backward's logits round as the forward's."""
    c_hi, c_lo, _ = load_pair(c2_ptr, c_inv_ptr, codes, valid, dcols, K, D)
    norm = norm_scale * tl.load(cn_ptr + codes, mask=valid, other=0.0)[None, :]
    a = pair_dot(t_hi, t_lo, tl.trans(c_hi), tl.trans(c_lo), zero) * t_scale - norm
    b = pair_dot(s_hi, s_lo, tl.trans(c_hi), tl.trans(c_lo), zero) * s_scale - norm
    return a, b, c_hi, c_lo


@triton.jit
def pair_dot(a_hi, a_lo, b_hi, b_lo, zero):
    """a b from fp16 pairs: three dots into `zero`, the small terms first (a_lo b_hi, a_hi b_lo,
    then a_hi b_hi, the order of Triton's tf32x3)."""
    return tl.dot(a_hi, b_hi, tl.dot(a_hi, b_lo, tl.dot(a_lo, b_hi, zero)))


@triton.jit
def pair_dot_transposed(a_hi, a_lo, b_hi, b_lo, zero):
    """pair_dot(b^T, a^T)^T term by term (a_hi b_lo first): transposed logits c t^T that
    round as the forward's t c^T (the same products in the same order)."""
    return tl.dot(a_hi, b_hi, tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, zero)))


@triton.jit
def pair_dot_sum(a_hi, a_lo, b_hi, b_lo, big, small):
    """(big + a_hi b_hi, small + a_hi b_lo + a_lo b_hi): a running sum of products a b kept in
    two accumulators, so that adding the small terms does not round at the scale of the sum
    (one accumulator erred about 3x as much as one fp32 dot); the sum is big + small."""
    return tl.dot(a_hi, b_hi, big), tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, small))


@triton.jit
def split_half(x):
    """fp32 x (|x| < 2**15) -> fp16 (hi, lo), hi + lo = x to 22 significant bits."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def rescaled_max(running, tile_max):
    """Online power-of-two row scales for a running sum of products X Y over tiles whose rows
    of X have no known bound: running [R] (a power of two, MIN_SCALE at first) and the tile's
    largest |X| per row -> (new running scale, rescale = running / new for the accumulators,
    HALF_TOP / new for the tile). X HALF_TOP / new lies in fp16's range, and split_half keeps
    each element to 22 significant bits or to 2**-38 of its row's largest |X| so far, whichever
    is coarser: an error on the scale of fp32 summation's."""
    bits = tl.maximum(running, tile_max).to(tl.uint32, bitcast=True)
    new = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)  # next power of two
    return new, running / new, (1.0 / new) * HALF_TOP


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
def _split_half_pairs_kernel(x_ptr, pairs_ptr, inv_ptr, amax_ptr, R, D, PER_ROW: tl.constexpr,
                             BLOCK_R: tl.constexpr, DP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, DP)
    row_mask = rows < R
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        amax = tl.max(tl.abs(x), axis=1)
    else:
        amax = tl.zeros([BLOCK_R], dtype=tl.float32) + tl.load(amax_ptr)
    # amax < 2**exponent (frexp's exponent; 0 for amax = 0), clamped so that both powers of
    # two below stay normal fp32 numbers
    biased = ((amax.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    exponent = tl.where(amax > 0, tl.minimum(tl.maximum(biased - 126, -112), 128), 0)
    inv = ((exponent - HALF_EXPONENT + 127) << 23).to(tl.float32, bitcast=True)
    scale = ((127 - exponent + HALF_EXPONENT) << 23).to(tl.float32, bitcast=True)
    hi, lo = split_half(x * scale[:, None])
    tl.store(pairs_ptr + offs, hi, mask=mask)
    tl.store(pairs_ptr + (rows[:, None].to(tl.int64) + R) * D + cols[None, :], lo, mask=mask)
    if PER_ROW:
        tl.store(inv_ptr + rows, inv, mask=row_mask)
    else:
        tl.store(inv_ptr + rows, inv, mask=rows == 0)


def split_half_pairs(x, per_row=True):
    """[R, D] float, contiguous -> (pairs fp16 [2, R, D], inv fp32 [R], or [1] with
    per_row=False): x = (hi + lo) inv to 22 significant bits, with hi = fp16(x / inv),
    lo = fp16(x / inv - hi) and inv the power of two that brings the row's (the tensor's)
    largest |x| into [2**13, 2**14). Each element is kept to 22 significant bits or to 2**-38 of
    that largest, whichever is coarser."""
    num_rows, dim = x.shape
    pairs = torch.empty((2, num_rows, dim), device=x.device, dtype=torch.float16)
    inv = torch.empty(num_rows if per_row else 1, device=x.device, dtype=torch.float32)
    if num_rows == 0:
        return pairs, inv.fill_(1.0)
    amax = inv if per_row else x.abs().amax().float().reshape(1)
    d_pad = triton.next_power_of_2(dim)
    block_rows = max(1, 4096 // d_pad)
    _split_half_pairs_kernel[(triton.cdiv(num_rows, block_rows),)](
        x, pairs, inv, amax, num_rows, dim, PER_ROW=per_row, BLOCK_R=block_rows, DP=d_pad)
    return pairs, inv


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


def launch(kernel, tuned_kernel, grid, *args, dim, **flags):
    """Runs `kernel` over grid(meta) programs: autotuned on a GPU, one small configuration in
    the interpreter."""
    d_pad = max(16, triton.next_power_of_2(dim))
    if interpreting():
        meta = dict(BLOCK_N=16, BLOCK_K=16)
        kernel[grid(meta)](*args, DP=d_pad, **flags, **meta)
    else:
        tuned_kernel[grid](*args, DP=d_pad, **flags)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_SPLIT_TYPES = {"x_ptr": "*fp32", "pairs_ptr": "*fp16", "inv_ptr": "*fp32", "amax_ptr": "*fp32"}
COMPILE_CASES = [
    ("_split_half_pairs_kernel", dict(PER_ROW=True, BLOCK_R=64, DP=64), _SPLIT_TYPES),
    ("_split_half_pairs_kernel", dict(PER_ROW=False, BLOCK_R=4, DP=1024), _SPLIT_TYPES),
]
