"""Soft-code distillation loss on the GPU, fused: never N x K.

Logits of row n over code j: a = dot_scale <t_n, c_j> - norm_scale ||c_j||^2 (teacher) and b
likewise for the student (l2: dot_scale = 2 / T, norm_scale = 1 / T; ip: 1 / T and 0).
KL_n = E_p[a - b] - lse(a) + lse(b). Forward: one program per row block streams over all codes
with online logsumexps. Backward: ``_backward_kernel`` computes each logit tile once (5 dots:
a, b, gb c, ga^T t, gb^T s; a 6th, ga c, only when the teacher's gradient is asked for) with
ga = g p (a - b - E_p[a - b]), gb = g (q - p), and gives grad_student = dot_scale sum_j gb_nj c_j,
grad_teacher likewise with ga, and grad_codebook_j = dot_scale sum_n (ga t_n + gb s_n)
- 2 norm_scale c_j sum_n (ga + gb). Its programs own (row chunk, code chunk) blocks and write
fp32 partials per chunk ([code chunks, N, D] per row gradient, [row chunks, K, D] and
[row chunks, K] for the codebook), each summed in a fixed order and added over the chunks by
torch afterwards: deterministic without atomics.
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
def _accumulate_codes(part_ptr, total_ptr, chunk, codes, valid, dcols, K, D, started, ga, gb,
                      t, s, PRECISION: tl.constexpr):
    """part[chunk, codes] += ga^T t + gb^T s, total[chunk, codes] += sum_n (ga + gb) for tiles
    ga, gb [BN, BK] and rows t, s [BN, DP]: a read-modify-write of the program's own slice, which
    starts from zero (not read) until `started`."""
    out = (chunk * K + codes[:, None]).to(tl.int64) * D + dcols[None, :]
    mask = valid[:, None] & (dcols[None, :] < D)
    acc = tl.load(part_ptr + out, mask=mask & started, other=0.0)
    acc = tl.dot(tl.trans(ga), t, acc, input_precision=PRECISION)
    acc = tl.dot(tl.trans(gb), s, acc, input_precision=PRECISION)
    tl.store(part_ptr + out, acc, mask=mask)
    totals = total_ptr + chunk * K + codes
    total = tl.load(totals, mask=valid & started, other=0.0)
    tl.store(totals, total + tl.sum(ga + gb, axis=0), mask=valid)


@triton.jit
def _store_rows(part_ptr, chunk, rows, row_mask, dcols, N, D, value):
    out = (chunk * N + rows[:, None]).to(tl.int64) * D + dcols[None, :]
    tl.store(part_ptr + out, value, mask=row_mask[:, None] & (dcols[None, :] < D))


@triton.jit
def _backward_kernel(grad_ptr, s_ptr, t_ptr, c_ptr, cn_ptr, stats_ptr, gs_part_ptr, gt_part_ptr,
                     gc_part_ptr, total_ptr, N, K, D, dot_scale, norm_scale, row_chunk,
                     code_chunk, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
                     NEED_C: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DP: tl.constexpr):
    """Program (row chunk r, code chunk k) computes each logit tile of its rows x codes once,
    row block by row block (outer), code tile by code tile (inner). Row side, in registers:
    dot_scale sum_j gb c_j (and ga c_j) over its codes -> gs_part[k, rows] (gt_part[k, rows]).
    Code side, read-modify-written in gc_part[r, codes] and total[r, codes], which only this
    program touches, in row-block order: sum_n (ga t_n + gb s_n) and sum_n (ga + gb)."""
    chunk_r, chunk_k = tl.program_id(0), tl.program_id(1)
    row_first = chunk_r * row_chunk
    row_last = tl.minimum(row_first + row_chunk, N)
    code_first = chunk_k * code_chunk
    code_last = tl.minimum(code_first + code_chunk, K)
    dcols = tl.arange(0, DP)
    for n0 in range(row_first, row_last, BLOCK_N):
        if NEED_C:
            # The code-side slice is read back by other threads than those that wrote it
            # (layouts differ), and Triton orders only shared memory by itself.
            tl.debug_barrier()
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < row_last
        t = _load_rows(t_ptr, rows, row_mask, dcols, D)
        s = _load_rows(s_ptr, rows, row_mask, dcols, D)
        lse_a, lse_b, expected, g = _row_stats(stats_ptr, grad_ptr, rows, row_mask)
        acc_s = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        for k0 in range(code_first, code_last, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            valid = codes < code_last
            c, cn = _load_codes(c_ptr, cn_ptr, codes, valid, dcols, D)
            a, b = _logits(t, s, c, cn, dot_scale, norm_scale, PRECISION)
            ga, gb = _logit_grads(a, b, lse_a, lse_b, expected, g,
                                  row_mask[:, None] & valid[None, :])
            if NEED_S:
                acc_s = tl.dot(gb, c, acc_s, input_precision=PRECISION)
            if NEED_T:
                acc_t = tl.dot(ga, c, acc_t, input_precision=PRECISION)
            if NEED_C:
                _accumulate_codes(gc_part_ptr, total_ptr, chunk_r, codes, valid, dcols, K, D,
                                  n0 > row_first, ga, gb, t, s, PRECISION)
        if NEED_S:
            _store_rows(gs_part_ptr, chunk_k, rows, row_mask, dcols, N, D, dot_scale * acc_s)
        if NEED_T:
            _store_rows(gt_part_ptr, chunk_k, rows, row_mask, dcols, N, D, dot_scale * acc_t)


def _scales(temperature, metric):
    return (2.0 / temperature, 1.0 / temperature) if metric == "l2" else (1.0 / temperature, 0.0)


def _prune_distill_configs(configs, named_args, **kwargs):
    """The [rows, D] operands live in registers: smaller tiles as D grows."""
    d_pad = max(16, triton.next_power_of_2(named_args["D"]))
    limit = 128 if d_pad <= 64 else 64 if d_pad <= 128 else 32 if d_pad <= 256 else 16
    keep = [c for c in configs if max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) <= limit]
    return keep or [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


def _tuned(kernel, key, shapes):
    """shapes: (BLOCK_N, BLOCK_K, warps, stages) to try."""
    return autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                 for bn, bk, w, st in shapes],
        key=key, prune_configs_by={"early_config_prune": _prune_distill_configs})(kernel)


_forward_tuned = _tuned(_forward_kernel, ["D"], [
    (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2),
    (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)])
# The fused backward holds more tiles at once: every shape hits 255 registers at D = 64 and
# spills (sm_90 ptxas, KB per thread without the teacher: 64 x 64 x 4 warps 2.5, x 8 warps 1.6,
# 64 x 32 0.8, 128 x 128 4.8), so 8-warp and narrower shapes are among those tried.
_backward_tuned = _tuned(_backward_kernel, ["D", "NEED_S", "NEED_T", "NEED_C"], [
    (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 1), (128, 64, 8, 2), (64, 128, 8, 2),
    (64, 32, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)])


def _launch(kernel, tuned, grid, *args, dim, **flags):
    """Runs `kernel` over grid(meta) programs: autotuned on a GPU, one small configuration in the
    interpreter. fp32 dots run as 3 tf32 passes (fp32-like accuracy)."""
    d_pad = max(16, triton.next_power_of_2(dim))
    if interpreting():
        meta = dict(BLOCK_N=16, BLOCK_K=16)
        kernel[grid(meta)](*args, PRECISION="ieee", DP=d_pad, **flags, **meta)
    else:
        tuned[grid](*args, PRECISION="tf32x3", DP=d_pad, **flags)


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
    _launch(_forward_kernel, _forward_tuned,
            lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]),),
            s, t, c, row_sq_norms(c), kl, stats, num_rows, c.shape[0], dim, dot_scale,
            norm_scale, dim=dim)
    if s.dtype == torch.float64:
        return kl.double(), stats.double()
    return kl, stats


# The backward's programs own ROW_CHUNK rows x CODE_CHUNK codes (multiples of every block size;
# any chunk is correct): 64 x 8 = 512 programs at N = 65536, K = 16384, D = 64, whose partials
# take 388 MiB (644 MiB with the teacher's gradient, which the bound below turns into 256
# programs and 386 MiB). Small problems halve the chunks (down to 128) towards MIN_PROGRAMS. The
# fp32 partials, [N / R, K, D] + [N / R, K] for the codebook and [K / C, N, D] per row gradient,
# stay under PARTIAL_BYTES: a chunk doubles while they exceed it, down to MIN_PROGRAMS / 4
# programs (huge N x K then exceeds the bound rather than the GPU idling).
ROW_CHUNK, CODE_CHUNK = 1024, 2048
MIN_PROGRAMS = 512
PARTIAL_BYTES = 512 << 20


def _chunks(num_rows, num_codes, dim, row_grads, codebook_grad):
    """(rows, codes) per program for `row_grads` (0 to 2) row-side gradients and the codebook's
    (`codebook_grad`)."""
    rows, codes = ROW_CHUNK, CODE_CHUNK

    def programs():
        return triton.cdiv(num_rows, rows) * triton.cdiv(num_codes, codes)

    def row_side():  # bytes of the row-side and code-side partials
        return 4 * dim * num_rows * row_grads * triton.cdiv(num_codes, codes)

    def code_side():
        return 4 * (dim + 1) * num_codes * codebook_grad * triton.cdiv(num_rows, rows)

    while programs() < MIN_PROGRAMS and max(rows, codes) > 128:
        if codes >= rows:
            codes //= 2
        else:
            rows //= 2
    while row_side() + code_side() > PARTIAL_BYTES and programs() > MIN_PROGRAMS // 4:
        if codes < num_codes and (row_side() >= code_side() or rows >= num_rows):
            codes *= 2
        else:
            rows *= 2
    return rows, codes


def code_distill_loss_backward(grad_row_kl, student, teacher, codebook, stats, temperature,
                               metric, output_mask):
    """-> (grad_student [N, D], grad_teacher [N, D], grad_codebook [K, D]), each of its input's
    dtype where output_mask says so, else an empty [0]. One fused pass; its fp32 partials are
    added over the chunks in chunk order (deterministic)."""
    s, t, c = student.contiguous(), teacher.contiguous(), codebook.contiguous()
    num_rows, dim = s.shape
    num_codes = c.shape[0]
    need_s, need_t, need_c = output_mask
    if num_rows == 0 or not any(output_mask):
        return (torch.empty_like(s) if need_s else s.new_empty(0),
                torch.empty_like(t) if need_t else t.new_empty(0),
                torch.zeros_like(c) if need_c else c.new_empty(0))
    dot_scale, norm_scale = _scales(temperature, metric)
    rows, codes = _chunks(num_rows, num_codes, dim, need_s + need_t, need_c)
    row_chunks, code_chunks = triton.cdiv(num_rows, rows), triton.cdiv(num_codes, codes)

    def partial(needed, *shape):
        return torch.empty(shape if needed else (0,), device=s.device, dtype=torch.float32)

    gs_part = partial(need_s, code_chunks, num_rows, dim)
    gt_part = partial(need_t, code_chunks, num_rows, dim)
    gc_part = partial(need_c, row_chunks, num_codes, dim)
    total = partial(need_c, row_chunks, num_codes)
    _launch(_backward_kernel, _backward_tuned, lambda meta: (row_chunks, code_chunks),
            grad_row_kl.float().contiguous(), s, t, c, row_sq_norms(c), stats.float().contiguous(),
            gs_part, gt_part, gc_part, total, num_rows, num_codes, dim, dot_scale, norm_scale,
            rows, codes, dim=dim, NEED_S=bool(need_s), NEED_T=bool(need_t),
            NEED_C=bool(need_c))
    grad_c = c.new_empty(0)
    if need_c:
        grad_c = (dot_scale * gc_part.sum(0)
                  - (2.0 * norm_scale) * total.sum(0)[:, None] * c.float()).to(c.dtype)
    return (gs_part.sum(0).to(s.dtype) if need_s else s.new_empty(0),
            gt_part.sum(0).to(t.dtype) if need_t else t.new_empty(0), grad_c)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {n: "*fp32" for n in ("grad_ptr", "s_ptr", "t_ptr", "c_ptr", "cn_ptr", "stats_ptr",
                               "kl_ptr", "gs_part_ptr", "gt_part_ptr", "gc_part_ptr",
                               "total_ptr")}
_TYPES.update(dot_scale="fp32", norm_scale="fp32")
_BLOCKS = dict(PRECISION="tf32x3", BLOCK_N=64, BLOCK_K=64, DP=64)
COMPILE_CASES = [("_forward_kernel", _BLOCKS, _TYPES)] + [
    ("_backward_kernel", dict(_BLOCKS, NEED_S=need_s, NEED_T=need_t, NEED_C=need_c), _TYPES)
    for need_s, need_t, need_c in [(True, False, True), (True, True, True), (True, True, False),
                                   (False, False, True)]
]
