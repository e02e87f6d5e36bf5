"""weighted_gather_sum: kernels against the float64 reference, gradients, registration checks,
determinism, bad inputs."""
import pytest
import torch

import gtkernels as gk
from gtkernels.reference import hashing as ref
from utils import (DEVICE_PARAMS, FLOAT_DTYPES, assert_bitwise_repeatable, assert_within_tolerance,
                   rel_err)

# (R, d, T, B, M or None for a 2-D table)
GATHER_CASES = [(50, 7, 13, 4, None), (3, 33, 20, 6, None), (1000, 16, 9, 1, None),
                (64, 5, 17, 3, 2), (10, 4, 0, 3, None), (10, 4, 5, 0, None)]


def _gather_inputs(device, dtype, R, d, T, B, M, idx_dtype=torch.int64, weights="table"):
    table = torch.randn((R, d) if M is None else (M, R, d), device=device, dtype=dtype)
    idx = torch.randint(0, R, (T, B), device=device, dtype=idx_dtype)
    w_dtype = dtype if weights == "table" else torch.float32
    w = torch.randn(T, B, device=device, dtype=w_dtype) if weights is not None else None
    return table, idx, w


def _value_and_grads(fn, table, idx, weights, grad_out):
    table = table.detach().requires_grad_()
    leaves = [table]
    if weights is not None:
        weights = weights.detach().requires_grad_()
        leaves.append(weights)
    out = fn(table, idx, weights)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.usefixtures("deterministic_and_poisoned")
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights,idx_dtype", [("table", torch.int64), ("float32", torch.int32),
                                               (None, torch.int64)])
@pytest.mark.parametrize("R,d,T,B,M", GATHER_CASES)
def test_weighted_gather_sum_matches_reference(device, dtype, weights, idx_dtype, R, d, T, B, M):
    table, idx, w = _gather_inputs(device, dtype, R, d, T, B, M, idx_dtype, weights)
    grad_out = torch.randn((T, d) if M is None else (M, T, d), device=device, dtype=dtype)
    got = _value_and_grads(gk.weighted_gather_sum, table, idx, w, grad_out)
    same_precision = _value_and_grads(ref.weighted_gather_sum, table, idx, w, grad_out)
    exact = _value_and_grads(ref.weighted_gather_sum, table.double(), idx,
                             w.double() if w is not None else None, grad_out.double())
    for name, g, s, e in zip(["y", "dtable", "dweights"], got, same_precision, exact):
        expected_dtype = w.dtype if name == "dweights" else dtype
        assert g.dtype == expected_dtype, name
        assert_within_tolerance(g.cpu(), e.cpu(), s.cpu(), name=name)


@pytest.mark.parametrize("M", [None, 2])
def test_weighted_gather_sum_gradcheck(M):
    table, idx, w = _gather_inputs("cpu", torch.float64, 6, 5, 7, 4, M)
    idx[0] = 2  # a row used several times in one bag
    table.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w: gk.weighted_gather_sum(t, idx, w), (table, w))
    assert torch.autograd.gradcheck(lambda t: gk.weighted_gather_sum(t, idx), (table,))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_weighted_gather_sum_non_contiguous(device):
    table = torch.randn(12, 40, device=device).t()            # [40, 12]
    idx = torch.randint(0, 40, (5, 9), device=device).t()     # [9, 5]
    w = torch.randn(5, 9, device=device).t()
    torch.testing.assert_close(gk.weighted_gather_sum(table, idx, w),
                               ref.weighted_gather_sum(table, idx, w))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_weighted_gather_sum_backward_is_deterministic(device):
    # Few rows and many bags: every row is hit by hundreds of entries.
    table, idx, w = _gather_inputs(device, torch.float32, 37, 64, 700, 16, None)
    table.requires_grad_()
    w.requires_grad_()
    grad_out = torch.randn(700, 64, device=device)
    assert_bitwise_repeatable(
        lambda: torch.autograd.grad(gk.weighted_gather_sum(table, idx, w), (table, w), grad_out))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_weighted_gather_sum_opcheck(device):
    table, idx, w = _gather_inputs(device, torch.float32, 20, 6, 9, 3, 2)
    table.requires_grad_()
    w.requires_grad_()
    ops = torch.ops.gtkernels
    torch.library.opcheck(ops.weighted_gather_sum.default, (table, idx, w))
    torch.library.opcheck(ops.weighted_gather_sum.default, (table, idx.int(), None))
    grad = torch.randn(2, 9, 6, device=device)
    for weights_grad in (True, False):
        torch.library.opcheck(ops.weighted_gather_sum_backward.default,
                              (grad, table.detach(), idx, w.detach(), weights_grad))
    torch.library.opcheck(ops.weighted_gather_sum_backward.default,
                          (grad, table.detach(), idx, None, False))


