"""Global tokens [0, G) of the window-attention backward: they meet every query or key, so
their dq (over all keys) and dk, dv (over all queries) run split over chunks into fp32
partials summed in a fixed order (deterministic, no atomics); and their rows' delta."""
import torch
import triton
import triton.language as tl

from .window_common import (LOG2E, dot_precision, global_blocks, global_compile_case,
                            global_key_tile, global_program, load_rows, split_count)
from .window_attn_backward_tiles import dkdv_tile, dq_tile, load_row_stats


@triton.jit
def _global_query_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, part_dq_ptr,
                            stride_b, stride_n, stride_h, B, N, H, D, num_global, key_end,
                            keys_per_split, num_splits, qk_scale, scale,
                            CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of rows [0, G) from key chunk `split` -> part_dq [S, B, G, H, D] fp32."""
    m0, split, b, h = global_program(num_global, num_splits, H, BLOCK_M)
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    out_base = (b.to(tl.int64) * N * H + h) * D
    cols = tl.arange(0, BLOCK_D)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_global
    q = load_rows(q_ptr + base, offs_m, row_ok, stride_n, cols, D)
    do = load_rows(do_ptr + out_base, offs_m, row_ok, H * D, cols, D)
    lse2, delta = load_row_stats(lse_ptr, delta_ptr, b, h, N, H, offs_m, row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, key_end)
    for start in range(lo, hi, BLOCK_N):
        k, v, valid = global_key_tile(k_ptr + base, v_ptr + base, start, hi, offs_m, stride_n,
                                      cols, D, CAUSAL, BLOCK_N)
        dq = dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, True, DOT_PRECISION)
    rows = ((split.to(tl.int64) * B + b) * num_global + offs_m) * H + h
    tl.store(part_dq_ptr + rows[:, None] * D + cols[None, :], dq * scale,
             mask=row_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _global_key_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, part_dk_ptr,
                            part_dv_ptr, stride_b, stride_n, stride_h, B, N, H, D, num_global,
                            queries_per_split, num_splits, qk_scale, scale,
                            CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of keys [0, G) from query chunk `split` -> part_dk, part_dv [S, B, G, H, D] fp32."""
    k0, split, b, h = global_program(num_global, num_splits, H, BLOCK_N)
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    out_base = (b.to(tl.int64) * N * H + h) * D
    cols = tl.arange(0, BLOCK_D)
    offs_n = k0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < num_global
    k = load_rows(k_ptr + base, offs_n, key_ok, stride_n, cols, D)
    v = load_rows(v_ptr + base, offs_n, key_ok, stride_n, cols, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = split * queries_per_split
    hi = tl.minimum(lo + queries_per_split, N)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_ok = offs_m < hi
        q = load_rows(q_ptr + base, offs_m, q_ok, stride_n, cols, D)
        do = load_rows(do_ptr + out_base, offs_m, q_ok, H * D, cols, D)
        lse2, delta = load_row_stats(lse_ptr, delta_ptr, b, h, N, H, offs_m, q_ok)
        valid_t = q_ok[None, :]
        if CAUSAL:
            valid_t = valid_t & (offs_n[:, None] <= offs_m[None, :])
        dk, dv = dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid_t, qk_scale, True,
                           DOT_PRECISION)
    rows = ((split.to(tl.int64) * B + b) * num_global + offs_n) * H + h
    mask = key_ok[:, None] & (cols < D)[None, :]
    tl.store(part_dk_ptr + rows[:, None] * D + cols[None, :], dk * scale, mask=mask)
    tl.store(part_dv_ptr + rows[:, None] * D + cols[None, :], dv, mask=mask)


def global_row_delta(grad_out, out, grad_lse, delta, num_global):
    """delta = dO . O - dlse of the global rows [0, G) (the band dq kernel does the others)."""
    rows = (grad_out[:, :num_global].float() * out[:, :num_global].float()).sum(-1)
    if grad_lse is not None:
        rows -= grad_lse[:, :num_global]
    delta[:, :num_global] = rows


def global_backward(q, k, v, grad_out, lse, delta, grads, num_global, causal, scale, block_d):
    """Writes rows [0, G) of dq (global queries) and of dk, dv (global keys)."""
    grad_q, grad_k, grad_v = grads
    batch, n, heads, dim = q.shape
    block_m, block_n, stages = global_blocks(num_global, dim)
    common = dict(CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=block_d,
                  num_warps=4, num_stages=stages)
    strides = (q.stride(0), q.stride(1), q.stride(2))
    key_end = num_global if causal else n
    splits, per_split = split_count(key_end, num_global, batch * heads, block_n)
    part_dq = q.new_empty((splits, batch, num_global, heads, dim), dtype=torch.float32)
    grid = (triton.cdiv(num_global, block_m) * splits * batch * heads,)
    _global_query_dq_kernel[grid](q, k, v, grad_out, lse, delta, part_dq, *strides, batch, n,
                                  heads, dim, num_global, key_end, per_split, splits,
                                  scale * LOG2E, scale, BLOCK_M=block_m, BLOCK_N=block_n,
                                  **common)
    grad_q[:, :num_global] = part_dq.sum(0).to(grad_q.dtype)

    # Here a program owns block_m global keys and walks the queries in tiles of block_n.
    splits, per_split = split_count(n, num_global, batch * heads, block_n)
    part_dk = q.new_empty((splits, batch, num_global, heads, dim), dtype=torch.float32)
    part_dv = torch.empty_like(part_dk)
    grid = (triton.cdiv(num_global, block_m) * splits * batch * heads,)
    _global_key_dkdv_kernel[grid](q, k, v, grad_out, lse, delta, part_dk, part_dv, *strides,
                                  batch, n, heads, dim, num_global, per_split, splits,
                                  scale * LOG2E, scale, BLOCK_M=block_n, BLOCK_N=block_m,
                                  **common)
    grad_k[:, :num_global] = part_dk.sum(0).to(grad_k.dtype)
    grad_v[:, :num_global] = part_dv.sum(0).to(grad_v.dtype)


COMPILE_CASES = [global_compile_case("_global_query_dq_kernel"),
                 global_compile_case("_global_key_dkdv_kernel")]
