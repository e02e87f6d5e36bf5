"""window_attention: CPU and CUDA kernels against the float64 dense-mask reference (forward and
backward through out and lse), registration checks, determinism, bad inputs. The Triton kernels
run through the interpreter at small sizes in test_window_attn_triton.py."""
import pytest
import torch

import gtkernels as gk
from gtkernels.reference import window_attn as ref
from utils import DEVICE_PARAMS, FLOAT_DTYPES, assert_within_tolerance, poison_like

# (B, N, H, D, window, dilation, num_global, causal)
CASES = [
    (1, 37, 2, 16, 3, 1, 0, False),    # odd N, windows cut at both ends
    (2, 50, 2, 24, 2, 3, 5, False),    # B > 1, D not a power of two, dilation, globals
    (1, 40, 1, 32, 4, 2, 3, True),     # causal with globals
    (1, 20, 2, 16, 1, 30, 0, False),   # dilation larger than N: each query sees itself
    (1, 33, 2, 16, 2, 2, 33, False),   # every token global: full attention
    (1, 45, 1, 16, 5, 1, 20, True),    # more globals than the window
    (1, 29, 1, 8, 100, 1, 0, False),   # window larger than N
    (1, 1, 1, 16, 0, 1, 0, False),     # one token, window 0
    (1, 26, 2, 160, 2, 2, 3, False),   # head dim above 128
]
GPU_CASES = [
    (1, 3000, 4, 64, 64, 4, 8, False),
    (2, 1500, 2, 128, 32, 2, 0, True),
    (1, 2500, 2, 64, 256, 2, 3, False),
    (1, 999, 3, 40, 7, 5, 100, True),
    (1, 700, 2, 256, 16, 3, 4, False),
]


def case_id(case):
    b, n, h, d, w, dil, g, causal = case
    return f"B{b}-N{n}-H{h}-D{d}-w{w}-d{dil}-g{g}" + ("-causal" if causal else "")


def attention_and_grads(fn, q, k, v, grad_out, grad_lse):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) with the given output gradients."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    torch.autograd.backward((out, lse), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check_against_reference(fn, case, dtype, device):
    b, n, h, d, window, dilation, num_global, causal = case
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn(b, n, h, d, device=device, dtype=dtype)
    grad_lse = torch.randn(b, n, h, device=device)
    options = (window, dilation, num_global, causal)

    def reference(q, k, v):
        return ref.window_attention(q, k, v, *options)

    results = attention_and_grads(fn, q, k, v, grad_out, grad_lse)
    exact = attention_and_grads(reference, *(t.double() for t in (q, k, v, grad_out, grad_lse)))
    same_precision = attention_and_grads(reference, q, k, v, grad_out, grad_lse)
    for name, got, want, base in zip(["out", "lse", "dq", "dk", "dv"], results, exact,
                                     same_precision):
        assert got.dtype == (dtype if name != "lse" else torch.float32), name
        assert_within_tolerance(got, want, base, name=name)


