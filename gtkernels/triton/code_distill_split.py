"""The distillation backward as two passes with register accumulators (no read-modify-write).

Row pass (``_row_grads_kernel``): a program owns BLOCK_N rows and walks every code: logits a, b
(2 dots), then grad_student += gb c (and grad_teacher += ga c): 3 dots per tile (4 with the
teacher's gradient), written once, no partials.
Code pass (``_code_grads_kernel``): a program owns BLOCK_K codes and one split of the rows. It
computes the logits transposed, a^T = c t^T [BLOCK_K, BLOCK_N], so that ga^T and gb^T are the
left operands of sum_n ga t_n + gb s_n as they come out of the dots (no transposes): 4 dots per
tile, into fp32 partials [S, K, D] and [S, K] summed in split order (deterministic).
Every dot is three tf32 dots on split operands (split_tf32). Each pass's loop-invariant left
operand (t, s in the row pass, c in the code pass) comes split from the host, [2, R, D] fp32,
so that it is loaded, not computed, and stays out of the registers (sm_90 ptxas: no spills in
the row pass's loop at 128 x 64; one kernel computing each tile once, with the code-side sums
read-modify-written in memory, spilled 2.4 KB per thread and was 35% slower on the H200).
"""
import torch
import triton
import triton.language as tl

from .code_distill_common import (launch, load_pair, logit_grads, pair_dot, pair_dot_sum,
                                  pair_dot_transposed, row_stats, split_half, split_half_pairs,
                                  split_tf32, tuned, unsplit)

# The row pass's student-gradient tile q - p (|q - p| <= 1) scaled into fp16's range.
GRAD_SCALE = tl.constexpr(2.0 ** 13)


