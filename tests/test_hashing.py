"""sign_hash and hashed_lookup: kernels against the float64 reference, gradients,
registration checks, determinism, bad inputs."""
import pytest
import torch

import gtkernels as gk
from gtkernels.reference import hashing as ref
from utils import (DEVICE_PARAMS, FLOAT_DTYPES, assert_bitwise_repeatable, assert_within_tolerance,
                   rel_err)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("shape,tau", [((7, 24), 8), ((3, 5, 12), 3), ((1,), 1), ((0, 10), 5),
                                       ((33, 60), 12), ((4, 30), 30)])
def test_sign_hash_matches_reference(device, dtype, shape, tau):
    x = torch.randn(shape, device=device, dtype=dtype)
    x[x.abs() < 0.1] = 0.0  # exercise the ">= 0" bit rule on exact zeros
    codes = gk.sign_hash(x, tau)
    assert codes.dtype == torch.int32
    assert torch.equal(codes.cpu(), ref.sign_hash(x.cpu(), tau))


def test_sign_hash_bit_order_and_signed_zero():
    x = torch.tensor([[1.0, -1.0, -0.0, -2.0]])
    assert gk.sign_hash(x, 4).item() == 0b1010
    assert gk.sign_hash(torch.tensor([[float("nan"), 0.0]]), 2).item() == 0b01


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_sign_hash_non_contiguous(device):
    x = torch.randn(24, 9, device=device).t()  # [9, 24], stride (1, 9)
    assert torch.equal(gk.sign_hash(x, 6).cpu(), ref.sign_hash(x.cpu(), 6))


@pytest.mark.gpu
def test_sign_hash_cuda_equals_cpu():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(gk.sign_hash(x, 8).cpu(), gk.sign_hash(x.cpu(), 8))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_sign_hash_opcheck(device):
    x = torch.randn(5, 16, device=device)
    torch.library.opcheck(torch.ops.gtkernels.sign_hash.default, (x, 4))


def test_sign_hash_compiles_without_graph_break():
    def f(x):
        return gk.sign_hash(x * 2.0, 4) + 1

    x = torch.randn(6, 32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize("bad,match", [
    (lambda: gk.sign_hash(torch.arange(8), 4), "x must have dtype"),
    (lambda: gk.sign_hash(torch.randn(2, 10), 4), r"divisible by tau"),
    (lambda: gk.sign_hash(torch.randn(2, 8), 0), r"tau must be in \[1, 30\]"),
    (lambda: gk.sign_hash(torch.randn(2, 62), 31), r"tau must be in"),
    (lambda: gk.sign_hash([1.0, 2.0], 1), "x must be a torch.Tensor"),
    (lambda: gk.sign_hash(torch.randn(()), 1), "at least 1 dims"),
])
def test_sign_hash_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


# ----------------------------------------------------------------------------- hashed_lookup

WEIGHTINGS = ["softmax", "l1_softmax", "none"]
# (leading shape of x, K, tau, d_out, M or None for 3-D tables, temperature)
LOOKUP_CASES = [((7,), 3, 4, 5, None, 1.0), ((2, 3), 2, 8, 33, None, 0.7),
                ((11,), 4, 1, 16, None, 2.0), ((5,), 1, 12, 3, None, 1.0),
                ((6,), 3, 3, 17, 3, 1.0), ((0,), 2, 2, 4, None, 1.0)]


def _lookup_inputs(device, dtype, lead, K, tau, d, M, with_bias=True):
    x = torch.randn(*lead, K * tau, device=device, dtype=dtype)
    x[torch.rand_like(x, dtype=torch.float32) < 0.05] = 0.0  # exact zeros: the bit rule
    table_shape = (K, 2**tau, d) if M is None else (M, K, 2**tau, d)
    tables = torch.randn(table_shape, device=device, dtype=dtype)
    bias = torch.randn(table_shape[:-3] + (d,), device=device, dtype=dtype) if with_bias else None
    return x, tables, bias


def _value_and_grads(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*inputs)
    used = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, used, grad_out, allow_unused=True, materialize_grads=True)
    return [out.detach()] + list(grads)


@pytest.mark.usefixtures("deterministic_and_poisoned")
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("lead,K,tau,d,M,temperature", LOOKUP_CASES)
def test_hashed_lookup_matches_reference(device, dtype, weighting, lead, K, tau, d, M, temperature):
    x, tables, bias = _lookup_inputs(device, dtype, lead, K, tau, d, M, with_bias=K != 4)

    def ours(x, tables, bias):
        return gk.hashed_lookup(x, tables, tau=tau, weighting=weighting,
                                temperature=temperature, bias=bias)

    def eager(x, tables, bias):
        return ref.hashed_lookup(x, tables, tau, weighting, temperature, bias)

    out_shape = lead + (d,) if M is None else (M,) + lead + (d,)
    grad_out = torch.randn(out_shape, device=device, dtype=dtype)
    got = _value_and_grads(ours, (x, tables, bias), grad_out)
    same_precision = _value_and_grads(eager, (x, tables, bias), grad_out)
    exact = _value_and_grads(eager, [t.double() if t is not None else None
                                     for t in (x, tables, bias)], grad_out.double())
    for name, g, s, e in zip(["y", "dx", "dtables", "dbias"], got, same_precision, exact):
        assert g.dtype == dtype, name
        assert_within_tolerance(g.cpu(), e.cpu(), s.cpu(), name=name)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("M", [None, 2])
