"""Fixed-size weighted bags of table rows: the gather under hashed lookups and hashed embeddings."""
import torch

from . import _validate as V
from .triton import HAS_TRITON


def weighted_gather_sum(table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor = None,
                        *, check_index: bool = True) -> torch.Tensor:
    """Sum of weighted table rows per bag: ``y[t] = sum_b weights[t, b] * table[idx[t, b]]``.

    Args:
        table: float32 / float16 / bfloat16 / float64 ``[R, d]``, or ``[M, R, d]`` for M tables
            read at the same indices (one index pass, one sort in the backward).
        idx: int32 / int64 ``[T, B]``: B rows per bag, repeats allowed.
        weights: ``[T, B]`` in table's dtype or float32, or None (all ones).
        check_index: check ``0 <= idx < R`` first. On the GPU this reads a flag back to the
            host (one sync); it is skipped while torch.compile traces. The CPU kernel always
            checks. Without it an out-of-range index on the GPU reads or writes out of bounds.

    Returns:
        ``[T, d]`` (``[M, T, d]`` with M tables) in table's dtype; fp32 accumulation (fp64 for
        float64), one rounding at the end.

    Gradients for table and weights. The table's gradient is deterministic: the T * B entries
    are stably sorted by row and each row sums its entries in token order (fp32), written once
    (zeros for rows no bag uses), without atomics. ``grad_weights[t, b] = dy[t] . table[idx]``.

    Example::

        table = torch.randn(1000, 64, requires_grad=True)
        idx = torch.randint(0, 1000, (32, 8))
        y = gk.weighted_gather_sum(table, idx, torch.rand(32, 8))   # [32, 64]
    """
    V.check_tensor("table", table, dtypes=V.FLOAT_DTYPES)
    if table.dim() not in (2, 3):
        raise ValueError(f"table must be [R, d] or [M, R, d], got shape {list(table.shape)}")
    V.check_tensor("idx", idx, dtypes=V.INDEX_DTYPES, dim=2)
    if weights is not None:
        V.check_tensor("weights", weights, dtypes=(table.dtype, torch.float32))
        V.check_shape("weights", weights, idx.shape, "T, B")
    V.check_same_device(table=table, idx=idx, weights=weights)
    if check_index and not torch.compiler.is_compiling():
        V.check_index_range("idx", idx, table.shape[-2])
    shared = table.dim() == 3
    y = torch.ops.gtkernels.weighted_gather_sum(table if shared else table.unsqueeze(0), idx,
                                                weights)
    return y if shared else y[0]


@torch.library.register_fake("gtkernels::weighted_gather_sum")
def _weighted_gather_sum_fake(table, idx, weights):
    return table.new_empty((table.shape[0], idx.shape[0], table.shape[2]))


@torch.library.register_fake("gtkernels::weighted_gather_sum_backward")
def _weighted_gather_sum_backward_fake(grad, table, idx, weights, weights_grad):
    if weights_grad:
        grad_weights = weights.new_empty(idx.shape)
    else:
        acc = torch.float64 if table.dtype == torch.float64 else torch.float32
        grad_weights = table.new_empty((0,), dtype=acc)
    return table.new_empty(table.shape), grad_weights


def _setup(ctx, inputs, output):
    table, idx, weights = inputs
    ctx.save_for_backward(table, idx, weights)


def _backward(ctx, grad):
    table, idx, weights = ctx.saved_tensors
    weights_grad = weights is not None and ctx.needs_input_grad[2]
    grad_table, grad_weights = torch.ops.gtkernels.weighted_gather_sum_backward(
        grad, table, idx, weights, weights_grad)
    return (grad_table if ctx.needs_input_grad[0] else None, None,
            grad_weights if weights_grad else None)


torch.library.register_autograd("gtkernels::weighted_gather_sum", _backward, setup_context=_setup)

if HAS_TRITON:
    from .triton import gather_sum as _triton_gather_sum

    for _name in ("weighted_gather_sum", "weighted_gather_sum_backward"):
        torch.library.register_kernel(f"gtkernels::{_name}", "cuda",
                                      getattr(_triton_gather_sum, _name))
