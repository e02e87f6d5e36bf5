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

from .window_common import (LN2_K, LOG2E, LOG2E_K, MIN_INTERIOR_TILES, band_autotune,
                            band_bounds, band_compile_cases, band_grid, band_key_tile,
                            band_program, dot_precision, effective_window, exclusion_args,
                            exclusion_rows, first_band_position, global_blocks,
                            global_compile_case, global_key_tile, global_program,
                            interior_split, list_key_tile, load_node_tile, load_rows,
                            prepare_inputs, split_count)


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
def load_state(out_ptr, lse_ptr, rows, ok, h, H, D, cols):
    """Online-softmax state (m, l, acc) equal to a part's (out [N, H, D], lse [N, H]), in the
    log2 domain; rows with lse = -inf (no keys) give m = -inf, l = 0, acc = 0."""
    m = tl.load(lse_ptr + rows.to(tl.int64) * H + h, mask=ok, other=float("-inf")) * LOG2E_K
    weight = tl.where(m == float("-inf"), 0.0, 1.0)
    return m, weight, load_node_tile(out_ptr, rows, ok, h, H, D, cols) * weight[:, None]


@triton.jit
def attend_key_list(acc, m_i, l_i, q, k_ptr, v_ptr, list_ptr, live_ptr, q_pos, q_ok, lo, hi,
                    live_q_stride, stride_n, cols, D, qk_scale, K_FROM_LIST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """attend_tile over the keys at list positions lo, ..., hi - 1 (node ids list_ptr[pos], or
    pos itself) where live_ptr[q_pos * live_q_stride + pos] != 0."""
    for start in range(lo, hi, BLOCK_N):
        k, v, live = list_key_tile(k_ptr, v_ptr, list_ptr, live_ptr, q_pos, q_ok, start, hi,
                                   live_q_stride, stride_n, cols, D, K_FROM_LIST, BLOCK_N)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, live, qk_scale, True, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def attend_band_span(acc, m_i, l_i, q, k_ptr, v_ptr, start, end, hi, r, dilation, stride_n,
                     cols, D, key_lb, key_ub, excl_rows, qk_scale, MASKED: tl.constexpr,
                     HAS_EXCLUDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """attend_tile over the band key tiles start, start + BLOCK_N, ... < end (keys < hi)."""
    for tile in range(start, end, BLOCK_N):
        k, v, valid = band_key_tile(k_ptr, v_ptr, tile, hi, r, dilation, stride_n, cols, D,
                                    key_lb, key_ub, excl_rows, HAS_EXCLUDE, BLOCK_N)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, MASKED,
                                    DOT_PRECISION)
    return acc, m_i, l_i


@band_autotune([(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3)])
@triton.jit
def _band_forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, exclude_ptr, init_out_ptr,
                         init_lse_ptr, list_ptr, live_ptr, stride_b, stride_n, stride_h, N, H,
                         D, window, dilation, num_global, exclude_stride, exclude_center,
                         num_list, qk_scale, CAUSAL: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                         UNION: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """With UNION (B = 1, graph_attention's union): the softmax starts from (init_out,
    init_lse), the edge part, and after the band also meets the keys list_ptr[0:num_list]
    where live_ptr[i * num_list + g] != 0 (the global nodes)."""
    p0, r, b, h, length = band_program(N, H, dilation, BLOCK_M)
    first_band = first_band_position(num_global, r, dilation)
    if (p0 < length) & (p0 + BLOCK_M > first_band):
        base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        cols = tl.arange(0, BLOCK_D)
        offs_m = p0 + tl.arange(0, BLOCK_M)
        rows_m = r + offs_m * dilation
        q = load_rows(q_ptr + base, rows_m, offs_m < length, stride_n, cols, D)
        if UNION:
            m_i, l_i, acc = load_state(init_out_ptr, init_lse_ptr, rows_m, offs_m < length, h, H,
                                       D, cols)
        else:
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
        if UNION:
            acc, m_i, l_i = attend_key_list(acc, m_i, l_i, q, k_ptr + base, v_ptr + base,
                                            list_ptr, live_ptr, rows_m, offs_m < length, 0,
                                            num_list, num_list, stride_n, cols, D, qk_scale,
                                            True, DOT_PRECISION, BLOCK_N)
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
    m0, split, b, h = global_program(num_global, num_splits, H, BLOCK_M)
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    cols = tl.arange(0, BLOCK_D)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = load_rows(q_ptr + base, offs_m, offs_m < num_global, stride_n, cols, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, key_end)
    for start in range(lo, hi, BLOCK_N):
        k, v, valid = global_key_tile(k_ptr + base, v_ptr + base, start, hi, offs_m, stride_n,
                                      cols, D, CAUSAL, BLOCK_N)
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, valid, qk_scale, True,
                                    DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = ((split.to(tl.int64) * B + b) * num_global + offs_m) * H + h
    tl.store(part_out_ptr + rows[:, None] * D + cols[None, :], acc / l_safe[:, None],
             mask=(offs_m < num_global)[:, None] & (cols < D)[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2_K)
    tl.store(part_lse_ptr + rows, lse, mask=offs_m < num_global)


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


def window_attention_forward(q, k, v, window, dilation, num_global, causal, scale,
                             exclude=None, union=None):
    """q, k, v [B, N, H, D] fp32/fp16/bf16 on a GPU (or CPU under the interpreter), exclude
    None or bool [N, 2 * window + 1] -> (out [B, N, H, D] in q's dtype, lse [B, N, H] fp32).

    union (B = 1, num_global = 0): graph_attention's union, an object with init_out [N, H, D],
    init_lse [N, H] (contiguous: the edge part, the softmax's initial state), glob int64 [G]
    and keys_live uint8 [N, G] (the global keys of each query): out and lse then cover all
    three parts."""
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
    union_args = (lse, lse, lse, lse, 0) if union is None else (
        union.init_out, union.init_lse, union.glob, union.keys_live, union.count)
    _band_forward_kernel[band_grid(batch * heads, n, dilation, "BLOCK_M")](
        q, k, v, out, lse, exclude, *union_args[:4], q.stride(0), q.stride(1), q.stride(2), n,
        heads, dim, window, dilation, num_global, exclude_stride, exclude_center, union_args[4],
        qk_scale, CAUSAL=causal, HAS_EXCLUDE=exclude_stride > 0, UNION=union is not None,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=block_d)
    if num_global > 0:
        _global_query_forward(q, k, v, out, lse, num_global, causal, qk_scale, block_d)
    return out, lse


COMPILE_CASES = [*band_compile_cases("_band_forward_kernel", 128, 64),
                 global_compile_case("_global_query_forward_kernel")]