def test_hashed_lookup_gradcheck(weighting, M):
    x, tables, bias = _lookup_inputs("cpu", torch.float64, (4,), 2, 3, 5, M)
    x = torch.where(x.abs() < 1e-3, 0.5, x)  # keep finite differences off the sign changes
    inputs = [t.requires_grad_() for t in (x, tables, bias)]

    def fn(x, tables, bias):
        return gk.hashed_lookup(x, tables, tau=3, weighting=weighting, temperature=0.8, bias=bias)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("wanted", ["x", "tables", "bias"])
def test_hashed_lookup_gradient_of_one_input(weighting, wanted):
    x, tables, bias = _lookup_inputs("cpu", torch.float64, (9,), 3, 4, 6, None)
    inputs = {"x": x, "tables": tables, "bias": bias}
    inputs[wanted].requires_grad_()
    grad_out = torch.randn(9, 6, dtype=torch.float64)
    y = gk.hashed_lookup(x, tables, tau=4, weighting=weighting, bias=bias)
    (got,) = torch.autograd.grad(y, inputs[wanted], grad_out)
    y_ref = ref.hashed_lookup(x, tables, 4, weighting, 1.0, bias)
    if y_ref.requires_grad:
        (expected,) = torch.autograd.grad(y_ref, inputs[wanted], grad_out)
    else:  # weighting "none": x only picks the rows
        expected = torch.zeros_like(inputs[wanted])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("tau", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_softmax_weighting_equals_explicit_softmax_over_codes(tau, temperature):
    K, d = 3, 1
    x = torch.randn(6, K * tau, dtype=torch.float64)
    x[0, :tau] = 0.0  # a whole chunk of zeros, and scattered zeros
    x[torch.rand_like(x) < 0.1] = 0.0
    x.requires_grad_()
    # Tables constant along the buckets: y = sum_k c_k * w_k, so dy/dx is the weights' gradient.
    c = torch.randn(K, 1, 1, dtype=torch.float64).expand(K, 2**tau, d).contiguous()
    y = gk.hashed_lookup(x, c, tau=tau, temperature=temperature)[:, 0]
    explicit = (ref.explicit_softmax_weights(x, tau, temperature) * c[:, 0, 0]).sum(-1)
    torch.testing.assert_close(y, explicit, rtol=1e-12, atol=1e-14)
    grad_out = torch.randn_like(y)
    (ours,) = torch.autograd.grad(y, x, grad_out)
    (expected,) = torch.autograd.grad(explicit, x, grad_out)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_hashed_lookup_zero_inputs_pick_the_top_bucket():
    tau, d = 5, 7
    tables = torch.randn(2, 2**tau, d)
    x = torch.zeros(1, 2 * tau)
    x[0, tau:] = -0.0
    y = gk.hashed_lookup(x, tables, tau=tau)
    # Every bit is set ([x >= 0]); every sigmoid is 1/2.
    torch.testing.assert_close(y[0], (tables[0, -1] + tables[1, -1]) / 2**tau)
    assert gk.hashed_lookup(x, tables, tau=tau, weighting="l1_softmax").abs().max() == 0


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_hashed_lookup_non_contiguous(device):
    x = torch.randn(24, 9, device=device).t()           # [9, 24]
    tables = torch.randn(11, 6, 16, device=device).permute(1, 2, 0)        # [6, 16, 11]
    y = gk.hashed_lookup(x, tables, tau=4, weighting="l1_softmax")
    torch.testing.assert_close(y, ref.hashed_lookup(x, tables, 4, "l1_softmax"))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("M", [None, 3])
def test_hashed_lookup_backward_is_deterministic(device, M):
    x, tables, bias = _lookup_inputs(device, torch.float32, (300,), 8, 4, 48, M)
    x.requires_grad_()
    tables.requires_grad_()
    grad_out = torch.randn((300, 48) if M is None else (M, 300, 48), device=device)
    assert_bitwise_repeatable(lambda: torch.autograd.grad(
        gk.hashed_lookup(x, tables, tau=4, bias=bias), (x, tables), grad_out))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_hashed_lookup_opcheck(device):
    x = torch.randn(7, 12, device=device, requires_grad=True)
    tables = torch.randn(2, 3, 16, 5, device=device, requires_grad=True)
    bias = torch.randn(2, 5, device=device, requires_grad=True)
    ops = torch.ops.gtkernels
    for weighting in WEIGHTINGS:
        torch.library.opcheck(ops.hashed_lookup.default, (x, tables, bias, 4, weighting, 0.9))
        torch.library.opcheck(ops.hashed_lookup.default, (x, tables, None, 4, weighting, 1.0))
        torch.library.opcheck(ops.hash_weights.default, (x.detach(), 4, weighting, 0.9))
        torch.library.opcheck(ops.hash_weights_backward.default,
                              (torch.randn(7, 3, device=device), x.detach(), 4, weighting, 0.9))


def test_hashed_lookup_compiles_without_graph_break():
    def loss(x, tables, bias):
        y = gk.hashed_lookup(x * 1.5, tables, tau=4, weighting="l1_softmax", bias=bias)
        return (y * y).sum()

    inputs = [torch.randn(5, 2, 8), torch.randn(2, 16, 6), torch.randn(6)]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in inputs]
    expected = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [None, 3])
