"""The distillation backward as two passes with register accumulators (no read-modify-write).

Row pass (``_row_grads_kernel``): a program owns BLOCK_N rows and walks every code: logits a, b
(2 pair dots), then grad_student += gb c (or, in a launch of its own, grad_teacher += ga c):
written once, no partials.
Code pass (``_code_grads_kernel``): a program owns BLOCK_K codes and one split of the rows. It
computes the logits transposed, a^T = c t^T [BLOCK_K, BLOCK_N], so that ga^T and gb^T are the
left operands of sum_n ga t_n + gb s_n as they come out of the dots (no transposes), into fp32
partials [S, K, D] and [S, K] summed in split order (deterministic).
Every dot is three fp16 dots on pairs (code_distill_common): the inputs' pairs come from the
host, each pass's loop-invariant operand (t, s in the row pass, c in the code pass) loaded once;
the gradient tiles are split in the kernel under online per-row scales.
"""
import torch
import triton
import triton.language as tl

from .code_distill_common import (HALF_TOP, MIN_SCALE, code_tile_logits, launch, load_pair,
                                  load_row_pairs, logit_grads, pair_dot_sum,
                                  pair_dot_transposed, rescaled_max, row_stats, split_half,
                                  split_half_pairs, tuned)


@triton.jit
def _row_grads_kernel(grad_ptr, s2_ptr, s_inv_ptr, t2_ptr, t_inv_ptr, c2_ptr, c_inv_ptr, cn_ptr,
                      stats_ptr, out_ptr, N, K, D, dot_scale, norm_scale, TEACHER: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DP: tl.constexpr):
    """out [N, D] fp32 = dot_scale sum_j gb_nj c_j (grad_student), or with TEACHER
    dot_scale sum_j ga_nj c_j (grad_teacher). s2, t2 [2, N, D], c2 [2, K, D]: fp16 pairs with
    inverse scales s_inv, t_inv [N], c_inv [1]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dcols = tl.arange(0, DP)
    t_hi, t_lo, t_scale, s_hi, s_lo, s_scale, c_inv = load_row_pairs(
        t2_ptr, t_inv_ptr, s2_ptr, s_inv_ptr, c_inv_ptr, rows, row_mask, dcols, N, D, dot_scale)
    lse_a, lse_b, expected, g = row_stats(stats_ptr, grad_ptr, rows, row_mask)
    acc = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    small = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    # the teacher's sum scales its tiles online; the student's gb = q - p has |gb| <= 1
    row_max = tl.full([BLOCK_N], MIN_SCALE if TEACHER else 1.0, dtype=tl.float32)
    zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        valid = codes < K
        a, b, c_hi, c_lo = code_tile_logits(t_hi, t_lo, t_scale, s_hi, s_lo, s_scale, c2_ptr,
                                            c_inv_ptr, cn_ptr, codes, valid, dcols, K, D,
                                            norm_scale, zero)
        # logit_grads with g = 1: g and the scales multiply the sum once, at the end
        ga, gb = logit_grads(a, b, lse_a[:, None], lse_b[:, None], expected[:, None], 1.0,
                             row_mask[:, None] & valid[None, :])
        if TEACHER:
            row_max, rescale, to_half = rescaled_max(row_max, tl.max(tl.abs(ga), axis=1))
            acc, small = acc * rescale[:, None], small * rescale[:, None]
            x_hi, x_lo = split_half(ga * to_half[:, None])
        else:
            x_hi, x_lo = split_half(gb * HALF_TOP)
        acc, small = pair_dot_sum(x_hi, x_lo, c_hi, c_lo, acc, small)
    scale = (dot_scale * c_inv / HALF_TOP) * (g * row_max)[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + dcols[None, :], scale * (acc + small),
             mask=row_mask[:, None] & (dcols[None, :] < D))


@triton.jit
def _code_grads_kernel(grad_ptr, s2_ptr, s_inv_ptr, t2_ptr, t_inv_ptr, c2_ptr, c_inv_ptr, cn_ptr,
                       stats_ptr, part_ptr, total_ptr, N, K, D, dot_scale, norm_scale,
                       rows_per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DP: tl.constexpr):
    """Program (code block, split r): part[r, codes] = sum_n (ga t_n + gb s_n) and
    total[r, codes] = sum_n (ga + gb) over the rows of split r, in row order. Pairs as in
    _row_grads_kernel; the sums run on the rows' pairs against ga^T t_inv and gb^T s_inv split
    with one online scale per code."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    valid = codes < K
    dcols = tl.arange(0, DP)
    c_hi, c_lo, _ = load_pair(c2_ptr, c_inv_ptr, codes, valid, dcols, K, D)
    c_inv = tl.load(c_inv_ptr)
    norm = norm_scale * tl.load(cn_ptr + codes, mask=valid, other=0.0)[:, None]
    acc = tl.zeros([BLOCK_K, DP], dtype=tl.float32)
    small = tl.zeros([BLOCK_K, DP], dtype=tl.float32)
    code_max = tl.full([BLOCK_K], MIN_SCALE, dtype=tl.float32)
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
        a = pair_dot_transposed(c_hi, c_lo, tl.trans(t_hi), tl.trans(t_lo), zero)
        a = a * (dot_scale * c_inv * t_inv)[None, :] - norm
        b = pair_dot_transposed(c_hi, c_lo, tl.trans(s_hi), tl.trans(s_lo), zero)
        b = b * (dot_scale * c_inv * s_inv)[None, :] - norm
        ga, gb = logit_grads(a, b, lse_a[None, :], lse_b[None, :], expected[None, :],
                             g[None, :], valid[:, None] & row_mask[None, :])
        total += tl.sum(ga + gb, axis=1)
        # sum_n ga t_n = sum_n (ga t_inv_n) (t_hi + t_lo)_n, likewise for gb and s
        xa = ga * t_inv[None, :]
        xb = gb * s_inv[None, :]
        tile_max = tl.maximum(tl.max(tl.abs(xa), axis=1), tl.max(tl.abs(xb), axis=1))
        code_max, rescale, to_half = rescaled_max(code_max, tile_max)
        acc, small = acc * rescale[:, None], small * rescale[:, None]
        xa_hi, xa_lo = split_half(xa * to_half[:, None])
        acc, small = pair_dot_sum(xa_hi, xa_lo, t_hi, t_lo, acc, small)
        xb_hi, xb_lo = split_half(xb * to_half[:, None])
        acc, small = pair_dot_sum(xb_hi, xb_lo, s_hi, s_lo, acc, small)
    out = (split * K + codes[:, None]).to(tl.int64) * D + dcols[None, :]
    tl.store(part_ptr + out, (acc + small) * (code_max / HALF_TOP)[:, None],
             mask=valid[:, None] & (dcols[None, :] < D))
    tl.store(total_ptr + split * K + codes, total, mask=valid)


