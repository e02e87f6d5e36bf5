"""Triton forward of dilated window attention with global tokens (flash-attention style).

Dilation is free: for dilation d, query i only meets keys j with j % d == i % d, so each residue
class r is a dense band of half-width `window` over the strided subsequence x[r::d] (row stride
d * stride_n, no copy). A band program owns BLOCK_M consecutive queries of one class and one
(b, h) and walks the key blocks of its band, then the global keys [0, G). The global queries
(rows < G) see every key: they run split over key chunks, each chunk writing a partial
(out, lse), combined in a fixed order (deterministic). Softmax runs in fp32 in the log2 domain.
"""
import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import autotune

LOG2E = 1.4426950408889634
# The same constants inside kernels (jit code reads only constexpr globals).
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(0.6931471805599453)
# Bound of S * G * B * H rows of the fp32 partial buffers of the global passes.
PARTIAL_ROWS_BUDGET = 1 << 18
# Fewest tiles along the long axis per chunk of a global pass (amortises the partial buffers).
MIN_TILES_PER_SPLIT = 8
# A band program splits its tiles into masked edges and an unmasked interior only when the
# interior holds this many tiles: each split ends a software-pipelined loop, whose refill
# costs more than the masks of one or two tiles save.
MIN_INTERIOR_TILES = tl.constexpr(3)
# Band kernels are autotuned only from this many (query, head) rows (N * H) on: small problems
# (tests) run the first config, compiling one variant instead of all.
AUTOTUNE_MIN_ROWS = 1 << 18
# Head dims above this run one small config that fits shared memory in every dtype.
LARGE_HEAD_DIM = 128
LARGE_HEAD_CONFIG = (32, 32, 4, 1)


def band_autotune(configs):
    """Autotuner of a band kernel over (BLOCK_M, BLOCK_N, num_warps, num_stages) configs, the first
    being the default. Under the interpreter: one small config (it is slow)."""
    if interpreting():
        configs = [(16, 16, 1, 1)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in configs + [LARGE_HEAD_CONFIG]]

    def prune(configs, named_args, **kwargs):
        if named_args["D"] > LARGE_HEAD_DIM:
            return configs[-1:]
        large = named_args["N"] * named_args["H"] >= AUTOTUNE_MIN_ROWS
        return configs[:-1] if large else configs[:1]

    return autotune(configs, key=["N", "H", "window", "dilation", "D", "CAUSAL"],
                    prune_configs_by={"early_config_prune": prune})