def test_hashed_lookup_cuda_equals_cpu(M):
    x, tables, bias = _lookup_inputs("cuda", torch.bfloat16, (2048,), 64, 8, 320, M)
    grad_out = torch.randn((2048, 320) if M is None else (M, 2048, 320), device="cuda",
                           dtype=torch.bfloat16)

    def fn(x, tables, bias):
        return gk.hashed_lookup(x, tables, tau=8, bias=bias)

    on_gpu = _value_and_grads(fn, (x, tables, bias), grad_out)
    on_cpu = _value_and_grads(fn, [t.cpu() for t in (x, tables, bias)], grad_out.cpu())
    for name, g, c in zip(["y", "dx", "dtables", "dbias"], on_gpu, on_cpu):
        assert rel_err(g.cpu(), c) < 1e-2, name


@pytest.mark.gpu
def test_hashed_lookup_mem_base_gradients_bitwise_identical_over_10_runs():
    """The acceptance check at BENCH.md's mem-base size: T=16,384, d=1024, tau=8, bf16."""
    x, tables, _ = _lookup_inputs("cuda", torch.bfloat16, (16384,), 128, 8, 1024, None,
                                  with_bias=False)
    x.requires_grad_()
    tables.requires_grad_()
    grad_out = torch.randn(16384, 1024, device="cuda", dtype=torch.bfloat16)
    first = torch.autograd.grad(gk.hashed_lookup(x, tables, tau=8), (x, tables), grad_out)
    for _ in range(9):
        again = torch.autograd.grad(gk.hashed_lookup(x, tables, tau=8), (x, tables), grad_out)
        assert torch.equal(again[1], first[1]) and torch.equal(again[0], first[0])


def _bad_lookup(x_shape=(4, 16), table_shape=(4, 16, 8), tau=4, x_dtype=torch.float32,
                table_dtype=torch.float32, table_device="cpu", **kwargs):
    x = torch.randn(x_shape, dtype=x_dtype) if x_dtype.is_floating_point else \
        torch.zeros(x_shape, dtype=x_dtype)
    tables = torch.randn(table_shape, dtype=table_dtype, device=table_device)
    return lambda: gk.hashed_lookup(x, tables, tau=tau, **kwargs)


@pytest.mark.parametrize("bad,error,match", [
    (_bad_lookup(x_shape=(4, 18)), ValueError, r"x's last dim \(18\) must be divisible by tau"),
    (_bad_lookup(table_shape=(4, 8, 8)), ValueError,
     r"tables must be \[K, 2\*\*tau, d_out\] = \[4, 16, 8\]"),
    (_bad_lookup(table_shape=(3, 16, 8)), ValueError, r"tables must be \[K, 2\*\*tau"),
    (_bad_lookup(table_shape=(2, 5, 16, 8)), ValueError,
     r"tables must be \[M, K, 2\*\*tau, d_out\]"),
    (_bad_lookup(table_shape=(16, 8)), ValueError, r"tables must be \[K, 2\*\*tau, d_out\] or"),
    (_bad_lookup(table_dtype=torch.bfloat16), TypeError, "tables has dtype"),
    (_bad_lookup(x_dtype=torch.int64), TypeError, "x must have dtype"),
    (_bad_lookup(table_device="meta"), ValueError, "tables is on meta"),
    (_bad_lookup(tau=0), ValueError, r"tau must be in \[1, 12\]"),
    (_bad_lookup(x_shape=(4, 13), table_shape=(1, 8192, 8), tau=13), ValueError, "tau must be in"),
    (_bad_lookup(weighting="l2"), ValueError, "weighting must be one of"),
    (_bad_lookup(x_shape=(1, 12 * 2**19), tau=12), ValueError, r"K \* 2\*\*tau must be below"),
    (_bad_lookup(temperature=0.0), ValueError, "temperature must be positive"),
    (_bad_lookup(bias=torch.randn(7)), ValueError, r"bias must be \[d_out\] = \[8\]"),
])
def test_hashed_lookup_bad_inputs(bad, error, match):
    with pytest.raises(error, match=match):
        bad()
