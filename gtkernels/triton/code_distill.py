"""Soft-code distillation loss on the GPU, fused: never N x K.

Logits of row n over code j: a = dot_scale <t_n, c_j> - norm_scale ||c_j||^2 (teacher) and b
likewise for the student (l2: dot_scale = 2 / T, norm_scale = 1 / T; ip: 1 / T and 0).
KL_n = E_p[a - b] - lse(a) + lse(b). Forward: one program per row block streams over all codes
with online logsumexps. Backward (code_distill_split): with ga = g p (a - b - E_p[a - b]) and
gb = g (q - p), grad_student = dot_scale sum_j gb_nj c_j, grad_teacher likewise with ga, and
grad_codebook_j = dot_scale sum_n (ga t_n + gb s_n) - 2 norm_scale c_j sum_n (ga + gb); a row
pass and a code pass recompute the logits, and the code pass's fp32 partials are added in a
fixed order: deterministic without atomics. Every dot runs as three fp16 dots on scaled
(hi, lo) pairs, fp32-like (code_distill_common).
"""
import torch
import triton
import triton.language as tl

from .code_distill_common import (code_tile_logits, launch, load_row_pairs, split_half_pairs,
                                  tuned)
from .code_distill_split import split_backward
from .norms import row_sq_norms


@triton.jit
def _forward_kernel(s2_ptr, s_inv_ptr, t2_ptr, t_inv_ptr, c2_ptr, c_inv_ptr, cn_ptr, kl_ptr,
                    stats_ptr, N, K, D, dot_scale, norm_scale, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, DP: tl.constexpr):
    """s2, t2 [2, N, D] and c2 [2, K, D]: fp16 pairs (split_half_pairs) with inverse scales
    s_inv, t_inv [N] and c_inv [1]; cn [K] fp32 squared code norms."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dcols = tl.arange(0, DP)
    t_hi, t_lo, t_scale, s_hi, s_lo, s_scale, _c_inv = load_row_pairs(
        t2_ptr, t_inv_ptr, s2_ptr, s_inv_ptr, c_inv_ptr, rows, row_mask, dcols, N, D, dot_scale)
    zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    max_a = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    max_b = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    sum_a = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    cross = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_j exp(a - max_a) (a - b)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        valid = codes < K
        a, b, _, _ = code_tile_logits(t_hi, t_lo, t_scale, s_hi, s_lo, s_scale, c2_ptr,
                                      c_inv_ptr, cn_ptr, codes, valid, dcols, K, D, norm_scale,
                                      zero)
        diff = a - b
        a = tl.where(valid[None, :], a, float("-inf"))
        b = tl.where(valid[None, :], b, float("-inf"))
        new_max_a = tl.maximum(max_a, tl.max(a, axis=1))
        rescale = tl.exp(max_a - new_max_a)
        p = tl.exp(a - new_max_a[:, None])
        sum_a = sum_a * rescale + tl.sum(p, axis=1)
        cross = cross * rescale + tl.sum(p * diff, axis=1)
        max_a = new_max_a
        new_max_b = tl.maximum(max_b, tl.max(b, axis=1))
        sum_b = sum_b * tl.exp(max_b - new_max_b) + tl.sum(tl.exp(b - new_max_b[:, None]), axis=1)
        max_b = new_max_b
    lse_a = max_a + tl.log(sum_a)
    lse_b = max_b + tl.log(sum_b)
    expected = cross / sum_a
    tl.store(kl_ptr + rows, expected - lse_a + lse_b, mask=row_mask)
    tl.store(stats_ptr + rows * 3, lse_a, mask=row_mask)
    tl.store(stats_ptr + rows * 3 + 1, lse_b, mask=row_mask)
    tl.store(stats_ptr + rows * 3 + 2, expected, mask=row_mask)


def _scales(temperature, metric):
    return (2.0 / temperature, 1.0 / temperature) if metric == "l2" else (1.0 / temperature, 0.0)


_forward_tuned = tuned(_forward_kernel, ["D"], [
    (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2),
    (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)])


def code_distill_loss(student, teacher, codebook, temperature, metric):
    """[N, D], [N, D], [K, D] -> (row_kl [N], row_stats [N, 3]), computed in fp32 (float64
    inputs too; their outputs are returned as float64)."""
    s, t, c = student.contiguous(), teacher.contiguous(), codebook.contiguous()
    num_rows, dim = s.shape
    kl = torch.empty(num_rows, device=s.device, dtype=torch.float32)
    stats = torch.empty((num_rows, 3), device=s.device, dtype=torch.float32)
    if num_rows == 0:
        out_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        return kl.to(out_dtype), stats.to(out_dtype)
    dot_scale, norm_scale = _scales(temperature, metric)
    launch(_forward_kernel, _forward_tuned,
           lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]),),
           *split_half_pairs(s), *split_half_pairs(t), *split_half_pairs(c, per_row=False),
           row_sq_norms(c), kl, stats, num_rows, c.shape[0], dim, dot_scale, norm_scale, dim=dim)
    if s.dtype == torch.float64:
        return kl.double(), stats.double()
    return kl, stats


def code_distill_loss_backward(grad_row_kl, student, teacher, codebook, stats, temperature,
                               metric, output_mask):
    """-> (grad_student [N, D], grad_teacher [N, D], grad_codebook [K, D]), each of its input's
    dtype where output_mask says so, else an empty [0]. Deterministic: fp32 partials are added
    in a fixed order."""
    s, t, c = student.contiguous(), teacher.contiguous(), codebook.contiguous()
    need_s, need_t, need_c = output_mask
    if s.shape[0] == 0 or not any(output_mask):
        return (torch.empty_like(s) if need_s else s.new_empty(0),
                torch.empty_like(t) if need_t else t.new_empty(0),
                torch.zeros_like(c) if need_c else c.new_empty(0))
    dot_scale, norm_scale = _scales(temperature, metric)
    gs, gt, code_sums = split_backward(grad_row_kl.float().contiguous(), s, t, c,
                                       row_sq_norms(c), stats.float().contiguous(), dot_scale,
                                       norm_scale, need_s, need_t, need_c)
    grad_c = c.new_empty(0)
    if need_c:
        weighted, total = code_sums
        grad_c = dot_scale * weighted - (2.0 * norm_scale) * total[:, None] * c.float()
        grad_c = grad_c.to(c.dtype)
    return (gs.to(s.dtype) if need_s else s.new_empty(0),
            gt.to(t.dtype) if need_t else t.new_empty(0), grad_c)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {n: "*fp32" for n in ("s_inv_ptr", "t_inv_ptr", "c_inv_ptr", "cn_ptr", "stats_ptr",
                               "kl_ptr")}
_TYPES.update({n: "*fp16" for n in ("s2_ptr", "t2_ptr", "c2_ptr")}, dot_scale="fp32",
              norm_scale="fp32")
_BLOCKS = dict(BLOCK_N=64, BLOCK_K=64, DP=64)
COMPILE_CASES = [("_forward_kernel", _BLOCKS, _TYPES)]
