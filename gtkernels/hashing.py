"""Hashed lookup tables (MemoryFormer): sign hashing of input chunks and table gathers."""
import torch

from . import _validate as V

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