def gk_attention(window, dilation, num_global, causal):
    def fn(q, k, v):
        return gk.window_attention(q, k, v, window, dilation, num_global=num_global,
                                   causal=causal, return_lse=True)
    return fn


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(device, dtype, case):
    check_against_reference(gk_attention(*case[4:]), case, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_cuda_larger_cases(dtype, case):
    check_against_reference(gk_attention(*case[4:]), case, dtype, "cuda")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_unbatched_and_non_contiguous(device):
    qkv = torch.randn(41, 3, 2, 16, device=device)  # q, k, v interleaved: strided views
    q, k, v = qkv.unbind(1)
    out = gk.window_attention(q, k, v, 3, 2, num_global=2)
    expected, _ = ref.window_attention(q.double(), k.double(), v.double(), 3, 2, 2)
    assert out.shape == (41, 2, 16) and out.is_contiguous()
    assert_within_tolerance(out, expected, ref.window_attention(q, k, v, 3, 2, 2)[0])
    k_t = torch.randn(2, 41, 16, device=device).transpose(0, 1)  # [41, 2, 16], head-major
    out_t = gk.window_attention(q, k_t, v, 3, 2)
    expected_t, _ = ref.window_attention(q.double(), k_t.double(), v.double(), 3, 2)
    assert_within_tolerance(out_t, expected_t, ref.window_attention(q, k_t, v, 3, 2)[0])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_empty_inputs(device):
    for shape in [(0, 2, 16), (2, 0, 3, 16), (1, 5, 0, 16)]:
        q = torch.randn(shape, device=device, requires_grad=True)
        out, lse = gk.window_attention(q, q, q, 2, return_lse=True)
        assert out.shape == q.shape and lse.shape == q.shape[:-1]
        out.sum().backward()
        assert q.grad.shape == q.shape


@pytest.mark.parametrize("options", [(2, 1, 0, False), (1, 2, 2, False), (2, 3, 1, True),
                                     (0, 1, 5, False)])
def test_gradcheck_cpu_float64(options):
    window, dilation, num_global, causal = options
    q, k, v = (torch.randn(1, 7, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return gk.window_attention(q, k, v, window, dilation, num_global=num_global,
                                   causal=causal, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_opcheck(device):
    q, k, v = (torch.randn(2, 19, 2, 16, device=device, requires_grad=True) for _ in range(3))
    args = (q, k, v, 2, 2, 3, False, 0.25)
    torch.library.opcheck(torch.ops.gtkernels.window_attention.default, args)
    out, lse = torch.ops.gtkernels.window_attention(*args)
    grad_out = torch.randn_like(out)
    for grad_lse in (None, torch.randn_like(lse)):
        backward_args = (grad_out, grad_lse, q.detach(), k.detach(), v.detach(), out.detach(),
                         lse.detach(), 2, 2, 3, False, 0.25)
        torch.library.opcheck(torch.ops.gtkernels.window_attention_backward.default,
                              backward_args)


def test_compiles_without_graph_break():
    def step(q, k, v):
        out = gk.window_attention(q * 2.0, k, v, 3, 2, num_global=1, causal=True)
        return (out.float() ** 2).sum()

    q, k, v = (torch.randn(1, 23, 2, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = step(q, k, v)
    expected = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_backward_is_deterministic(device):
    n = 4000 if device == "cuda" else 300
    q, k, v = (torch.randn(1, n, 2, 32, device=device, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, n, 2, 32, device=device)
    first, second = (torch.autograd.grad(gk.window_attention(q, k, v, 8, 3, num_global=4),
                                         (q, k, v), grad_out) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_outputs_fully_written(device):
    """Every row is written (by the band pass or the global pass): poisoned grads stay out."""
    q, k, v = (torch.randn(1, 70, 2, 16, device=device) for _ in range(3))
    out, lse = torch.ops.gtkernels.window_attention(q, k, v, 3, 4, 6, False, 0.25)
    grad_out = poison_like(out).normal_()
    grads = torch.ops.gtkernels.window_attention_backward(grad_out, None, q, k, v, out, lse, 3,
                                                          4, 6, False, 0.25)
    for t in (out, lse, *grads):
        assert torch.isfinite(t).all()


def bad_call(**overrides):
    args = dict(q=torch.randn(10, 2, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16),
                window=2)
    args.update(overrides)
    return lambda: gk.window_attention(**args)


@pytest.mark.parametrize("bad,match", [
    (bad_call(window=-1), r"window must be in \[0,"),
    (bad_call(window=2.5), "window must be an int"),
    (bad_call(dilation=0), r"dilation must be in \[1,"),
    (bad_call(num_global=11), r"num_global must be in \[0, 10\]"),
    (bad_call(num_global=-1), r"num_global must be in \[0, 10\]"),
    (bad_call(k=torch.randn(10, 2, 8)), r"k has shape \[10, 2, 8\] but q has"),
    (bad_call(v=torch.randn(11, 2, 16)), r"v has shape \[11, 2, 16\] but q has"),
    (bad_call(v=torch.randn(10, 2, 16, dtype=torch.bfloat16)), "v has dtype torch.bfloat16"),
    (bad_call(q=torch.randn(10, 16), k=torch.randn(10, 16), v=torch.randn(10, 16)),
     r"q must be \[N, H, D\] or \[B, N, H, D\]"),
    (bad_call(q=torch.arange(10)), "q must have dtype"),
    (bad_call(k=[1.0]), "k must be a torch.Tensor"),
    (bad_call(scale="big"), "scale must be a float"),
])
def test_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
