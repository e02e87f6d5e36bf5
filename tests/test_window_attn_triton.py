"""window_attention's Triton kernels through the interpreter (TRITON_INTERPRET=1) at small
sizes, called through their launchers outside the dispatcher. On a GPU the same kernels are
the op's CUDA implementation, tested through the op by test_window_attn.py's cuda cases.

The interpreter keeps bfloat16 as raw uint16 in tl.dot (triton 3.8), so it runs float32 and
float16 here; bfloat16 runs on the GPU."""
import pytest
import torch

from gtkernels.triton import HAS_TRITON, interpreting
from test_window_attn import case_id, check_against_reference

pytestmark = pytest.mark.skipif(not HAS_TRITON or not interpreting(),
                                reason="needs triton with TRITON_INTERPRET=1")

# (B, N, H, D, window, dilation, num_global, causal), small: the interpreter is slow.
CASES = [
    (1, 37, 2, 16, 3, 1, 0, False),
    (2, 30, 1, 16, 2, 3, 5, False),
    (1, 40, 1, 16, 4, 2, 3, True),
    (1, 20, 1, 16, 1, 30, 0, False),
    (1, 33, 1, 16, 2, 2, 33, False),
    (1, 45, 1, 16, 5, 1, 20, True),
    (1, 64, 1, 24, 20, 1, 0, False),
    (1, 80, 1, 16, 40, 1, 0, False),   # wide window: masked edges + unmasked interior tiles
    (1, 100, 1, 16, 70, 1, 3, True),
    (1, 21, 1, 160, 2, 2, 2, False),   # head dim above 128: the small config
]


class TritonWindowAttention(torch.autograd.Function):
    """The Triton launchers as an autograd function, to reuse the reference checks."""

    @staticmethod
    def forward(ctx, q, k, v, options):
        from gtkernels.triton.window_attn import window_attention_forward

        scale = q.shape[-1] ** -0.5
        out, lse = window_attention_forward(q, k, v, *options, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (*options, scale)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from gtkernels.triton.window_attn_backward import window_attention_backward

        grads = window_attention_backward(grad_out, grad_lse, *ctx.saved_tensors, *ctx.options)
        return (*grads, None)


def triton_attention(window, dilation, num_global, causal):
    return lambda q, k, v: TritonWindowAttention.apply(q, k, v,
                                                       (window, dilation, num_global, causal))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(dtype, case):
    check_against_reference(triton_attention(*case[4:]), case, dtype, "cpu")


def test_triton_global_passes_split_and_combine(monkeypatch):
    """Global queries and keys over several chunks: partial results combined in a fixed order."""
    from gtkernels.triton import window_common

    monkeypatch.setattr(window_common, "MIN_TILES_PER_SPLIT", 1)
    for case in [(1, 61, 1, 16, 2, 2, 3, False), (1, 50, 1, 16, 3, 1, 20, True)]:
        check_against_reference(triton_attention(*case[4:]), case, torch.float32, "cpu")


def test_triton_backward_without_lse_gradient():
    from gtkernels.reference import window_attn as ref
    from gtkernels.triton.window_attn import window_attention_forward
    from gtkernels.triton.window_attn_backward import window_attention_backward

    q, k, v, grad_out = (torch.randn(1, 35, 2, 16) for _ in range(4))
    out, lse = window_attention_forward(q, k, v, 3, 2, 4, False, 0.25)
    grads = window_attention_backward(grad_out, None, q, k, v, out, lse, 3, 2, 4, False, 0.25)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(ref.window_attention(q64, k64, v64, 3, 2, 4, False, 0.25)[0],
                                   (q64, k64, v64), grad_out.double())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
