"""MemoryFormer's memory layer as a drop-in for nn.Linear, on gk.hashed_lookup."""
import math

import torch
from torch import nn

from .. import _validate as V
from ..hashing import MAX_LOOKUP_TAU, WEIGHTINGS, hashed_lookup


def mean_squared_hash_weight(tau: int, weighting: str, temperature: float) -> float:
    """E[w_k^2] of one chunk's weight for x ~ N(0, 1) elementwise (see gk.hashed_lookup).

    With u = |z| half-normal and a = E[sigmoid(2u/T)^2], b = E[u sigmoid(2u/T)^2],
    c = E[u^2 sigmoid(2u/T)^2]: "softmax" gives a**tau; "l1_softmax" expands
    (sum_i u_i)^2 prod_i sigmoid(2u_i/T)^2 into tau c a**(tau-1) + tau (tau-1) b^2 a**(tau-2);
    "none" gives 1. The 1-D expectations are trapezoid sums over u in [0, 12]."""
    if weighting == "none":
        return 1.0
    u = torch.linspace(0.0, 12.0, 24001, dtype=torch.float64)
    density = math.sqrt(2 / math.pi) * torch.exp(-u * u / 2)
    squared = torch.sigmoid(2 * u / temperature) ** 2 * density
    a, b, c = (torch.trapezoid(squared * u**p, u).item() for p in range(3))
    if weighting == "softmax":
        return a**tau
    return tau * c * a ** (tau - 1) + tau * (tau - 1) * b * b * a ** (tau - 2)


class MemoryLayer(nn.Module):
    """Drop-in for ``nn.Linear`` built on ``gk.hashed_lookup`` (MemoryFormer).

    The input's features are cut into K = in_features / tau chunks; chunk k's sign pattern picks
    row h_k of its own table and ``y = sum_k w_k * tables[k, h_k] + bias`` (see
    ``gk.hashed_lookup`` for h_k and w_k). Cost per token: K rows of out_features, no matmul.

    Args:
        in_features: divisible by tau.
        out_features: size of each output row.
        tau: bits per chunk (1 <= tau <= 12); each table has 2**tau rows.
        weighting: ``"softmax"``, ``"l1_softmax"`` or ``"none"``.
        bias: learn an additive bias (``[out_features]``, ``[num_projections, out_features]``).
        temperature: T of the softmax weighting.
        num_projections: M >= 1. With M > 1 the layer holds M tables sets that share one hash
            (MemoryFormer's Q, K and V): one ``hashed_lookup`` call with ``[M, K, 2**tau, out]``
            tables; forward returns a tuple of M outputs.

    Shapes: x ``[..., in_features]`` (float dtype of the parameters) -> ``[..., out_features]``
    (or a tuple of M of them).

    Initialisation matches ``nn.Linear``'s output variance for unit-variance inputs (e.g. after
    a LayerNorm): nn.Linear's default weight is U(+-1/sqrt(in)), so Var(y) = 1/3. Here y sums K
    independent zero-mean rows scaled by w_k, Var(y) = K sigma^2 E[w^2], so the tables are
    U(+-sqrt(3 sigma^2)) with sigma^2 = 1 / (3 K E[w^2]) (``mean_squared_hash_weight``). The
    bias is U(+-1/sqrt(in)) as nn.Linear's.

    Example::

        layer = gk.nn.MemoryLayer(512, 256, tau=8)
        y = layer(torch.randn(4, 100, 512))                       # [4, 100, 256]
        q, k, v = gk.nn.MemoryLayer(512, 512, num_projections=3)(x)
    """

    def __init__(self, in_features: int, out_features: int, tau: int = 8,
                 weighting: str = "softmax", bias: bool = True, temperature: float = 1.0,
                 num_projections: int = 1, device=None, dtype=None):
        super().__init__()
        V.check_int_range("tau", tau, 1, MAX_LOOKUP_TAU)
        V.check_choice("weighting", weighting, WEIGHTINGS)
        V.check_positive("temperature", temperature)
        V.check_int_range("num_projections", num_projections, 1, 2**31 - 1)
        V.check_int_range("out_features", out_features, 1, 2**31 - 1)
        if in_features <= 0 or in_features % tau != 0:
            raise ValueError(f"in_features ({in_features}) must be a positive multiple of "
                             f"tau ({tau}): the input is cut into in_features / tau chunks")
        self.in_features, self.out_features = in_features, out_features
        self.tau, self.weighting, self.temperature = tau, weighting, float(temperature)
        self.num_projections = num_projections
        num_chunks = in_features // tau
        shape = (num_chunks, 2**tau, out_features)
        if num_projections > 1:
            shape = (num_projections, *shape)
        factory = {"device": device, "dtype": dtype}
        self.tables = nn.Parameter(torch.empty(shape, **factory))
        bias_shape = (out_features,) if num_projections == 1 else (num_projections, out_features)
        self.bias = nn.Parameter(torch.empty(bias_shape, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        num_chunks = self.in_features // self.tau
        second_moment = mean_squared_hash_weight(self.tau, self.weighting, self.temperature)
        bound = (num_chunks * second_moment) ** -0.5  # sqrt(3 sigma^2), sigma^2 = 1/(3 K E[w^2])
        nn.init.uniform_(self.tables, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -self.in_features**-0.5, self.in_features**-0.5)

    def forward(self, x: torch.Tensor):
        tables, bias = self.tables, self.bias
        if torch.is_autocast_enabled(x.device.type):  # as nn.Linear: compute in autocast's dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x, tables = x.to(dtype), tables.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        y = hashed_lookup(x, tables, tau=self.tau, weighting=self.weighting,
                          temperature=self.temperature, bias=bias)
        return y if self.num_projections == 1 else y.unbind(0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tau={self.tau}, weighting={self.weighting!r}, temperature={self.temperature}, "
                f"num_projections={self.num_projections}, bias={self.bias is not None}")
