"""Triton backward of dilated window attention with global tokens (flash-attention-2 algebra).

  p_ij = exp(s_ij - lse_i), ds_ij = p_ij (dO_i . v_j - delta_i), delta_i = dO_i . O_i - dlse_i
  dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dO_i

Band queries (token >= G) run first: a program owns a query block of one residue class,
computes the rows' delta, and walks its band and the global keys (dq). Band keys: a program owns
a key block and walks the query blocks whose band covers it, plus the global queries (dk, dv).
Global keys and global queries meet every query or key: they run split over chunks into fp32
partial buffers summed in a fixed order (window_attn_backward_global.py). Every output row has
one writer: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl

from .window_common import (LOG2E, LOG2E_K, MIN_INTERIOR_TILES, band_autotune, band_bounds,
                            band_compile_cases, band_grid, band_program, dot_precision,
                            effective_window, exclusion_args, exclusion_rows,
                            first_band_position, interior_split, load_node_tile, load_rows,
                            prepare_inputs)
from .window_attn_backward_tiles import (dkdv_band_span, dkdv_query_list, dkdv_tile, dq_band_span,
                                         dq_key_list, dq_tile, load_row_stats)
from .window_attn_backward_global import global_backward, global_row_delta


@band_autotune([(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)])
@triton.jit
def _band_dq_kernel(q_ptr, k_ptr, v_ptr, out_ptr, do_ptr, grad_lse_ptr, lse_ptr, delta_ptr,
                    dq_ptr, exclude_ptr, init_dq_ptr, list_ptr, live_ptr, stride_b, stride_n,
                    stride_h, N, H, D, window, dilation, num_global, exclude_stride,
                    exclude_center, num_list, qk_scale, scale, CAUSAL: tl.constexpr,
                    HAS_EXCLUDE: tl.constexpr, UNION: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """dq of the band queries; also computes and stores their delta = dO . O - dlse, which the
    dk/dv kernels read (this kernel runs first). With UNION (B = 1): delta_ptr holds delta
    already (out_ptr and grad_lse_ptr are not read), and dq also covers the keys
    list_ptr[0:num_list] live where live_ptr[i * num_list + g] != 0, plus init_dq (the edge
    part's dq)."""
    p0, r, b, h, length = band_program(N, H, dilation, BLOCK_M)
    first_band = first_band_position(num_global, r, dilation)
    if (p0 < length) & (p0 + BLOCK_M > first_band):
        base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        out_base = (b.to(tl.int64) * N * H + h) * D
        cols = tl.arange(0, BLOCK_D)
        offs_m = p0 + tl.arange(0, BLOCK_M)
        rows_m = r + offs_m * dilation
        row_ok = offs_m < length
        q = load_rows(q_ptr + base, rows_m, row_ok, stride_n, cols, D)
        do = load_rows(do_ptr + out_base, rows_m, row_ok, H * D, cols, D)
        stat_rows = (b.to(tl.int64) * N + rows_m) * H + h
        store_ok = row_ok & (offs_m >= first_band)
        if UNION:
            delta = tl.load(delta_ptr + stat_rows, mask=row_ok, other=0.0)
        else:
            o = load_rows(out_ptr + out_base, rows_m, row_ok, H * D, cols, D)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            if HAS_GRAD_LSE:
                delta -= tl.load(grad_lse_ptr + stat_rows, mask=row_ok, other=0.0)
            tl.store(delta_ptr + stat_rows, delta, mask=store_ok)
        lse2 = tl.load(lse_ptr + stat_rows, mask=row_ok, other=0.0) * LOG2E_K
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo = tl.maximum(p0 - window, first_band)
        hi = tl.minimum(p0 + BLOCK_M + (0 if CAUSAL else window), length)
        key_lb, key_ub = band_bounds(offs_m, window, hi, CAUSAL)
        excl_rows, key_ub = exclusion_rows(exclude_ptr, rows_m, offs_m, row_ok, key_ub,
                                           exclude_stride, exclude_center, HAS_EXCLUDE)
        mid_lo, mid_hi = interior_split(lo, hi, p0 + BLOCK_M - 1 - window,
                                        p0 + 1 + (0 if CAUSAL else window), BLOCK_N)
        k_base = k_ptr + base
        v_base = v_ptr + base
        if (not HAS_EXCLUDE) and (mid_hi - mid_lo >= MIN_INTERIOR_TILES * BLOCK_N):
            dq = dq_band_span(dq, q, do, lse2, delta, k_base, v_base, lo, mid_lo, hi, r,
                              dilation, stride_n, cols, D, key_lb, key_ub, excl_rows, qk_scale,
                              True, HAS_EXCLUDE, DOT_PRECISION, BLOCK_N)
            dq = dq_band_span(dq, q, do, lse2, delta, k_base, v_base, mid_lo, mid_hi, hi, r,
                              dilation, stride_n, cols, D, key_lb, key_ub, excl_rows, qk_scale,
                              False, HAS_EXCLUDE, DOT_PRECISION, BLOCK_N)
            dq = dq_band_span(dq, q, do, lse2, delta, k_base, v_base, mid_hi, hi, hi, r,
                              dilation, stride_n, cols, D, key_lb, key_ub, excl_rows, qk_scale,
                              True, HAS_EXCLUDE, DOT_PRECISION, BLOCK_N)
        else:
            dq = dq_band_span(dq, q, do, lse2, delta, k_base, v_base, lo, hi, hi, r, dilation,
                              stride_n, cols, D, key_lb, key_ub, excl_rows, qk_scale, True,
                              HAS_EXCLUDE, DOT_PRECISION, BLOCK_N)
        for start in range(0, num_global, BLOCK_N):
            offs_j = start + tl.arange(0, BLOCK_N)
            k = load_rows(k_ptr + base, offs_j, offs_j < num_global, stride_n, cols, D)
            v = load_rows(v_ptr + base, offs_j, offs_j < num_global, stride_n, cols, D)
            valid = (offs_j < num_global)[None, :]
            dq = dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, True, DOT_PRECISION)
        if UNION:
            dq = dq_key_list(dq, q, do, lse2, delta, k_ptr + base, v_ptr + base, list_ptr,
                             live_ptr, rows_m, row_ok, 0, num_list, num_list, stride_n, cols, D,
                             qk_scale, True, DOT_PRECISION, BLOCK_N)
        dq = dq * scale
        if UNION:
            dq += load_node_tile(init_dq_ptr, rows_m, row_ok, h, H, D, cols)
        tl.store(dq_ptr + out_base + rows_m.to(tl.int64)[:, None] * H * D + cols[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=store_ok[:, None] & (cols < D)[None, :])


@band_autotune([(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3), (32, 64, 4, 3)])
@triton.jit
def _band_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                      exclude_ptr, init_dk_ptr, init_dv_ptr, list_ptr, live_ptr, stride_b,
                      stride_n, stride_h, N, H, D, window, dilation, num_global, exclude_stride,
                      exclude_center, num_list, qk_scale, scale, CAUSAL: tl.constexpr,
                      HAS_EXCLUDE: tl.constexpr, UNION: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """dk, dv of the band keys. With UNION (B = 1): also the queries list_ptr[0:num_list] (the
    global nodes) where live_ptr[g * N + j] != 0, plus init_dk / init_dv (the edge part's)."""
    k0, r, b, h, length = band_program(N, H, dilation, BLOCK_N)
    first_band = first_band_position(num_global, r, dilation)
    if (k0 < length) & (k0 + BLOCK_N > first_band):
        base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        out_base = (b.to(tl.int64) * N * H + h) * D
        cols = tl.arange(0, BLOCK_D)
        offs_n = k0 + tl.arange(0, BLOCK_N)
        rows_n = r + offs_n * dilation
        key_ok = offs_n < length
        k = load_rows(k_ptr + base, rows_n, key_ok, stride_n, cols, D)
        v = load_rows(v_ptr + base, rows_n, key_ok, stride_n, cols, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Band queries whose window holds these keys (global queries are met below).
        lo = tl.maximum(k0 - (0 if CAUSAL else window), first_band)
        hi = tl.minimum(k0 + BLOCK_N + window, length)
        # Query i sees key j iff j - i in [-window, window] (or [-window, 0] if causal).
        query_lb = offs_n - (0 if CAUSAL else window)
        query_ub = tl.minimum(offs_n + window, hi - 1)
        mid_lo, mid_hi = interior_split(lo, hi, k0 + BLOCK_N - 1 - (0 if CAUSAL else window),
                                        k0 + 1 + window, BLOCK_M)
        q_base = q_ptr + base
        do_base = do_ptr + out_base
        if (not HAS_EXCLUDE) and (mid_hi - mid_lo >= MIN_INTERIOR_TILES * BLOCK_M):
            dk, dv = dkdv_band_span(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, b, h, N,
                                    H, lo, mid_lo, hi, r, dilation, stride_n, cols, D,
                                    query_lb, query_ub, offs_n, exclude_ptr,
                                    exclude_stride, exclude_center, qk_scale, True, HAS_EXCLUDE,
                                    DOT_PRECISION, BLOCK_M)
            dk, dv = dkdv_band_span(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, b, h, N,
                                    H, mid_lo, mid_hi, hi, r, dilation, stride_n, cols, D,
                                    query_lb, query_ub, offs_n, exclude_ptr,
                                    exclude_stride, exclude_center, qk_scale, False, HAS_EXCLUDE,
                                    DOT_PRECISION, BLOCK_M)
            dk, dv = dkdv_band_span(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, b, h, N,
                                    H, mid_hi, hi, hi, r, dilation, stride_n, cols, D,
                                    query_lb, query_ub, offs_n, exclude_ptr,
                                    exclude_stride, exclude_center, qk_scale, True, HAS_EXCLUDE,
                                    DOT_PRECISION, BLOCK_M)
        else:
            dk, dv = dkdv_band_span(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, b, h, N,
                                    H, lo, hi, hi, r, dilation, stride_n, cols, D, query_lb,
                                    query_ub, offs_n, exclude_ptr, exclude_stride,
                                    exclude_center, qk_scale, True, HAS_EXCLUDE, DOT_PRECISION,
                                    BLOCK_M)
        if not CAUSAL:  # a causal global query i < G sees no key j >= G
            for start in range(0, num_global, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                q_ok = offs_m < num_global
                q = load_rows(q_ptr + base, offs_m, q_ok, stride_n, cols, D)
                do = load_rows(do_ptr + out_base, offs_m, q_ok, H * D, cols, D)
                lse2, delta = load_row_stats(lse_ptr, delta_ptr, b, h, N, H, offs_m, q_ok)
                valid_t = q_ok[None, :]
                dk, dv = dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid_t, qk_scale, True,
                                   DOT_PRECISION)
        if UNION:
            dk, dv = dkdv_query_list(dk, dv, k, v, q_ptr + base, do_ptr, lse_ptr, delta_ptr,
                                     list_ptr, live_ptr, rows_n, key_ok, 0, num_list, N,
                                     stride_n, h, H, cols, D, qk_scale, True, DOT_PRECISION,
                                     BLOCK_M)
        dk = dk * scale
        if UNION:
            dk += load_node_tile(init_dk_ptr, rows_n, key_ok, h, H, D, cols)
            dv += load_node_tile(init_dv_ptr, rows_n, key_ok, h, H, D, cols)
        store_ok = (key_ok & (offs_n >= first_band))[:, None] & (cols < D)[None, :]
        ptrs = out_base + rows_n.to(tl.int64)[:, None] * H * D + cols[None, :]
        tl.store(dk_ptr + ptrs, dk.to(dk_ptr.dtype.element_ty), mask=store_ok)
        tl.store(dv_ptr + ptrs, dv.to(dv_ptr.dtype.element_ty), mask=store_ok)


def window_attention_backward(grad_out, grad_lse, q, k, v, out, lse, window, dilation,
                              num_global, causal, scale, exclude=None, union=None):
    """Gradients (dq, dk, dv) [B, N, H, D] in q's dtype of window_attention_forward.

    union (B = 1, num_global = 0, out and lse the union's): graph_attention's union, an object
    with init_dq, init_dk, init_dv [N, H, D] (contiguous, the edge part's gradients, added),
    glob int64 [G], keys_live uint8 [N, G] and rows_live uint8 [G, N] (the global keys of
    each query and the keys of each global query) and delta fp32 [N, H] (dO . O - dlse, read:
    out and grad_lse are not): the band kernels then also cover the global keys' part of dq
    and the global queries' part of dk, dv."""
    batch, n, heads, dim = q.shape
    grads = tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if q.numel() == 0:
        return grads
    q, k, v = prepare_inputs(q, k, v)
    grad_out = grad_out.to(q.dtype).contiguous()
    out = out.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    grad_lse = None if grad_lse is None else grad_lse.float().contiguous()
    delta = torch.empty_like(lse) if union is None else union.delta.view_as(lse)
    if num_global > 0:
        global_row_delta(grad_out, out, grad_lse, delta, num_global)
    exclude, exclude_stride, exclude_center = exclusion_args(exclude, window, lse)
    window, dilation = effective_window(n, window, dilation)
    block_d = max(16, triton.next_power_of_2(dim))
    strides = (q.stride(0), q.stride(1), q.stride(2), n, heads, dim, window, dilation,
               num_global, exclude_stride, exclude_center)
    count = 0 if union is None else union.count
    scales = (count, scale * LOG2E, scale)
    options = dict(CAUSAL=causal, HAS_EXCLUDE=exclude_stride > 0, UNION=union is not None,
                   DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=block_d)
    grad_q, grad_k, grad_v = grads
    lists = (lse, lse) if union is None else (union.glob, union.keys_live)
    _band_dq_kernel[band_grid(batch * heads, n, dilation, "BLOCK_M")](
        q, k, v, out, grad_out, delta if grad_lse is None else grad_lse, lse, delta, grad_q,
        exclude, lse if union is None else union.init_dq, *lists, *strides, *scales,
        HAS_GRAD_LSE=grad_lse is not None, **options)
    inits = (lse, lse, lse, lse) if union is None else (
        union.init_dk, union.init_dv, union.glob, union.rows_live)
    _band_dkdv_kernel[band_grid(batch * heads, n, dilation, "BLOCK_N")](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, exclude, *inits, *strides, *scales,
        **options)
    if num_global > 0:
        global_backward(q, k, v, grad_out, lse, delta, grads, num_global, causal, scale, block_d)
    return grads


COMPILE_CASES = [*band_compile_cases("_band_dq_kernel", 128, 64, HAS_GRAD_LSE=True),
                 *band_compile_cases("_band_dkdv_kernel", 64, 128)]
