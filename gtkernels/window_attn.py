"""Dilated sliding-window attention with global tokens (Longformer / mesh-transformer pattern)."""
import torch

from . import _validate as V
from .triton import HAS_TRITON

ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_OPTION = 2**62


def window_attention(q, k, v, window, dilation=1, *, num_global=0, causal=False, scale=None,
                     return_lse=False):
    """Softmax attention of each query over a dilated window of keys plus global tokens.

    Args:
        q, k, v: ``[N, H, D]`` or ``[B, N, H, D]``, one dtype among float32 / float16 /
            bfloat16 (float64 on CPU), one device. Any strides.
        window: int >= 0. Query i attends keys ``j = i + t * dilation`` for ``|t| <= window``
            (``t <= 0`` if causal) inside ``[0, N)``.
        dilation: int >= 1.
        num_global: int in ``[0, N]``. Tokens ``0 .. num_global-1`` are global both ways: they
            attend every key (every ``j <= i`` if causal) and every query attends them.
        causal: keep only keys ``j <= i``.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scores.

    Returns:
        ``out`` like q (q's dtype): ``out_i = sum_{j in S(i)} softmax_j(scale * q_i . k_j) v_j``
        where S(i) is the set above, each key counted once (a global key inside the window too
        counts once). With return_lse, also ``lse`` ``[..., N, H]``: ``log sum_{j in S(i)}
        exp(scale * q_i . k_j)``, float32 (float64 for float64 inputs).

    Precision: scores, softmax and sums in fp32 (fp64 for float64), the matrix products on
    tensor cores at the input precision on GPU (fp32 inputs: full fp32 products). Keys skipped
    by the dilation cost nothing. The backward is deterministic and also flows through lse.

    Example::

        q, k, v = torch.randn(3, 1000, 8, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
        out = gk.window_attention(q, k, v, window=64, dilation=4, num_global=2)  # [1000, 8, 64]
    """
    _check_inputs(q, k, v, window, dilation, num_global, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    batched = q.dim() == 4
    if not batched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out, lse = torch.ops.gtkernels.window_attention(q, k, v, window, dilation, num_global,
                                                    bool(causal), scale)
    if not batched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _check_inputs(q, k, v, window, dilation, num_global, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, t, dtypes=ATTENTION_DTYPES)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be [N, H, D] or [B, N, H, D], got shape {list(q.shape)}")
    V.check_same_shape(q=q, k=k, v=v)
    V.check_same_dtype(q=q, k=k, v=v)
    V.check_same_device(q=q, k=k, v=v)
    if q.shape[-1] < 1:
        raise ValueError(f"q's head dim D must be >= 1, got shape {list(q.shape)}")
    if q.dtype == torch.float64 and q.device.type != "cpu":
        raise TypeError(f"q: float64 is supported on CPU only, got it on {q.device}")
    V.check_int_range("window", window, 0, MAX_OPTION)
    V.check_int_range("dilation", dilation, 1, MAX_OPTION)
    V.check_int_range("num_global", num_global, 0, q.shape[-3])
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


@torch.library.register_fake("gtkernels::window_attention")
def _window_attention_fake(q, k, v, window, dilation, num_global, causal, scale, exclude=None):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.register_fake("gtkernels::window_attention_backward")
def _window_attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, window, dilation,
                                    num_global, causal, scale, exclude=None):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, window, dilation, num_global, causal, scale, *exclude = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *exclude)
    ctx.options = (window, dilation, num_global, causal, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *exclude = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.gtkernels.window_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, *ctx.options, *exclude)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None


torch.library.register_autograd("gtkernels::window_attention", _backward,
                                setup_context=_setup_context)

if HAS_TRITON:
    from .triton.window_attn import window_attention_forward as _triton_forward
    from .triton.window_attn_backward import window_attention_backward as _triton_backward

    torch.library.register_kernel("gtkernels::window_attention", "cuda", _triton_forward)
    torch.library.register_kernel("gtkernels::window_attention_backward", "cuda",
                                  _triton_backward)
