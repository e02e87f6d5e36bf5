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
torch afterwards: deterministic without atomics. BACKWARD = "split" runs code_distill_split's two
passes instead (more dots, but register accumulators and no read-modify-write).
"""
import torch
import triton
import triton.language as tl

from .code_distill_common import (launch, load_codes, load_rows, logit_grads, logits, row_stats,
                                  tuned)
from .code_distill_split import split_backward
from .norms import row_sq_norms


@triton.jit
def _forward_kernel(s_ptr, t_ptr, c_ptr, cn_ptr, kl_ptr, stats_ptr, N, K, D, dot_scale,
                    norm_scale, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, DP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dcols = tl.arange(0, DP)
    t = load_rows(t_ptr, rows, row_mask, dcols, D)
    s = load_rows(s_ptr, rows, row_mask, dcols, D)
    max_a = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    max_b = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    sum_a = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    cross = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_j exp(a - max_a) (a - b)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        valid = codes < K
        c, cn = load_codes(c_ptr, cn_ptr, codes, valid, dcols, D)
        a, b = logits(t, s, c, cn, dot_scale, norm_scale, PRECISION)
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
        t = load_rows(t_ptr, rows, row_mask, dcols, D)
        s = load_rows(s_ptr, rows, row_mask, dcols, D)
        lse_a, lse_b, expected, g = row_stats(stats_ptr, grad_ptr, rows, row_mask)
        acc_s = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_N, DP], dtype=tl.float32)
        for k0 in range(code_first, code_last, BLOCK_K):
            codes = k0 + tl.arange(0, BLOCK_K)
            valid = codes < code_last
            c, cn = load_codes(c_ptr, cn_ptr, codes, valid, dcols, D)
            a, b = logits(t, s, c, cn, dot_scale, norm_scale, PRECISION)
            ga, gb = logit_grads(a, b, lse_a[:, None], lse_b[:, None], expected[:, None],
                                  g[:, None], row_mask[:, None] & valid[None, :])
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


_forward_tuned = tuned(_forward_kernel, ["D"], [
    (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2),
    (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)])
# The fused backward holds more tiles at once: every shape hits 255 registers at D = 64 and
# spills (sm_90 ptxas, KB per thread without the teacher: 64 x 64 x 4 warps 2.5, x 8 warps 1.6,
# 64 x 32 0.8, 128 x 128 4.8), so 8-warp and narrower shapes are among those tried.
_backward_tuned = tuned(_backward_kernel, ["D", "NEED_S", "NEED_T", "NEED_C"], [
    (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 1), (128, 64, 8, 2), (64, 128, 8, 2),
    (64, 32, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)])


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


def _fused_backward(grad, s, t, c, cn, stats, dot_scale, norm_scale, need_s, need_t, need_c):
    """split_backward's contract, computed by the one fused kernel over (row chunk, code chunk)
    programs; its fp32 partials are added over the chunks in chunk order (deterministic)."""
    num_rows, dim = s.shape
    num_codes = c.shape[0]
    rows, codes = _chunks(num_rows, num_codes, dim, need_s + need_t, need_c)
    row_chunks, code_chunks = triton.cdiv(num_rows, rows), triton.cdiv(num_codes, codes)

    def partial(needed, *shape):
        return torch.empty(shape if needed else (0,), device=s.device, dtype=torch.float32)

    gs_part = partial(need_s, code_chunks, num_rows, dim)
    gt_part = partial(need_t, code_chunks, num_rows, dim)
    gc_part = partial(need_c, row_chunks, num_codes, dim)
    total = partial(need_c, row_chunks, num_codes)
    launch(_backward_kernel, _backward_tuned, lambda meta: (row_chunks, code_chunks), grad, s, t,
           c, cn, stats, gs_part, gt_part, gc_part, total, num_rows, num_codes, dim, dot_scale,
           norm_scale, rows, codes, dim=dim, NEED_S=bool(need_s), NEED_T=bool(need_t),
           NEED_C=bool(need_c))
    return (gs_part.sum(0) if need_s else gs_part, gt_part.sum(0) if need_t else gt_part,
            (gc_part.sum(0), total.sum(0)) if need_c else None)


# Which backward runs: "fused" (one kernel, 5 dots per logit tile, code-side partials
# read-modify-written per tile) or "split" (code_distill_split: two passes, 7 dots per tile,
# register accumulators).
BACKWARD = "split"


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
    backward = split_backward if BACKWARD == "split" else _fused_backward
    gs, gt, code_sums = backward(grad_row_kl.float().contiguous(), s, t, c, row_sq_norms(c),
                                 stats.float().contiguous(), dot_scale, norm_scale, need_s,
                                 need_t, need_c)
    grad_c = c.new_empty(0)
    if need_c:
        weighted, total = code_sums
        grad_c = dot_scale * weighted - (2.0 * norm_scale) * total[:, None] * c.float()
        grad_c = grad_c.to(c.dtype)
    return (gs.to(s.dtype) if need_s else s.new_empty(0),
            gt.to(t.dtype) if need_t else t.new_empty(0), grad_c)


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
