"""Hashed lookup tables (MemoryFormer): sign hashing of input chunks and table gathers."""
import math

import torch

from . import _validate as V
from .triton import HAS_TRITON

MAX_SIGN_HASH_TAU = 30


def sign_hash(x: torch.Tensor, tau: int) -> torch.Tensor:
    """Sign hash of consecutive chunks of tau values.

    Args:
        x: float32 / float16 / bfloat16 / float64 ``[..., K * tau]``, any device.
        tau: bits per code, 1 <= tau <= 30.

    Returns:
        int32 ``[..., K]``: ``codes[..., k] = sum_i [x[..., k*tau + i] >= 0] * 2**(tau-1-i)``,
        the chunk's first element being the top bit. ``-0.0`` counts as non-negative; NaN as
        negative. The hash has no gradient.

    Example::

        x = torch.randn(16, 64)
        codes = gk.sign_hash(x, tau=8)     # int32 [16, 8], values in [0, 256)
    """
    V.check_tensor("x", x, dtypes=V.FLOAT_DTYPES, min_dim=1)
    V.check_int_range("tau", tau, 1, MAX_SIGN_HASH_TAU)
    if x.shape[-1] % tau != 0:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must be divisible by tau ({tau})")
    return torch.ops.gtkernels.sign_hash(x, tau)


@torch.library.register_fake("gtkernels::sign_hash")
def _sign_hash_fake(x, tau):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // tau), dtype=torch.int32)


MAX_LOOKUP_TAU = 12
WEIGHTINGS = ("softmax", "l1_softmax", "none")


def hashed_lookup(x: torch.Tensor, tables: torch.Tensor, *, tau: int, weighting: str = "softmax",
                  temperature: float = 1.0, bias: torch.Tensor = None) -> torch.Tensor:
    """MemoryFormer's memory layer: each chunk of tau inputs picks one row of its own table.

    Args:
        x: float32 / float16 / bfloat16 / float64 ``[..., K * tau]``.
        tables: x's dtype, ``[K, 2**tau, d_out]``, or ``[M, K, 2**tau, d_out]`` for M tables
            that share one hash (MemoryFormer's Q, K and V): the codes and weights are computed
            once per chunk and serve all M tables (one gather pass forward, one sort backward).
        tau: bits per chunk, 1 <= tau <= 12.
        weighting: ``"softmax"``, ``"l1_softmax"`` or ``"none"``.
        temperature: T > 0 of the softmax.
        bias: x's dtype, ``[d_out]`` (``[M, d_out]`` with M tables), or None.

    Returns:
        ``[..., d_out]`` (``[M, ..., d_out]`` with M tables), x's dtype::

            h_k = sum_i [x_{k,i} >= 0] * 2**(tau-1-i)          (= gk.sign_hash(x, tau))
            s_k = prod_i sigmoid(2 |x_{k,i}| / T)               ("softmax")
                = softmax over all b in {-1, 1}**tau of <b, x_k> / T, at the code h_k
            w_k = s_k | ||x_k||_1 * s_k ("l1_softmax") | 1 ("none")
            y   = sum_k w_k * tables[k, h_k] (+ bias)

    Gradients flow to x through the weights only (the hash is piecewise constant), to tables and
    to bias. |x_{k,i}| is differentiated as b_i * x_{k,i} with the code's own sign b_i (+1 at
    x = 0, where [x >= 0] puts the bit): the gradient of the explicit softmax at the selected code.
    The tables' gradient is deterministic: tokens sorted by bucket, each row summed in token
    order, no atomics. Precision: codes, weights and sums in fp32 (fp64 for float64 inputs),
    one rounding to x's dtype at the end.

    Example::

        x = torch.randn(4, 10, 64)                       # K = 8 chunks of tau = 8
        tables = torch.randn(8, 256, 32, requires_grad=True)
        y = gk.hashed_lookup(x, tables, tau=8)          # [4, 10, 32]
    """
    V.check_tensor("x", x, dtypes=V.FLOAT_DTYPES, min_dim=1)
    V.check_tensor("tables", tables, dtypes=V.FLOAT_DTYPES)
    V.check_int_range("tau", tau, 1, MAX_LOOKUP_TAU)
    V.check_choice("weighting", weighting, WEIGHTINGS)
    V.check_positive("temperature", temperature)
    if x.shape[-1] % tau != 0:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must be divisible by tau ({tau})")
    if tables.dim() not in (3, 4):
        raise ValueError("tables must be [K, 2**tau, d_out] or [M, K, 2**tau, d_out], "
                         f"got shape {list(tables.shape)}")
    shared = tables.dim() == 4
    num_chunks, d_out = x.shape[-1] // tau, tables.shape[-1]
    if num_chunks * 2**tau >= 2**31:  # rows k * 2**tau + h are int32 in the kernels
        raise ValueError(f"K * 2**tau must be below 2**31, got K = {num_chunks}, tau = {tau}")
    M = tables.shape[0] if shared else 1
    expected = (M, num_chunks, 2**tau, d_out) if shared else (num_chunks, 2**tau, d_out)
    V.check_shape("tables", tables, expected,
                  "M, K, 2**tau, d_out" if shared else "K, 2**tau, d_out")
    if bias is not None:
        V.check_tensor("bias", bias)
        V.check_shape("bias", bias, (M, d_out) if shared else (d_out,),
                      "M, d_out" if shared else "d_out")
    V.check_same_dtype(x=x, tables=tables, bias=bias)
    V.check_same_device(x=x, tables=tables, bias=bias)
    lead = x.shape[:-1]
    y = torch.ops.gtkernels.hashed_lookup(
        x.reshape(math.prod(lead), x.shape[-1]), tables if shared else tables.unsqueeze(0),
        None if bias is None else bias.reshape(M, d_out), tau, weighting, float(temperature))
    y = y.view(M, *lead, d_out)
    return y if shared else y[0]


