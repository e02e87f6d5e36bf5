"""Gradient of codebook_search's dist on the GPU, deterministic.

grad_x is a plain per-row sum over the k chosen codes. grad_codebook sums, per code, the
contributions of the (row, rank) pairs that chose it: the pairs are stably sorted by code and
``_segment_sum_kernel`` adds each code's contiguous segment in order (no float atomics).
"""
import torch
import triton
import triton.language as tl

from ..reference.codebook import COSINE_EPS


@triton.jit
def _segment_sum_kernel(values_ptr, starts_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    segment = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(starts_ptr + segment)
    end = tl.load(starts_ptr + segment + 1)
    acc = tl.zeros([BLOCK_D], dtype=values_ptr.dtype.element_ty)
    for p in range(start, end):
        acc += tl.load(values_ptr + p * D + cols, mask=cols < D, other=0.0)
    tl.store(out_ptr + segment * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def segment_sum(values, keys, num_segments, out_dtype):
    """values [P, D] (fp32 or fp64, summed in that dtype), keys int64 [P] in [0, num_segments) -> [num_segments, D] sums."""
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(num_segments + 1, device=keys.device, dtype=keys.dtype)
    starts = torch.searchsorted(sorted_keys, bounds)
    ordered = values[order].contiguous()
    dim = values.shape[1]
    out = torch.empty((num_segments, dim), device=values.device, dtype=out_dtype)
    block_d = min(128, triton.next_power_of_2(dim))
    _segment_sum_kernel[(num_segments, triton.cdiv(dim, block_d))](
        ordered, starts, out, dim, BLOCK_D=block_d)
    return out


def pair_coefficients(x, c, grad, metric):
    """Per pair: d(dist)/dx = ax x + bx c, d(dist)/dc = ac c + bc x, times grad. [P] each."""
    if metric == "l2":
        return 2 * grad, -2 * grad, 2 * grad, -2 * grad
    if metric == "ip":
        zero = torch.zeros_like(grad)
        return zero, -grad, zero, -grad
    x_len, c_len = x.norm(dim=-1), c.norm(dim=-1)
    x_norm, c_norm = x_len.clamp_min(COSINE_EPS), c_len.clamp_min(COSINE_EPS)
    cosine = (x * c).sum(-1) / (x_norm * c_norm)
    cross = -grad / (x_norm * c_norm)
    ax = torch.where(x_len > COSINE_EPS, grad * cosine / x_norm ** 2, 0.0)
    ac = torch.where(c_len > COSINE_EPS, grad * cosine / c_norm ** 2, 0.0)
    return ax, cross, ac, cross


def codebook_search_backward(grad_dist, x3, cb3, idx, metric):
    """grad_dist [N, G, k], x3 [N, G, D], cb3 [G, K, D], idx [N, G, k] -> (grad_x, grad_cb)."""
    num_rows, num_groups, dim = x3.shape
    num_codes, k = cb3.shape[1], idx.shape[2]
    acc_dtype = torch.float64 if x3.dtype == torch.float64 else torch.float32
    group = torch.arange(num_groups, device=x3.device).view(1, num_groups, 1)
    keys = (group * num_codes + idx).reshape(-1)                        # [P]
    xs = x3.to(acc_dtype).unsqueeze(2).expand(-1, -1, k, -1).reshape(-1, dim)
    cs = cb3.to(acc_dtype).reshape(-1, dim)[keys]                       # [P, D]
    ax, bx, ac, bc = pair_coefficients(xs, cs, grad_dist.reshape(-1).to(acc_dtype), metric)
    grad_x = (ax[:, None] * xs + bx[:, None] * cs).view(num_rows, num_groups, k, dim).sum(2)
    contrib = ac[:, None] * cs + bc[:, None] * xs
    grad_cb = segment_sum(contrib, keys, num_groups * num_codes, cb3.dtype)
    return grad_x.to(x3.dtype), grad_cb.view(cb3.shape)
