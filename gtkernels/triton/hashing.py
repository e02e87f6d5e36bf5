"""Triton kernels of hashed_lookup's hash: rows k * 2**tau + code and weights of each chunk,
and the weights' backward. The CUDA hashed_lookup is this hash pass, then the weighted
gather-sum of gather_sum.py: each chunk's code is computed once, not once per column tile
and per thread that shares its token."""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, on_input_device
from .gather_sum import gather_sum

WEIGHTING_CODES = {"softmax": 0, "l1_softmax": 1, "none": 2}


@triton.jit
def _multiply(a, b):
    return a * b


@triton.jit
def _load_chunks(x_ptr, c, mask, two_over_t, TAU: tl.constexpr, TAU_P2: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """Chunks c of x as one [BLOCK, TAU_P2] tile (rows contiguous: coalesced, 16-byte loads at
    tau = 8 bf16): values, in_chunk (False on padding), |x| (0 on padding), the code (first
    value = top bit, bit = [x >= 0]) and the product of sigmoid(2 |x| / T) over the chunk."""
    i = tl.arange(0, TAU_P2)
    in_chunk = i[None, :] < TAU
    v = tl.load(x_ptr + c[:, None] * TAU + i[None, :], mask=mask[:, None] & in_chunk,
                other=0.0).to(ACC_DTYPE)
    up = v >= 0
    a = tl.where(up, v, -v)
    sig = tl.where(in_chunk, 1.0 / (1.0 + tl.exp(-two_over_t * a)), 1.0)
    code = tl.sum(tl.where(up & in_chunk, 1 << (TAU - 1 - i[None, :]), 0), axis=1)
    return v, in_chunk, a, code, tl.reduce(sig, 1, _multiply)


@triton.jit
def _code_and_weight(x_ptr, c, mask, two_over_t, TAU: tl.constexpr, TAU_P2: tl.constexpr,
                     WEIGHTING: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Bucket and weight of chunks c: WEIGHTING 0 softmax, 1 l1_softmax, 2 none."""
    _, _, a, code, prod = _load_chunks(x_ptr, c, mask, two_over_t, TAU, TAU_P2, ACC_DTYPE)
    if WEIGHTING == 0:
        weight = prod
    elif WEIGHTING == 1:
        weight = tl.sum(a, axis=1) * prod
    else:
        weight = tl.full(prod.shape, 1.0, ACC_DTYPE)
    return code, weight


@on_input_device
def hashed_lookup(x, tables, bias, tau, weighting, temperature):
    """x [T, K * tau], tables [M, K, 2**tau, d], bias [M, d] or None -> y [M, T, d]: the hash
    pass writes rows and weights [T, K] (8 bytes per chunk), then the gather-sum pass."""
    tables = tables.contiguous()
    M, K, R, d = tables.shape
    out = torch.empty((M, x.shape[0], d), device=x.device, dtype=tables.dtype)
    if out.numel() == 0:
        return out
    rows, weights = hash_weights(x, tau, weighting, temperature)
    return gather_sum(tables, rows, weights if weighting != "none" else None,
                       bias.contiguous() if bias is not None else None, K * R, out)


@triton.jit
def _hash_weights_kernel(x_ptr, rows_ptr, w_ptr, n_codes, K, two_over_t, TAU: tl.constexpr,
                         TAU_P2: tl.constexpr, WEIGHTING: tl.constexpr, ACC_DTYPE: tl.constexpr,
                         BLOCK: tl.constexpr):
    c = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = c < n_codes
    code, w = _code_and_weight(x_ptr, c, mask, two_over_t, TAU, TAU_P2, WEIGHTING, ACC_DTYPE)
    tl.store(rows_ptr + c, ((c % K) * (1 << TAU) + code).to(tl.int32), mask=mask)
    tl.store(w_ptr + c, w, mask=mask)


@on_input_device
def hash_weights(x, tau, weighting, temperature):
    """x [T, K * tau] -> (rows int32 [T, K] = k * 2**tau + code, weights fp32 [T, K])."""
    x = x.contiguous()
    T, K = x.shape[0], x.shape[1] // tau
    w_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = torch.empty((T, K), device=x.device, dtype=torch.int32)
    weights = torch.empty((T, K), device=x.device, dtype=w_dtype)
    if rows.numel() > 0:
        block = 256
        _hash_weights_kernel[(triton.cdiv(T * K, block),)](
            x, rows, weights, T * K, K, 2.0 / temperature, TAU=tau,
            TAU_P2=triton.next_power_of_2(tau), WEIGHTING=WEIGHTING_CODES[weighting],
            ACC_DTYPE=acc_dtype(x.dtype), BLOCK=block)
    return rows, weights


@triton.jit
def _hash_weights_backward_kernel(grad_w_ptr, x_ptr, dx_ptr, n_codes, two_over_t,
                                  TAU: tl.constexpr, TAU_P2: tl.constexpr,
                                  WEIGHTING: tl.constexpr, ACC_DTYPE: tl.constexpr,
                                  BLOCK: tl.constexpr):
    c = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = c < n_codes
    # WEIGHTING 0 (softmax) or 1 (l1_softmax): the launcher zero-fills for "none".
    v, in_chunk, a, _, prod = _load_chunks(x_ptr, c, mask, two_over_t, TAU, TAU_P2, ACC_DTYPE)
    grad_w = tl.load(grad_w_ptr + c, mask=mask, other=0.0).to(ACC_DTYPE)
    sign = tl.where(v >= 0, 1.0, -1.0).to(ACC_DTYPE)  # d|x|/dx: the code's sign, +1 at 0
    e = tl.exp(-two_over_t * a)
    dprod = prod[:, None] * (e / (1.0 + e)) * two_over_t * sign
    if WEIGHTING == 0:
        dw = dprod
    else:
        dw = sign * prod[:, None] + tl.sum(a, axis=1)[:, None] * dprod
    i = tl.arange(0, TAU_P2)
    tl.store(dx_ptr + c[:, None] * TAU + i[None, :],
             (grad_w[:, None] * dw).to(dx_ptr.dtype.element_ty), mask=mask[:, None] & in_chunk)


@on_input_device
def hash_weights_backward(grad_weights, x, tau, weighting, temperature):
    """grad_weights [T, K], x [T, K * tau] -> dx [T, K * tau] (x's dtype)."""
    x = x.contiguous()
    if weighting == "none" or x.numel() == 0:
        return torch.zeros_like(x)
    dx = torch.empty_like(x)
    n_codes = x.numel() // tau
    block = 256
    _hash_weights_backward_kernel[(triton.cdiv(n_codes, block),)](
        grad_weights.contiguous(), x, dx, n_codes, 2.0 / temperature, TAU=tau,
        TAU_P2=triton.next_power_of_2(tau), WEIGHTING=WEIGHTING_CODES[weighting],
        ACC_DTYPE=acc_dtype(x.dtype), BLOCK=block)
    return dx


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_ARG_TYPES = {"rows_ptr": "*i32", "w_ptr": "*fp32", "grad_w_ptr": "*fp32", "two_over_t": "fp32"}
COMPILE_CASES = [
    ("_hash_weights_kernel", dict(TAU=8, TAU_P2=8, WEIGHTING=1, ACC_DTYPE=tl.float32, BLOCK=256),
     _ARG_TYPES),
    ("_hash_weights_backward_kernel", dict(TAU=8, TAU_P2=8, WEIGHTING=0, ACC_DTYPE=tl.float32,
                                           BLOCK=256), _ARG_TYPES),  # mem-base, bf16
    ("_hash_weights_backward_kernel", dict(TAU=5, TAU_P2=8, WEIGHTING=0, ACC_DTYPE=tl.float32,
                                           BLOCK=256), _ARG_TYPES),
    ("_hash_weights_backward_kernel", dict(TAU=12, TAU_P2=16, WEIGHTING=1, ACC_DTYPE=tl.float32,
                                           BLOCK=256), _ARG_TYPES),
    # Integer arguments equal to 1 become constants in the JIT.
    ("_hash_weights_kernel", dict(TAU=1, TAU_P2=1, WEIGHTING=0, ACC_DTYPE=tl.float64, BLOCK=256,
                                  n_codes=1, K=1), dict(_ARG_TYPES, x_ptr="*fp64",
                                                        w_ptr="*fp64")),
]