@triton.jit
def load_rows(ptr, rows, row_ok, stride_n, cols, D):
    """Tile [len(rows), BLOCK_D] of rows `rows` (token indices) of a [N, D] view; 0 elsewhere."""
    offsets = rows.to(tl.int64)[:, None] * stride_n + cols[None, :]
    return tl.load(ptr + offsets, mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def band_program(N, H, dilation, BLOCK: tl.constexpr):
    """Decodes a band program id into (first position, residue class r, b, h, length of the
    class). Consecutive programs take consecutive blocks of one class: they share K/V in L2."""
    pid = tl.program_id(0)
    blocks = ((N + dilation - 1) // dilation + BLOCK - 1) // BLOCK
    rest = pid // blocks
    r = rest % dilation
    bh = rest // dilation
    length = (N - r + dilation - 1) // dilation
    return (pid % blocks) * BLOCK, r, bh // H, bh % H, length


@triton.jit
def first_band_position(num_global, r, dilation):
    """First position p of residue class r whose token r + p * dilation is not global."""
    return (num_global - r + dilation - 1) // dilation


@triton.jit
def band_bounds(offs, window, hi, CAUSAL: tl.constexpr):
    """Per row (query position) of a band tile, the first and last key position it attends:
    [p - window, min(p + window, hi - 1)] (p instead of p + window if causal). Two bounds per
    row make the tile mask two compares per element."""
    return offs - window, tl.minimum(offs + (0 if CAUSAL else window), hi - 1)


@triton.jit
def interior_split(lo, hi, full_start, full_end, BLOCK: tl.constexpr):
    """Splits the tiles lo, lo + BLOCK, ... below hi at mid_lo <= mid_hi: the tiles of
    [mid_lo, mid_hi) lie inside [full_start, full_end), where every row of the program meets
    every column, so they need no mask; the tiles outside are masked."""
    tiles = tl.maximum(hi - lo + BLOCK - 1, 0) // BLOCK
    first = tl.minimum(tl.maximum(full_start - lo + BLOCK - 1, 0) // BLOCK, tiles)
    last = tl.minimum(tl.maximum(tl.maximum(tl.minimum(full_end, hi) - lo, 0) // BLOCK, first),
                      tiles)
    return lo + first * BLOCK, lo + last * BLOCK


@triton.jit
def attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, MASKED: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key tile, scores in the log2 domain."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def band_valid(offs_n, key_lb, key_ub, excl_rows, HAS_EXCLUDE: tl.constexpr):
    """[M, N] mask of the band keys offs_n of each query row: inside [key_lb, key_ub] and, with
    HAS_EXCLUDE, not dropped: excl_rows [M] points at the exclusion byte of key position 0 of
    each row (rows outside the sequence must have an empty range)."""
    valid = (offs_n[None, :] >= key_lb[:, None]) & (offs_n[None, :] <= key_ub[:, None])
    if HAS_EXCLUDE:
        dropped = tl.load(excl_rows[:, None] + offs_n[None, :], mask=valid, other=1)
        valid = valid & (dropped == 0)
    return valid


@triton.jit
def exclusion_rows(exclude_ptr, rows_m, offs_m, row_ok, key_ub, exclude_stride, exclude_center,
                   HAS_EXCLUDE: tl.constexpr):
    """(excl_rows, key_ub) for band_valid: with HAS_EXCLUDE, the pointer of each query row's
    exclusion byte for key position 0 (exclude[i, t + center] with t = key - query position),
    and key_ub emptied on rows outside the sequence so that nothing is read there."""
    if HAS_EXCLUDE:
        excl_rows = (exclude_ptr + rows_m.to(tl.int64) * exclude_stride
                     + (exclude_center - offs_m))
        return excl_rows, tl.where(row_ok, key_ub, -1)
    return exclude_ptr + 0 * offs_m, key_ub


@triton.jit
def load_band_keys(k_ptr, v_ptr, tile, hi, r, dilation, stride_n, cols, D, key_lb, key_ub,
                   excl_rows, HAS_EXCLUDE: tl.constexpr, BLOCK_N: tl.constexpr):
    """k, v [BLOCK_N, BLOCK_D] of band key tile `tile` (keys < hi, token rows r + j dilation)
    and which (query, key) pairs of it are in the band."""
    offs_n = tile + tl.arange(0, BLOCK_N)
    rows_n = r + offs_n * dilation
    k = load_rows(k_ptr, rows_n, offs_n < hi, stride_n, cols, D)
    v = load_rows(v_ptr, rows_n, offs_n < hi, stride_n, cols, D)
    return k, v, band_valid(offs_n, key_lb, key_ub, excl_rows, HAS_EXCLUDE)


@triton.jit
def attend_band_span(acc, m_i, l_i, q, k_ptr, v_ptr, start, end, hi, r, dilation, stride_n,
                     cols, D, key_lb, key_ub, excl_rows, qk_scale, MASKED: tl.constexpr,
                     HAS_EXCLUDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """attend_tile over the band key tiles start, start + BLOCK_N, ... < end (keys < hi)."""
    for tile in range(start, end, BLOCK_N):
        k, v, valid = load_band_keys(k_ptr, v_ptr, tile, hi, r, dilation, stride_n, cols, D,
                                     key_lb, key_ub, excl_rows, HAS_EXCLUDE, BLOCK_N)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, MASKED,
                                    DOT_PRECISION)
    return acc, m_i, l_i


@band_autotune([(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3)])
@triton.jit
def _band_forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, exclude_ptr, stride_b, stride_n,
                         stride_h, N, H, D, window, dilation, num_global, exclude_stride,
                         exclude_center, qk_scale, CAUSAL: tl.constexpr,
                         HAS_EXCLUDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    p0, r, b, h, length = band_program(N, H, dilation, BLOCK_M)
    first_band = first_band_position(num_global, r, dilation)
    if (p0 < length) & (p0 + BLOCK_M > first_band):
        base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        cols = tl.arange(0, BLOCK_D)
        offs_m = p0 + tl.arange(0, BLOCK_M)
        rows_m = r + offs_m * dilation
        q = load_rows(q_ptr + base, rows_m, offs_m < length, stride_n, cols, D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Band keys; those of global tokens are skipped here and met once, below.
        lo = tl.maximum(p0 - window, first_band)
        hi = tl.minimum(p0 + BLOCK_M + (0 if CAUSAL else window), length)
        key_lb, key_ub = band_bounds(offs_m, window, hi, CAUSAL)
        excl_rows, key_ub = exclusion_rows(exclude_ptr, rows_m, offs_m, offs_m < length, key_ub,
                                           exclude_stride, exclude_center, HAS_EXCLUDE)
        mid_lo, mid_hi = interior_split(lo, hi, p0 + BLOCK_M - 1 - window,
                                        p0 + 1 + (0 if CAUSAL else window), BLOCK_N)
        k_base = k_ptr + base
        v_base = v_ptr + base
        # With exclusions every tile is masked: no unmasked interior.
        if (not HAS_EXCLUDE) and (mid_hi - mid_lo >= MIN_INTERIOR_TILES * BLOCK_N):
            acc, m_i, l_i = attend_band_span(acc, m_i, l_i, q, k_base, v_base, lo, mid_lo, hi,
                                             r, dilation, stride_n, cols, D, key_lb, key_ub,
                                             excl_rows, qk_scale, True, HAS_EXCLUDE,
                                             DOT_PRECISION, BLOCK_N)
            acc, m_i, l_i = attend_band_span(acc, m_i, l_i, q, k_base, v_base, mid_lo, mid_hi,
                                             hi, r, dilation, stride_n, cols, D, key_lb, key_ub,
                                             excl_rows, qk_scale, False, HAS_EXCLUDE,
                                             DOT_PRECISION, BLOCK_N)
            acc, m_i, l_i = attend_band_span(acc, m_i, l_i, q, k_base, v_base, mid_hi, hi, hi,
                                             r, dilation, stride_n, cols, D, key_lb, key_ub,
                                             excl_rows, qk_scale, True, HAS_EXCLUDE,
                                             DOT_PRECISION, BLOCK_N)
        else:
            acc, m_i, l_i = attend_band_span(acc, m_i, l_i, q, k_base, v_base, lo, hi, hi, r,
                                             dilation, stride_n, cols, D, key_lb, key_ub,
                                             excl_rows, qk_scale, True, HAS_EXCLUDE,
                                             DOT_PRECISION, BLOCK_N)
        for start in range(0, num_global, BLOCK_N):
            offs_j = start + tl.arange(0, BLOCK_N)
            k = load_rows(k_ptr + base, offs_j, offs_j < num_global, stride_n, cols, D)
            v = load_rows(v_ptr + base, offs_j, offs_j < num_global, stride_n, cols, D)
            valid = (offs_j < num_global)[None, :]
            acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, True,
                                        DOT_PRECISION)
        # Rows of global tokens are written by the global pass.
        store_ok = (offs_m < length) & (offs_m >= first_band)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        out_rows = rows_m.to(tl.int64) * H * D + b.to(tl.int64) * N * H * D + h * D
        tl.store(out_ptr + out_rows[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=store_ok[:, None] & (cols < D)[None, :])
        lse_rows = (b.to(tl.int64) * N + rows_m) * H + h
        tl.store(lse_ptr + lse_rows, (m_i + tl.log2(l_safe)) * LN2_K, mask=store_ok)


@triton.jit
def _global_query_forward_kernel(q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr,
                                 stride_b, stride_n, stride_h, B, H, D, num_global, key_end,
                                 keys_per_split, num_splits, qk_scale,
                                 CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
    """Rows [0, G) against key chunk `split`: writes normalised partial out and lse to
    part_out [S, B, G, H, D] and part_lse [S, B, G, H] (fp32)."""
    pid = tl.program_id(0)
    blocks = (num_global + BLOCK_M - 1) // BLOCK_M
    split = (pid // blocks) % num_splits
    bh = pid // (blocks * num_splits)
    b = bh // H
    h = bh % H
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    cols = tl.arange(0, BLOCK_D)
    offs_m = (pid % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(q_ptr + base, offs_m, offs_m < num_global, stride_n, cols, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, key_end)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_rows(k_ptr + base, offs_n, offs_n < hi, stride_n, cols, D)
        v = load_rows(v_ptr + base, offs_n, offs_n < hi, stride_n, cols, D)
        valid = (offs_n < hi)[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, True,
                                    DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = ((split.to(tl.int64) * B + b) * num_global + offs_m) * H + h
    tl.store(part_out_ptr + rows[:, None] * D + cols[None, :], acc / l_safe[:, None],
             mask=(offs_m < num_global)[:, None] & (cols < D)[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2_K)
    tl.store(part_lse_ptr + rows, lse, mask=offs_m < num_global)


def dot_precision(dtype):
    """fp32 inputs keep fp32 products (torch's default matmul precision); others use MMA."""
    return "ieee" if dtype == torch.float32 else "tf32"


def prepare_inputs(*tensors):
    """The tensors with one set of strides and a unit last stride (copies only when needed)."""
    first = tensors[0]
    if first.stride(-1) == 1 and all(t.stride() == first.stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def effective_window(n, window, dilation):
    """(window, dilation) bounded by N with the same key sets: keys past the ends do not exist."""
    dilation = min(dilation, max(n, 1))
    return min(window, max(n - 1, 0) // dilation), dilation


def global_blocks(num_global, dim):
    """(rows per program, tile along the long axis, num_stages) of the global passes."""
    if interpreting():
        return 16, 16, 1
    if dim > LARGE_HEAD_DIM:
        return max(16, min(32, triton.next_power_of_2(num_global))), 32, 1
    return max(16, min(64, triton.next_power_of_2(num_global))), 64, 3


def split_count(long_len, num_global, batch_heads, block):
    """(number of chunks, chunk length) of a global pass over `long_len` keys or queries: enough
    chunks to fill the GPU, few enough for the fp32 partial buffers to stay small."""
    budget = max(1, PARTIAL_ROWS_BUDGET // max(1, num_global * batch_heads))
    splits = max(1, min(triton.cdiv(long_len, block * MIN_TILES_PER_SPLIT), budget))
    per_split = triton.cdiv(triton.cdiv(long_len, splits), block) * block
    return triton.cdiv(long_len, per_split), per_split


def band_grid(batch_heads, n, dilation, block_key):
    """Grid of a band kernel: one program per block of meta[block_key] positions of a residue
    class, for every class and (b, h)."""
    def grid(meta):
        blocks = triton.cdiv(triton.cdiv(n, dilation), meta[block_key])
        return (batch_heads * dilation * blocks,)
    return grid


def _global_query_forward(q, k, v, out, lse, num_global, causal, qk_scale, block_d):
    batch, n, heads, dim = q.shape
    key_end = num_global if causal else n
    block_m, block_n, stages = global_blocks(num_global, dim)
    splits, per_split = split_count(key_end, num_global, batch * heads, block_n)
    part_out = q.new_empty((splits, batch, num_global, heads, dim), dtype=torch.float32)
    part_lse = q.new_empty((splits, batch, num_global, heads), dtype=torch.float32)
    grid = (triton.cdiv(num_global, block_m) * splits * batch * heads,)
    _global_query_forward_kernel[grid](
        q, k, v, part_out, part_lse, q.stride(0), q.stride(1), q.stride(2), batch, heads, dim,
        num_global, key_end, per_split, splits, qk_scale, CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=stages)
    lse_global = torch.logsumexp(part_lse, 0)
    weights = torch.exp(part_lse - lse_global).unsqueeze(-1)
    out[:, :num_global] = (weights * part_out).sum(0).to(out.dtype)
    lse[:, :num_global] = lse_global


def exclusion_args(exclude, window, placeholder):
    """(tensor, row stride, centre column) of the optional exclusion mask [N, 2 * window + 1]
    for the band kernels (`placeholder`, never read, when None)."""
    if exclude is None:
        return placeholder, 0, 0
    return exclude.contiguous().view(torch.uint8), 2 * window + 1, window


def window_attention_forward(q, k, v, window, dilation, num_global, causal, scale,
                             exclude=None):
    """q, k, v [B, N, H, D] fp32/fp16/bf16 on a GPU (or CPU under the interpreter), exclude
    None or bool [N, 2 * window + 1] -> (out [B, N, H, D] in q's dtype, lse [B, N, H] fp32)."""
    batch, n, heads, dim = q.shape
    out = q.new_empty((batch, n, heads, dim))
    lse = q.new_empty((batch, n, heads), dtype=torch.float32)
    if q.numel() == 0:
        return out, lse
    q, k, v = prepare_inputs(q, k, v)
    exclude, exclude_stride, exclude_center = exclusion_args(exclude, window, lse)
    window, dilation = effective_window(n, window, dilation)
    block_d = max(16, triton.next_power_of_2(dim))
    qk_scale = scale * LOG2E
    _band_forward_kernel[band_grid(batch * heads, n, dilation, "BLOCK_M")](
        q, k, v, out, lse, exclude, q.stride(0), q.stride(1), q.stride(2), n,
        heads, dim, window, dilation, num_global, exclude_stride, exclude_center, qk_scale,
        CAUSAL=causal, HAS_EXCLUDE=exclude_stride > 0, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=block_d)
    if num_global > 0:
        _global_query_forward(q, k, v, out, lse, num_global, causal, qk_scale, block_d)
    return out, lse