@triton.jit
def _row_grads_kernel(grad_ptr, s2_ptr, s_inv_ptr, t2_ptr, t_inv_ptr, c2_ptr, c_inv_ptr, cn_ptr,
                      stats_ptr, gs_ptr, gt_ptr, N, K, D, dot_scale, norm_scale,
                      NEED_S: tl.constexpr, NEED_T: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DP: tl.constexpr):
    """gs [N, D] = dot_scale sum_j gb_nj c_j (NEED_S); gt likewise with ga (NEED_T); fp32.
    s2, t2 [2, N, D], c2 [2, K, D]: fp16 pairs with inverse scales s_inv, t_inv [N], c_inv [1].
    The student's sum runs on fp16 pairs of (q - p) GRAD_SCALE; ga, whose range no bound
    known here caps, is split to tf32 against tf32 splits of the codes."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dcols = tl.arange(0, DP)
    t_hi, t_lo, t_inv = load_pair(t2_ptr, t_inv_ptr, rows, row_mask, dcols, N, D)
    s_hi, s_lo, s_inv = load_pair(s2_ptr, s_inv_ptr, rows, row_mask, dcols, N, D)
    c_inv = tl.load(c_inv_ptr)
    t_scale = (dot_scale * c_inv * t_inv)[:, None]
    s_scale = (dot_scale * c_inv * s_inv)[:, None]
    lse_a, lse_b, expected, g = row_stats(stats_ptr, grad_ptr, rows, row_mask)
    acc_s = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    small_s = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    small_t = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        valid = codes < K
        c_hi, c_lo, _ = load_pair(c2_ptr, c_inv_ptr, codes, valid, dcols, K, D)
        norm = norm_scale * tl.load(cn_ptr + codes, mask=valid, other=0.0)[None, :]
        a = pair_dot(t_hi, t_lo, tl.trans(c_hi), tl.trans(c_lo), zero, PRECISION) * t_scale - norm
        b = pair_dot(s_hi, s_lo, tl.trans(c_hi), tl.trans(c_lo), zero, PRECISION) * s_scale - norm
        # logit_grads with g = 1: g and the scales multiply the sums once, at the end
        ga, gb = logit_grads(a, b, lse_a[:, None], lse_b[:, None], expected[:, None], 1.0,
                             row_mask[:, None] & valid[None, :])
        if NEED_S:
            gb_hi, gb_lo = split_half(gb * GRAD_SCALE)
            acc_s, small_s = pair_dot_sum(gb_hi, gb_lo, c_hi, c_lo, acc_s, small_s, PRECISION)
        if NEED_T:
            c_thi, c_tlo = split_tf32(unsplit(c_hi, c_lo, c_inv), PRECISION)
            ga_hi, ga_lo = split_tf32(ga, PRECISION)
            acc_t, small_t = pair_dot_sum(ga_hi, ga_lo, c_thi, c_tlo, acc_t, small_t, PRECISION)
    out = rows[:, None].to(tl.int64) * D + dcols[None, :]
    mask = row_mask[:, None] & (dcols[None, :] < D)
    if NEED_S:
        scale = (dot_scale * c_inv / GRAD_SCALE) * g[:, None]
        tl.store(gs_ptr + out, scale * (acc_s + small_s), mask=mask)
    if NEED_T:
        tl.store(gt_ptr + out, (dot_scale * g[:, None]) * (acc_t + small_t), mask=mask)


@triton.jit
def _code_grads_kernel(grad_ptr, s2_ptr, s_inv_ptr, t2_ptr, t_inv_ptr, c2_ptr, c_inv_ptr, cn_ptr,
                       stats_ptr, part_ptr, total_ptr, N, K, D, dot_scale, norm_scale,
                       rows_per_split, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, DP: tl.constexpr):
    """Program (code block, split r): part[r, codes] = sum_n (ga t_n + gb s_n) and
    total[r, codes] = sum_n (ga + gb) over the rows of split r, in row order. Pairs as in
    _row_grads_kernel; the sums run on tf32 splits of ga, gb and the rows."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    valid = codes < K
    dcols = tl.arange(0, DP)
    c_hi, c_lo, _ = load_pair(c2_ptr, c_inv_ptr, codes, valid, dcols, K, D)
    c_inv = tl.load(c_inv_ptr)
    norm = norm_scale * tl.load(cn_ptr + codes, mask=valid, other=0.0)[:, None]
    acc = tl.zeros([BLOCK_K, DP], dtype=tl.float32)
    small = tl.zeros([BLOCK_K, DP], dtype=tl.float32)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    zero = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, N)
    for n0 in range(first, last, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < last
        t_hi, t_lo, t_inv = load_pair(t2_ptr, t_inv_ptr, rows, row_mask, dcols, N, D)
        s_hi, s_lo, s_inv = load_pair(s2_ptr, s_inv_ptr, rows, row_mask, dcols, N, D)
        lse_a, lse_b, expected, g = row_stats(stats_ptr, grad_ptr, rows, row_mask)
        # Transposed logits [BLOCK_K, BLOCK_N]: a^T = dot_scale c t^T - norm_scale ||c||^2.
        a = pair_dot_transposed(c_hi, c_lo, tl.trans(t_hi), tl.trans(t_lo), zero, PRECISION)
        a = a * (dot_scale * c_inv * t_inv)[None, :] - norm
        b = pair_dot_transposed(c_hi, c_lo, tl.trans(s_hi), tl.trans(s_lo), zero, PRECISION)
        b = b * (dot_scale * c_inv * s_inv)[None, :] - norm
        ga, gb = logit_grads(a, b, lse_a[None, :], lse_b[None, :], expected[None, :],
                             g[None, :], valid[:, None] & row_mask[None, :])
        ga_hi, ga_lo = split_tf32(ga, PRECISION)
        t_thi, t_tlo = split_tf32(unsplit(t_hi, t_lo, t_inv[:, None]), PRECISION)
        acc, small = pair_dot_sum(ga_hi, ga_lo, t_thi, t_tlo, acc, small, PRECISION)
        gb_hi, gb_lo = split_tf32(gb, PRECISION)
        s_thi, s_tlo = split_tf32(unsplit(s_hi, s_lo, s_inv[:, None]), PRECISION)
        acc, small = pair_dot_sum(gb_hi, gb_lo, s_thi, s_tlo, acc, small, PRECISION)
        total += tl.sum(ga + gb, axis=1)
    out = (split * K + codes[:, None]).to(tl.int64) * D + dcols[None, :]
    tl.store(part_ptr + out, acc + small, mask=valid[:, None] & (dcols[None, :] < D))
    tl.store(total_ptr + split * K + codes, total, mask=valid)


_row_grads_tuned = tuned(_row_grads_kernel, ["D", "NEED_S", "NEED_T"], [
    (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2),
    (128, 64, 8, 3), (64, 128, 8, 2), (32, 64, 4, 2), (16, 32, 4, 2)])
# Here BLOCK_K is the tile's row count (codes) and BLOCK_N its column count (rows of x).
_code_grads_tuned = tuned(_code_grads_kernel, ["D"], [
    (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2),
    (32, 128, 8, 3), (128, 64, 8, 2), (16, 32, 4, 2)])


# The code pass splits the rows so that a small codebook still fills the GPU: about
# CODE_PROGRAMS programs (at 64 codes per block), each split a multiple of every BLOCK_N, and
# the partials [S, K, D + 1] fp32 at most PARTIAL_BYTES (then fewer, longer splits).
CODE_PROGRAMS = 1024
SPLIT_MULTIPLE = 128
PARTIAL_BYTES = 256 << 20


def row_splits(num_rows, num_codes, dim):
    """Rows per split of the code pass (a multiple of SPLIT_MULTIPLE)."""
    splits = max(1, CODE_PROGRAMS // triton.cdiv(num_codes, 64))
    splits = min(splits, max(1, PARTIAL_BYTES // (4 * (dim + 1) * num_codes)))
    per_split = triton.cdiv(triton.cdiv(num_rows, splits), SPLIT_MULTIPLE) * SPLIT_MULTIPLE
    return per_split


def split_backward(grad, s, t, c, cn, stats, dot_scale, norm_scale, need_s, need_t, need_c):
    """grad [N] and stats [N, 3] fp32, s, t [N, D] and c [K, D] contiguous, cn [K] fp32 ->
    (grad_student, grad_teacher) fp32 [N, D] (or [0] where not needed) and, with need_c, the
    codebook's (sum_n ga t_n + gb s_n [K, D], sum_n ga + gb [K]) fp32, else None."""
    num_rows, dim = s.shape
    num_codes = c.shape[0]
    gs = torch.empty((num_rows, dim) if need_s else (0,), device=s.device, dtype=torch.float32)
    gt = torch.empty((num_rows, dim) if need_t else (0,), device=s.device, dtype=torch.float32)
    pairs = (*split_half_pairs(s), *split_half_pairs(t), *split_half_pairs(c, per_row=False))
    if need_s or need_t:
        launch(_row_grads_kernel, _row_grads_tuned,
               lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]),), grad, *pairs, cn, stats,
               gs, gt, num_rows, num_codes, dim, dot_scale, norm_scale, dim=dim,
               NEED_S=bool(need_s), NEED_T=bool(need_t))
    code_sums = None
    if need_c:
        per_split = row_splits(num_rows, num_codes, dim)
        splits = triton.cdiv(num_rows, per_split)
        part = torch.empty((splits, num_codes, dim), device=s.device, dtype=torch.float32)
        total = torch.empty((splits, num_codes), device=s.device, dtype=torch.float32)
        launch(_code_grads_kernel, _code_grads_tuned,
               lambda meta: (triton.cdiv(num_codes, meta["BLOCK_K"]), splits), grad, *pairs, cn,
               stats, part, total, num_rows, num_codes, dim, dot_scale, norm_scale, per_split,
               dim=dim)
        code_sums = part.sum(0), total.sum(0)
    return gs, gt, code_sums


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {n: "*fp32" for n in ("grad_ptr", "s_inv_ptr", "t_inv_ptr", "c_inv_ptr", "cn_ptr",
                               "stats_ptr", "gs_ptr", "gt_ptr", "part_ptr", "total_ptr")}
_TYPES.update({n: "*fp16" for n in ("s2_ptr", "t2_ptr", "c2_ptr")}, dot_scale="fp32",
              norm_scale="fp32")
_ROWS = dict(PRECISION="tf32", BLOCK_N=128, BLOCK_K=64, DP=64)
COMPILE_CASES = [
    ("_row_grads_kernel", dict(_ROWS, NEED_S=True, NEED_T=False), _TYPES, {"num_warps": 8}),
    ("_row_grads_kernel", dict(_ROWS, NEED_S=True, NEED_T=True), _TYPES, {"num_warps": 8}),
    ("_code_grads_kernel", dict(_ROWS, BLOCK_N=64, BLOCK_K=128), _TYPES, {"num_warps": 8}),
]