_row_grads_tuned = tuned(_row_grads_kernel, ["D", "TEACHER"], [
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
    pairs = (*split_half_pairs(s), *split_half_pairs(t), *split_half_pairs(c, per_row=False))
    row_grads = []
    for needed, teacher in ((need_s, False), (need_t, True)):
        out = torch.empty((num_rows, dim) if needed else (0,), device=s.device,
                          dtype=torch.float32)
        if needed:  # one launch per gradient: one sum per kernel keeps the registers low
            launch(_row_grads_kernel, _row_grads_tuned,
                   lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]),), grad, *pairs, cn,
                   stats, out, num_rows, num_codes, dim, dot_scale, norm_scale, dim=dim,
                   TEACHER=teacher)
        row_grads.append(out)
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
    return row_grads[0], row_grads[1], code_sums


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {n: "*fp32" for n in ("grad_ptr", "s_inv_ptr", "t_inv_ptr", "c_inv_ptr", "cn_ptr",
                               "stats_ptr", "out_ptr", "part_ptr", "total_ptr")}
_TYPES.update({n: "*fp16" for n in ("s2_ptr", "t2_ptr", "c2_ptr")}, dot_scale="fp32",
              norm_scale="fp32")
_ROWS = dict(BLOCK_N=128, BLOCK_K=64, DP=64)
COMPILE_CASES = [
    ("_row_grads_kernel", dict(_ROWS, TEACHER=False), _TYPES, {"num_warps": 8}),
    ("_row_grads_kernel", dict(_ROWS, TEACHER=True), _TYPES, {"num_warps": 8}),
    ("_code_grads_kernel", dict(_ROWS, BLOCK_N=64, BLOCK_K=128), _TYPES, {"num_warps": 8}),
]
