"""Codebook search (exact nearest codes) and the soft-code distillation loss (VQGraph)."""
import torch

from . import _validate as V
from .triton import HAS_TRITON

METRICS = ("l2", "ip", "cosine")
MAX_K = 64
MIN_DIM, MAX_DIM = 4, 1024


def codebook_search(x: torch.Tensor, codebook: torch.Tensor, k: int = 1, *, metric: str = "l2",
                    codebook_norms: torch.Tensor = None):
    """The k nearest codes of every row of x, exactly.

    Args:
        x: float32 / bfloat16 / float16 / float64 ``[N, D]``, or ``[N, G, D]`` for a factorized
            codebook (group g of x searches sub-codebook g).
        codebook: same dtype and device, ``[K, D]`` (or ``[G, K, D]``). 4 <= D <= 1024.
        k: number of codes per row, 1 <= k <= min(64, K).
        metric: ``"l2"``: ``dist = ||x - c||^2``; ``"ip"``: ``dist = -<x, c>`` (largest inner
            product first); ``"cosine"``: ``dist = 1 - <x, c> / (max(||x||, 1e-8) max(||c||, 1e-8))``.
        codebook_norms: optional float32 ``[K]`` (or ``[G, K]``) cache of ``||c||^2`` computed in
            fp32 or better (e.g. ``codebook.float().pow(2).sum(-1)``); it only steers the first
            pass, so stale norms cost exactness.

    Returns:
        ``(dist, idx)``: dist float32 (float64 for float64 inputs) ``[N, k]`` (or ``[N, G, k]``)
        ascending, idx int64 of the same shape.

    Precision: exact. ``idx`` are the indices that float64 distances of the given inputs rank
    first (ties to the lowest index), whatever the input dtype: a tensor-core / BLAS pass with
    a proven error bound keeps every code that can still be among the k best, and those are
    ranked in float64. For cosine, float64 gives 1 - <x, c> / (|x| |c|) only to about
    (2 D + 4) * 2**-53: codes nearer than that (a copy of x and a code one fp32 ulp from it)
    tie for float64 too, and either may come first. ``dist`` is the float64 distance rounded
    to float32. ``dist`` is differentiable w.r.t. x and codebook through the chosen codes
    (deterministic gradient).

    Example::

        x, codebook = torch.randn(4096, 64), torch.randn(1024, 64)
        dist, idx = gk.codebook_search(x, codebook, k=4)         # [4096, 4] each
        quantized = codebook[idx[:, 0]]
    """
    V.check_tensor("x", x, dtypes=V.FLOAT_DTYPES)
    V.check_tensor("codebook", codebook, dtypes=V.FLOAT_DTYPES)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, D] or [N, G, D], got shape {list(x.shape)}")
    grouped = x.dim() == 3
    V.check_tensor("codebook", codebook, dim=3 if grouped else 2)
    V.check_same_device(x=x, codebook=codebook, codebook_norms=codebook_norms)
    V.check_same_dtype(x=x, codebook=codebook)
    x3 = x if grouped else x.unsqueeze(1)
    cb3 = codebook if grouped else codebook.unsqueeze(0)
    num_groups, num_codes, dim = cb3.shape
    if grouped:
        V.check_shape("codebook", codebook, (x.shape[1], num_codes, x.shape[2]), "G, K, D")
    else:
        V.check_shape("codebook", codebook, (num_codes, x.shape[1]), "K, D")
    V.check_int_range("D (last dim of x)", dim, MIN_DIM, MAX_DIM)
    if num_codes == 0:
        raise ValueError("codebook must hold at least one code (K >= 1)")
    V.check_int_range("k", k, 1, min(MAX_K, num_codes))
    V.check_choice("metric", metric, METRICS)
    norms = None
    if codebook_norms is not None:
        V.check_tensor("codebook_norms", codebook_norms, dtypes=(torch.float32,))
        expected = (num_groups, num_codes) if grouped else (num_codes,)
        V.check_shape("codebook_norms", codebook_norms, expected, "G, K" if grouped else "K")
        norms = codebook_norms.reshape(num_groups, num_codes)
    dist, idx = torch.ops.gtkernels.codebook_search(x3, cb3, k, metric, norms)
    if not grouped:
        dist, idx = dist.squeeze(1), idx.squeeze(1)
    return dist, idx


@torch.library.register_fake("gtkernels::codebook_search")
def _codebook_search_fake(x, codebook, k, metric, codebook_norms):
    shape = (x.shape[0], x.shape[1], k)
    dist_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(shape, dtype=dist_dtype), x.new_empty(shape, dtype=torch.int64)


def _codebook_search_setup(ctx, inputs, output):
    x, codebook, _, metric, _ = inputs
    ctx.save_for_backward(x, codebook, output[1])
    ctx.metric = metric
    ctx.mark_non_differentiable(output[1])


def _codebook_search_backward(ctx, grad_dist, grad_idx):
    x, codebook, idx = ctx.saved_tensors
    grad_x, grad_codebook = torch.ops.gtkernels.codebook_search_backward(
        grad_dist, x, codebook, idx, ctx.metric)
    return grad_x, grad_codebook, None, None, None


torch.library.register_autograd("gtkernels::codebook_search", _codebook_search_backward,
                                setup_context=_codebook_search_setup)