def test_weighted_gather_sum_compiles_without_graph_break():
    def loss(table, idx, w):
        return gk.weighted_gather_sum(table * 2.0, idx, w.sigmoid()).square().sum()

    table, idx, w = _gather_inputs("cpu", torch.float32, 30, 8, 11, 5, None)
    leaves = [table.requires_grad_(), w.requires_grad_()]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(loss(table, idx, w), leaves)
    got = torch.autograd.grad(compiled(table, idx, w), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_weighted_gather_sum_cuda_equals_cpu():
    table, idx, w = _gather_inputs("cuda", torch.bfloat16, 100_000, 128, 4096, 32, None)
    grad_out = torch.randn(4096, 128, device="cuda", dtype=torch.bfloat16)
    on_gpu = _value_and_grads(gk.weighted_gather_sum, table, idx, w, grad_out)
    on_cpu = _value_and_grads(gk.weighted_gather_sum, table.cpu(), idx.cpu(), w.cpu(),
                              grad_out.cpu())
    for name, g, c in zip(["y", "dtable", "dweights"], on_gpu, on_cpu):
        assert rel_err(g.cpu(), c) < 1e-2, name


@pytest.mark.gpu
def test_weighted_gather_sum_hashed_emb_gradients_bitwise_identical_over_10_runs():
    """The acceptance check at BENCH.md's hashed-emb size: 1,000,000 x 128, 65,536 bags of 32."""
    table, idx, w = _gather_inputs("cuda", torch.bfloat16, 1_000_000, 128, 65536, 32, None)
    table.requires_grad_()
    w.requires_grad_()
    grad_out = torch.randn(65536, 128, device="cuda", dtype=torch.bfloat16)
    first = torch.autograd.grad(gk.weighted_gather_sum(table, idx, w), (table, w), grad_out)
    for _ in range(9):
        again = torch.autograd.grad(gk.weighted_gather_sum(table, idx, w), (table, w), grad_out)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def _bad_gather(table_shape=(10, 4), idx=None, weights=None, idx_device="cpu", **kwargs):
    table = torch.randn(table_shape)
    idx = torch.randint(0, 10, (3, 2), device=idx_device) if idx is None else idx
    return lambda: gk.weighted_gather_sum(table, idx, weights, **kwargs)


@pytest.mark.parametrize("bad,error,match", [
    (_bad_gather(idx=torch.tensor([[0, 10]])), IndexError, r"idx holds 10, out of range \[0, 10\)"),
    (_bad_gather(idx=torch.tensor([[-1, 3]])), IndexError, r"idx holds -1, out of range"),
    (_bad_gather(idx=torch.tensor([[0, 12]]), check_index=False), RuntimeError, "out of range"),
    (_bad_gather(idx=torch.tensor([[0.0, 1.0]])), TypeError, "idx must have dtype in"),
    (_bad_gather(idx=torch.tensor([0, 1])), ValueError, "idx must have 2 dims"),
    (_bad_gather(table_shape=(10,)), ValueError, r"table must be \[R, d\] or \[M, R, d\]"),
    (_bad_gather(weights=torch.randn(3, 3)), ValueError, r"weights must be \[T, B\] = \[3, 2\]"),
    (_bad_gather(weights=torch.randn(3, 2, dtype=torch.float16)), TypeError,
     "weights must have dtype"),
    (_bad_gather(idx_device="meta"), ValueError, "idx is on meta"),
])
def test_weighted_gather_sum_bad_inputs(bad, error, match):
    with pytest.raises(error, match=match):
        bad()
