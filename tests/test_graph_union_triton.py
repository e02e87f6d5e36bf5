"""The Triton band kernels of window_attention with an exclusion mask (the band part of
graph_attention's union) through the interpreter, against the CPU op with the same mask."""
import pytest
import torch

from gtkernels.triton import HAS_TRITON, interpreting

pytestmark = pytest.mark.skipif(not HAS_TRITON or not interpreting(),
                                reason="needs triton with TRITON_INTERPRET=1")

# N, H, D, window, dilation: small (the interpreter is slow)
CASES = [(37, 2, 16, 3, 2), (80, 1, 16, 40, 1), (20, 1, 8, 2, 30), (33, 1, 24, 5, 3)]


def exclusion_mask(n, window):
    exclude = torch.rand(n, 2 * window + 1) < 0.3
    exclude[n // 2] = True  # a query without keys
    return exclude


@pytest.mark.parametrize("n,h,d,window,dilation", CASES)
def test_triton_band_with_exclusion_matches_cpu_op(n, h, d, window, dilation):
    from gtkernels.triton.window_attn import window_attention_forward
    from gtkernels.triton.window_attn_backward import window_attention_backward

    q, k, v = torch.randn(3, 1, n, h, d).unbind(0)
    grad_out, grad_lse = torch.randn(1, n, h, d), torch.randn(1, n, h)
    exclude = exclusion_mask(n, window)
    options = (window, dilation, 0, False, d ** -0.5, exclude)
    want = torch.ops.gtkernels.window_attention(q, k, v, *options)
    want_grads = torch.ops.gtkernels.window_attention_backward(grad_out, grad_lse, q, k, v,
                                                               *want, *options)
    out, lse = window_attention_forward(q, k, v, *options)
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-4)
    grads = window_attention_backward(grad_out, grad_lse, q, k, v, out, lse, *options)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