@torch.library.register_fake("gtkernels::codebook_search_backward")
def _codebook_search_backward_fake(grad_dist, x, codebook, idx, metric):
    return torch.empty_like(x), torch.empty_like(codebook)


def code_distill_loss(student: torch.Tensor, teacher: torch.Tensor, codebook: torch.Tensor, *,
                      temperature: float = 1.0, metric: str = "l2") -> torch.Tensor:
    """VQGraph's soft code assignment distillation, fused: never materialises N x K.

    Args:
        student, teacher: float32 / bfloat16 / float16 / float64 ``[N, D]``, same dtype/device.
        codebook: ``[K, D]``, same dtype and device.
        temperature: T > 0.
        metric: ``"l2"``, ``"ip"`` or ``"cosine"``, the distance d of ``codebook_search``.

    Returns:
        A scalar of the inputs' dtype:
        ``mean_n KL(softmax_j(-d(teacher_n, c_j) / T) || softmax_j(-d(student_n, c_j) / T))``,
        differentiable w.r.t. student, teacher and codebook (deterministic gradients, computed
        only for the inputs that require grad: a frozen teacher's is never computed).

    Precision: logits, logsumexps and sums in fp32 (float64 for float64 inputs); memory
    O(N + K + (N + K) D), plus at most 512 MiB of fp32 partial sums in the GPU backward (more
    only where fewer than 128 programs would remain). ``"cosine"`` normalises the inputs in
    torch and runs ``"ip"``.

    Example::

        s, t, c = torch.randn(512, 64), torch.randn(512, 64), torch.randn(1024, 64)
        loss = gk.code_distill_loss(s, t, c, temperature=0.5)
        loss.backward()
    """
    V.check_tensor("student", student, dtypes=V.FLOAT_DTYPES, dim=2)
    V.check_tensor("teacher", teacher, dtypes=V.FLOAT_DTYPES, dim=2)
    V.check_tensor("codebook", codebook, dtypes=V.FLOAT_DTYPES, dim=2)
    V.check_same_device(student=student, teacher=teacher, codebook=codebook)
    V.check_same_dtype(student=student, teacher=teacher, codebook=codebook)
    V.check_shape("teacher", teacher, student.shape, "N, D")
    V.check_shape("codebook", codebook, (codebook.shape[0], student.shape[1]), "K, D")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code (K >= 1)")
    V.check_choice("metric", metric, METRICS)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if metric == "cosine":
        # softmax(-(1 - cos) / T) = softmax(<x/|x|, c/|c|> / T): "ip" on normalised vectors.
        student, teacher, codebook = (torch.nn.functional.normalize(t, dim=-1, eps=1e-8)
                                      for t in (student, teacher, codebook))
        metric = "ip"
    row_kl, _ = torch.ops.gtkernels.code_distill_loss(student, teacher, codebook,
                                                      float(temperature), metric)
    if row_kl.shape[0] == 0:
        return row_kl.sum().to(student.dtype)
    return row_kl.mean().to(student.dtype)


@torch.library.register_fake("gtkernels::code_distill_loss")
def _code_distill_loss_fake(student, teacher, codebook, temperature, metric):
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    num_rows = student.shape[0]
    return student.new_empty((num_rows,), dtype=dtype), student.new_empty((num_rows, 3), dtype=dtype)


def _distill_setup(ctx, inputs, output):
    student, teacher, codebook, temperature, metric = inputs
    ctx.save_for_backward(student, teacher, codebook, output[1])
    ctx.temperature, ctx.metric = temperature, metric
    ctx.mark_non_differentiable(output[1])


def _distill_backward(ctx, grad_row_kl, grad_stats):
    student, teacher, codebook, stats = ctx.saved_tensors
    needed = list(ctx.needs_input_grad[:3])  # e.g. a frozen teacher: its gradient is skipped
    grads = torch.ops.gtkernels.code_distill_loss_backward(
        grad_row_kl, student, teacher, codebook, stats, ctx.temperature, ctx.metric, needed)
    return (*(g if need else None for g, need in zip(grads, needed)), None, None)


torch.library.register_autograd("gtkernels::code_distill_loss", _distill_backward,
                                setup_context=_distill_setup)


@torch.library.register_fake("gtkernels::code_distill_loss_backward")
def _distill_backward_fake(grad_row_kl, student, teacher, codebook, stats, temperature, metric,
                           output_mask):
    return tuple(torch.empty_like(x) if need else x.new_empty(0)
                 for x, need in zip((student, teacher, codebook), output_mask))


if HAS_TRITON:
    from .triton import code_distill as _triton_distill
    from .triton import codebook as _triton_search
    from .triton import codebook_backward as _triton_search_backward

    torch.library.register_kernel("gtkernels::codebook_search", "cuda",
                                  _triton_search.codebook_search)
    torch.library.register_kernel("gtkernels::codebook_search_backward", "cuda",
                                  _triton_search_backward.codebook_search_backward)
    torch.library.register_kernel("gtkernels::code_distill_loss", "cuda",
                                  _triton_distill.code_distill_loss)
    torch.library.register_kernel("gtkernels::code_distill_loss_backward", "cuda",
                                  _triton_distill.code_distill_loss_backward)
