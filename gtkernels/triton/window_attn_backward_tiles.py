"""Tile steps of the window-attention backward (window_attn_backward.py) and of
graph_attention's union (graph_union.py), flash-attention-2 algebra with the final lse and
delta: dq over a key tile, dk/dv over a query tile (transposed), and the loops of these over
band spans and node lists."""
import triton
import triton.language as tl

from .window_common import LOG2E_K, band_key_tile, list_key_tile, list_rows, load_rows


@triton.jit
def dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, MASKED: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """dq += ds @ k over one key tile; valid [M, N] (ignored unless MASKED)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None]
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    p = tl.exp2(s)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid_t, qk_scale, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """dk += ds^T @ q and dv += p^T @ dO over one query tile, computed transposed; valid_t
    [N, M] (ignored unless MASKED)."""
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :]
    if MASKED:
        s_t = tl.where(valid_t, s_t, float("-inf"))
    p_t = tl.exp2(s_t)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def load_row_stats(lse_ptr, delta_ptr, b, h, N, H, rows, row_ok):
    """lse (log2 domain) and delta of token rows `rows` of (b, h)."""
    idx = (b.to(tl.int64) * N + rows) * H + h
    lse2 = tl.load(lse_ptr + idx, mask=row_ok, other=0.0) * LOG2E_K
    return lse2, tl.load(delta_ptr + idx, mask=row_ok, other=0.0)


@triton.jit
def load_final_lse(lse_ptr, rows, ok, h, H):
    """lse [N, H] at rows in the log2 domain, +inf on rows without keys (so that p = 0)."""
    lse2 = tl.load(lse_ptr + rows * H + h, mask=ok, other=0.0) * LOG2E_K
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def dq_key_list(dq, q, do, lse2, delta, k_ptr, v_ptr, list_ptr, live_ptr, q_pos, q_ok, lo, hi,
                live_q_stride, stride_n, cols, D, qk_scale, K_FROM_LIST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq_tile over the keys at list positions lo, ..., hi - 1 (node ids list_ptr[pos], or pos
    itself) where live_ptr[q_pos * live_q_stride + pos] != 0."""
    for start in range(lo, hi, BLOCK_N):
        k, v, live = list_key_tile(k_ptr, v_ptr, list_ptr, live_ptr, q_pos, q_ok, start, hi,
                                   live_q_stride, stride_n, cols, D, K_FROM_LIST, BLOCK_N)
        dq = dq_tile(dq, q, do, lse2, delta, k, v, live, qk_scale, True, DOT_PRECISION)
    return dq


@triton.jit
def dkdv_query_list(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, list_ptr, live_ptr, k_pos,
                    k_ok, lo, hi, live_q_stride, stride_n, h, H, cols, D, qk_scale,
                    Q_FROM_LIST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """dkdv_tile over the queries at list positions lo, ..., hi - 1 (node ids list_ptr[pos], or
    pos itself) where live_ptr[pos * live_q_stride + k_pos] != 0; do, lse and delta are
    contiguous [N, H(, D)] (q_ptr offset to head h)."""
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_ok = offs_m < hi
        q_rows = list_rows(list_ptr, offs_m, q_ok, Q_FROM_LIST)
        q = load_rows(q_ptr, q_rows, q_ok, stride_n, cols, D)
        do = load_rows(do_ptr + h * D, q_rows, q_ok, H * D, cols, D)
        lse2 = load_final_lse(lse_ptr, q_rows, q_ok, h, H)
        delta = tl.load(delta_ptr + q_rows * H + h, mask=q_ok, other=0.0)
        live_t = tl.load(live_ptr + offs_m.to(tl.int64)[None, :] * live_q_stride
                         + k_pos[:, None], mask=q_ok[None, :] & k_ok[:, None], other=0) != 0
        dk, dv = dkdv_tile(dk, dv, k, v, q, do, lse2, delta, live_t, qk_scale, True,
                           DOT_PRECISION)
    return dk, dv


@triton.jit
def dq_band_span(dq, q, do, lse2, delta, k_ptr, v_ptr, start, end, hi, r, dilation, stride_n,
                 cols, D, key_lb, key_ub, excl_rows, qk_scale, MASKED: tl.constexpr,
                 HAS_EXCLUDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """dq_tile over the band key tiles start, start + BLOCK_N, ... < end (keys < hi)."""
    for tile in range(start, end, BLOCK_N):
        k, v, valid = band_key_tile(k_ptr, v_ptr, tile, hi, r, dilation, stride_n, cols, D,
                                    key_lb, key_ub, excl_rows, HAS_EXCLUDE, BLOCK_N)
        dq = dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, MASKED, DOT_PRECISION)
    return dq


@triton.jit
def dkdv_band_span(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, N, H, start, end, hi,
                   r, dilation, stride_n, cols, D, query_lb, query_ub, offs_n, exclude_ptr,
                   exclude_stride, exclude_center, qk_scale, MASKED: tl.constexpr,
                   HAS_EXCLUDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """dkdv_tile over the band query tiles start, start + BLOCK_M, ... < end (queries < hi);
    q_ptr is offset to (b, h), do_ptr to (b, h) of the contiguous [B, N, H, D] gradient;
    offs_n are the key positions (for the exclusion mask)."""
    for tile in range(start, end, BLOCK_M):
        offs_m = tile + tl.arange(0, BLOCK_M)
        rows_m = r + offs_m * dilation
        q_ok = offs_m < hi
        q = load_rows(q_ptr, rows_m, q_ok, stride_n, cols, D)
        do = load_rows(do_ptr, rows_m, q_ok, H * D, cols, D)
        lse2, delta = load_row_stats(lse_ptr, delta_ptr, b, h, N, H, rows_m, q_ok)
        valid_t = (offs_m[None, :] >= query_lb[:, None]) & (offs_m[None, :] <= query_ub[:, None])
        if HAS_EXCLUDE:  # exclude[query, key position - query position + centre]
            excl = (exclude_ptr + rows_m.to(tl.int64)[None, :] * exclude_stride
                    + (exclude_center + offs_n[:, None] - offs_m[None, :]))
            valid_t = valid_t & (tl.load(excl, mask=valid_t, other=1) == 0)
        dk, dv = dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid_t, qk_scale, MASKED,
                           DOT_PRECISION)
    return dk, dv
