"""Soft-code distillation loss on the GPU, fused: memory O(N + K), never N x K.

Logits of row n over code j: a = dot_scale <t_n, c_j> - norm_scale ||c_j||^2 (teacher) and b
likewise for the student (l2: dot_scale = 2 / T, norm_scale = 1 / T; ip: 1 / T and 0).
KL_n = E_p[a - b] - lse(a) + lse(b). Forward: one program per row block streams over all codes
with online logsumexps. Backward recomputes the tiles: ``_rows_backward_kernel`` (programs own
rows) gives grad_teacher = dot_scale sum_j ga_nj c_j and grad_student likewise with gb, where
ga = g p (a - b - E_p[a - b]), gb = g (q - p); ``_codes_backward_kernel`` (programs own codes)
gives grad_codebook_j = dot_scale sum_n (ga t_n + gb s_n) - 2 norm_scale c_j sum_n (ga + gb),
each sum in a fixed order: deterministic without atomics.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import autotune
from .norms import row_sq_norms


@triton.jit
def _logits(rows_t, rows_s, codes, cn, dot_scale, norm_scale, PRECISION: tl.constexpr):
    """rows [BN, DP] fp32, codes [BK, DP] fp32 -> teacher and student logits [BN, BK]."""
    tdot = tl.dot(rows_t, tl.trans(codes), input_precision=PRECISION)
    sdot = tl.dot(rows_s, tl.trans(codes), input_precision=PRECISION)
    return dot_scale * tdot - norm_scale * cn[None, :], dot_scale * sdot - norm_scale * cn[None, :]


@triton.jit
def _load_rows(ptr, rows, mask_rows, cols, D):
    return tl.load(ptr + rows[:, None].to(tl.int64) * D + cols[None, :],
                   mask=mask_rows[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _load_codes(c_ptr, cn_ptr, codes, valid, cols, D):
    """Codes [BK, DP] fp32 and their squared norms [BK] (0 outside `valid`)."""
    return (_load_rows(c_ptr, codes, valid, cols, D),
            tl.load(cn_ptr + codes, mask=valid, other=0.0))


@triton.jit
def _row_stats(stats_ptr, grad_ptr, rows, row_mask):
    """The forward's (lse_a, lse_b, E_p[a - b]) of rows [BN] and their upstream gradient."""
    lse_a = tl.load(stats_ptr + rows * 3, mask=row_mask, other=0.0)
    lse_b = tl.load(stats_ptr + rows * 3 + 1, mask=row_mask, other=0.0)
    expected = tl.load(stats_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
    return lse_a, lse_b, expected, tl.load(grad_ptr + rows, mask=row_mask, other=0.0)


@triton.jit
def _forward_kernel(s_ptr, t_ptr, c_ptr, cn_ptr, kl_ptr, stats_ptr, N, K, D, dot_scale,
                    norm_scale, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, DP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dcols = tl.arange(0, DP)
    t = _load_rows(t_ptr, rows, row_mask, dcols, D)
    s = _load_rows(s_ptr, rows, row_mask, dcols, D)
    max_a = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    max_b = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    sum_a = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    cross = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_j exp(a - max_a) (a - b)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        valid = codes < K
        c, cn = _load_codes(c_ptr, cn_ptr, codes, valid, dcols, D)
        a, b = _logits(t, s, c, cn, dot_scale, norm_scale, PRECISION)
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


@triton.jit
def _logit_grads(a, b, lse_a, lse_b, expected, g, valid):
    """(dKL/da, dKL/db) * g for a tile; zero outside `valid`."""
    p = tl.exp(a - lse_a[:, None])
    q = tl.exp(b - lse_b[:, None])
    ga = g[:, None] * p * (a - b - expected[:, None])
    gb = g[:, None] * (q - p)
    return tl.where(valid, ga, 0.0), tl.where(valid, gb, 0.0)


@triton.jit
def _rows_backward_kernel(grad_ptr, s_ptr, t_ptr, c_ptr, cn_ptr, stats_ptr, gs_ptr, gt_ptr,
                          N, K, D, dot_scale, norm_scale, PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dcols = tl.arange(0, DP)
    t = _load_rows(t_ptr, rows, row_mask, dcols, D)
    s = _load_rows(s_ptr, rows, row_mask, dcols, D)
    lse_a, lse_b, expected, g = _row_stats(stats_ptr, grad_ptr, rows, row_mask)
    acc_t = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        valid = codes < K
        c, cn = _load_codes(c_ptr, cn_ptr, codes, valid, dcols, D)
        a, b = _logits(t, s, c, cn, dot_scale, norm_scale, PRECISION)
        ga, gb = _logit_grads(a, b, lse_a, lse_b, expected, g, row_mask[:, None] & valid[None, :])
        acc_t = tl.dot(ga, c, acc_t, input_precision=PRECISION)
        acc_s = tl.dot(gb, c, acc_s, input_precision=PRECISION)
    out = rows[:, None].to(tl.int64) * D + dcols[None, :]
    mask = row_mask[:, None] & (dcols[None, :] < D)
    tl.store(gt_ptr + out, (dot_scale * acc_t).to(gt_ptr.dtype.element_ty), mask=mask)
    tl.store(gs_ptr + out, (dot_scale * acc_s).to(gs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _codes_backward_kernel(grad_ptr, s_ptr, t_ptr, c_ptr, cn_ptr, stats_ptr, part_ptr, total_ptr,
                           N, K, D, dot_scale, norm_scale, rows_per_split,
                           PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, DP: tl.constexpr):
    """Program (code block, split): sum_n (ga t_n + gb s_n) and sum_n (ga + gb) over the rows
    of its split, in row order, into the split's slice of part [S, K, D] and total [S, K]."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    valid = codes < K
    dcols = tl.arange(0, DP)
    c, cn = _load_codes(c_ptr, cn_ptr, codes, valid, dcols, D)
    acc = tl.zeros([BLOCK_K, DP], dtype=tl.float32)
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, N)
    for n0 in range(first, last, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < last
        t = _load_rows(t_ptr, rows, row_mask, dcols, D)
        s = _load_rows(s_ptr, rows, row_mask, dcols, D)
        lse_a, lse_b, expected, g = _row_stats(stats_ptr, grad_ptr, rows, row_mask)
        a, b = _logits(t, s, c, cn, dot_scale, norm_scale, PRECISION)
        ga, gb = _logit_grads(a, b, lse_a, lse_b, expected, g, row_mask[:, None] & valid[None, :])
        acc = tl.dot(tl.trans(ga), t, acc, input_precision=PRECISION)
        acc = tl.dot(tl.trans(gb), s, acc, input_precision=PRECISION)
        total += tl.sum(ga + gb, axis=0)
    out = (split * K + codes[:, None]).to(tl.int64) * D + dcols[None, :]
    tl.store(part_ptr + out, acc, mask=valid[:, None] & (dcols[None, :] < D))
    tl.store(total_ptr + split * K + codes, total, mask=valid)


def _scales(temperature, metric):
    return (2.0 / temperature, 1.0 / temperature) if metric == "l2" else (1.0 / temperature, 0.0)


def _prune_distill_configs(configs, named_args, **kwargs):
    """The [rows, D] operands live in registers: smaller tiles as D grows."""
    d_pad = max(16, triton.next_power_of_2(named_args["D"]))
    limit = 128 if d_pad <= 64 else 64 if d_pad <= 128 else 32 if d_pad <= 256 else 16
    keep = [c for c in configs if max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) <= limit]
    return keep or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


def _tuned(kernel):
    return autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2),
                                       (64, 128, 8, 2), (128, 128, 8, 2), (32, 64, 4, 2),
                                       (32, 32, 4, 2), (16, 32, 4, 2)]],
        key=["D"], prune_configs_by={"early_config_prune": _prune_distill_configs})(kernel)


_forward_tuned = _tuned(_forward_kernel)
_rows_backward_tuned = _tuned(_rows_backward_kernel)
_codes_backward_tuned = _tuned(_codes_backward_kernel)


def _launch(kernel, tuned, count_of, *args, dim, splits=1):
    """Runs `kernel` over (cdiv(count_of(meta), ...), splits) programs: autotuned on a GPU, one
    small configuration in the interpreter. fp32 dots run as 3 tf32 passes (fp32-like
    accuracy)."""
    d_pad = max(16, triton.next_power_of_2(dim))
    if interpreting():
        meta = dict(BLOCK_N=16, BLOCK_K=16)
        kernel[(count_of(meta), splits)](*args, PRECISION="ieee", DP=d_pad, **meta)
    else:
        tuned[lambda meta: (count_of(meta), splits)](*args, PRECISION="tf32x3", DP=d_pad)


# The code-side backward splits the rows into chunks of SPLIT_ROWS (a multiple of every
# BLOCK_N) so that a small codebook still fills the GPU; the chunks' partial sums [S, K, D]
# (at most PARTIAL_BYTES) are added in split order afterwards.
SPLIT_ROWS = 4096
PARTIAL_BYTES = 256 << 20


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
    _launch(_forward_kernel, _forward_tuned, lambda meta: triton.cdiv(num_rows, meta["BLOCK_N"]),
            s, t, c, row_sq_norms(c), kl, stats, num_rows, c.shape[0], dim, dot_scale,
            norm_scale, dim=dim)
    if s.dtype == torch.float64:
        return kl.double(), stats.double()
    return kl, stats


def code_distill_loss_backward(grad_row_kl, student, teacher, codebook, stats, temperature,
                               metric, output_mask):
    """-> (grad_student [N, D], grad_teacher [N, D], grad_codebook [K, D]); those that
    output_mask leaves out are returned as empty [0] tensors."""
    grads = _all_grads(grad_row_kl, student, teacher, codebook, stats, temperature, metric)
    return tuple(g if need else g.new_empty(0) for g, need in zip(grads, output_mask))


def _all_grads(grad_row_kl, student, teacher, codebook, stats, temperature, metric):
    s, t, c = student.contiguous(), teacher.contiguous(), codebook.contiguous()
    num_rows, dim = s.shape
    num_codes = c.shape[0]
    grad_s, grad_t = torch.empty_like(s), torch.empty_like(t)
    if num_rows == 0:
        return grad_s, grad_t, torch.zeros_like(c)
    dot_scale, norm_scale = _scales(temperature, metric)
    cn = row_sq_norms(c)
    g = grad_row_kl.float().contiguous()
    st = stats.float().contiguous()
    _launch(_rows_backward_kernel, _rows_backward_tuned,
            lambda meta: triton.cdiv(num_rows, meta["BLOCK_N"]),
            g, s, t, c, cn, st, grad_s, grad_t, num_rows, num_codes, dim, dot_scale, norm_scale,
            dim=dim)
    splits = max(1, min(triton.cdiv(num_rows, SPLIT_ROWS),
                        PARTIAL_BYTES // (4 * max(num_codes, 1) * dim)))
    rows_per_split = triton.cdiv(num_rows, splits)
    if rows_per_split > 128:  # whole row blocks per split (any split is correct)
        rows_per_split = triton.cdiv(rows_per_split, 128) * 128
    splits = triton.cdiv(num_rows, rows_per_split)
    part = torch.empty((splits, num_codes, dim), device=s.device, dtype=torch.float32)
    total = torch.empty((splits, num_codes), device=s.device, dtype=torch.float32)
    _launch(_codes_backward_kernel, _codes_backward_tuned,
            lambda meta: triton.cdiv(num_codes, meta["BLOCK_K"]),
            g, s, t, c, cn, st, part, total, num_rows, num_codes, dim, dot_scale, norm_scale,
            rows_per_split, dim=dim, splits=splits)
    grad = dot_scale * part.sum(0) - (2.0 * norm_scale) * total.sum(0)[:, None] * c.float()
    return grad_s, grad_t, grad.to(c.dtype)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {n: "*fp32" for n in ("grad_ptr", "s_ptr", "t_ptr", "c_ptr", "cn_ptr", "stats_ptr",
                               "kl_ptr", "gs_ptr", "gt_ptr", "part_ptr", "total_ptr")}
_TYPES.update(dot_scale="fp32", norm_scale="fp32")
COMPILE_CASES = [
    (name, dict(PRECISION="tf32x3", BLOCK_N=64, BLOCK_K=64, DP=64), _TYPES)
    for name in ("_forward_kernel", "_rows_backward_kernel", "_codes_backward_kernel")
]