def _weights_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("gtkernels::hash_weights")
def _hash_weights_fake(x, tau, weighting, temperature):
    shape = (x.shape[0], x.shape[1] // tau)
    return x.new_empty(shape, dtype=torch.int32), x.new_empty(shape, dtype=_weights_dtype(x))


@torch.library.register_fake("gtkernels::hash_weights_backward")
def _hash_weights_backward_fake(grad_weights, x, tau, weighting, temperature):
    return x.new_empty(x.shape)


@torch.library.register_fake("gtkernels::hashed_lookup")
def _hashed_lookup_fake(x, tables, bias, tau, weighting, temperature):
    return tables.new_empty((tables.shape[0], x.shape[0], tables.shape[3]))


def _hashed_lookup_setup(ctx, inputs, output):
    x, tables, bias, tau, weighting, temperature = inputs
    ctx.save_for_backward(x, tables)
    ctx.hash_args = (tau, weighting, temperature)


def _hashed_lookup_backward(ctx, grad):
    x, tables = ctx.saved_tensors
    tau, weighting, temperature = ctx.hash_args
    M, K, R, d = tables.shape
    need_dx = ctx.needs_input_grad[0] and weighting != "none"
    grad_x = grad_tables = grad_bias = None
    if need_dx or ctx.needs_input_grad[1]:
        # The codes and weights are recomputed (cheap) and serve the M tables together.
        rows, weights = torch.ops.gtkernels.hash_weights(x, tau, weighting, temperature)
        grad_tables, grad_weights = torch.ops.gtkernels.weighted_gather_sum_backward(
            grad, tables.reshape(M, K * R, d), rows, weights if weighting != "none" else None,
            need_dx)
        grad_tables = grad_tables.view(M, K, R, d) if ctx.needs_input_grad[1] else None
        if need_dx:
            grad_x = torch.ops.gtkernels.hash_weights_backward(grad_weights, x, tau, weighting,
                                                               temperature)
    if ctx.needs_input_grad[0] and not need_dx:
        grad_x = torch.zeros_like(x)  # "none": x only picks the rows
    if ctx.needs_input_grad[2]:
        grad_bias = grad.sum(1)
    return grad_x, grad_tables, grad_bias, None, None, None


torch.library.register_autograd("gtkernels::hashed_lookup", _hashed_lookup_backward,
                                setup_context=_hashed_lookup_setup)

if HAS_TRITON:
    from .triton import hashing as _triton_hashing

    for _name in ("hash_weights", "hash_weights_backward", "hashed_lookup"):
        torch.library.register_kernel(f"gtkernels::{_name}", "cuda",
                                      getattr(_triton_hashing, _name))
