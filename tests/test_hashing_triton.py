"""Triton kernels of the hashing family against the C++ CPU kernels, through the interpreter
(TRITON_INTERPRET=1) at small sizes, or on the GPU when there is one."""
import types

import pytest
import torch

from gtkernels.triton import HAS_TRITON, interpreting
from utils import assert_bitwise_repeatable, rel_err

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (interpreting() or torch.cuda.is_available()),
    reason="needs triton with a GPU or TRITON_INTERPRET=1")

ops = torch.ops.gtkernels
# The interpreter runs 16 x 32 tiles; d = 40 spans two column blocks, tau = 1 and 5 odd chunks.
LOOKUP_CASES = [(9, 3, 3, 40, 1), (5, 2, 1, 7, 2), (17, 1, 5, 32, 1), (0, 2, 2, 4, 1)]


def _device():
    return "cpu" if interpreting() else "cuda"


def _close(got, expected, tol):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert rel_err(got.cpu(), expected.cpu()) <= tol


@pytest.fixture(scope="module")
def kernels():
    """The Triton launchers of both modules under one namespace."""
    from gtkernels.triton import gather_sum, hashing
    return types.SimpleNamespace(
        hashed_lookup=hashing.hashed_lookup, hash_weights=hashing.hash_weights,
        hash_weights_backward=hashing.hash_weights_backward,
        weighted_gather_sum=gather_sum.weighted_gather_sum,
        weighted_gather_sum_backward=gather_sum.weighted_gather_sum_backward)


def _tol(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighting", ["softmax", "l1_softmax", "none"])
@pytest.mark.parametrize("T,K,tau,d,M", LOOKUP_CASES)
def test_hashed_lookup_kernel(kernels, dtype, weighting, T, K, tau, d, M):
    x = torch.randn(T, K * tau, dtype=dtype, device=_device())
    x[torch.rand_like(x, dtype=torch.float32) < 0.1] = 0.0
    tables = torch.randn(M, K, 2**tau, d, dtype=dtype, device=_device())
    bias = torch.randn(M, d, dtype=dtype, device=_device()) if weighting != "none" else None
    got = kernels.hashed_lookup(x, tables, bias, tau, weighting, 0.8)
    expected = ops.hashed_lookup(x.cpu(), tables.cpu(), None if bias is None else bias.cpu(),
                                 tau, weighting, 0.8)
    _close(got, expected, _tol(dtype))


@pytest.mark.parametrize("weighting", ["softmax", "l1_softmax", "none"])
@pytest.mark.parametrize("tau", [1, 4, 7])
def test_hash_weights_kernels(kernels, weighting, tau):
    x = torch.randn(19, 3 * tau, device=_device())
    x[torch.rand_like(x) < 0.1] = 0.0
    rows, weights = kernels.hash_weights(x, tau, weighting, 1.3)
    rows_cpu, weights_cpu = ops.hash_weights(x.cpu(), tau, weighting, 1.3)
    assert torch.equal(rows.cpu(), rows_cpu)
    _close(weights, weights_cpu, 1e-6)
    grad_weights = torch.randn(19, 3, device=_device())
    dx = kernels.hash_weights_backward(grad_weights, x, tau, weighting, 1.3)
    _close(dx, ops.hash_weights_backward(grad_weights.cpu(), x.cpu(), tau, weighting, 1.3), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights_kind", ["table", "float32", None])
@pytest.mark.parametrize("R,d,T,B,M", [(20, 40, 11, 3, 1), (5, 8, 30, 4, 2), (7, 3, 0, 2, 1)])
def test_weighted_gather_sum_kernel(kernels, dtype, weights_kind, R, d, T, B, M):
    table = torch.randn(M, R, d, dtype=dtype, device=_device())
    idx = torch.randint(0, R, (T, B), device=_device(), dtype=torch.int32)
    weights = None if weights_kind is None else torch.randn(
        T, B, device=_device(), dtype=dtype if weights_kind == "table" else torch.float32)
    got = kernels.weighted_gather_sum(table, idx, weights)
    expected = ops.weighted_gather_sum(table.cpu(), idx.cpu(),
                                       None if weights is None else weights.cpu())
    _close(got, expected, _tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights_grad", [True, False])
# d = 300 spans two column blocks (partial weight gradients summed); R = 1 puts every entry in
# one segment; some rows of R = 50 get no entry (their gradient must be written as zeros).
@pytest.mark.parametrize("R,d,T,B,M", [(6, 300, 13, 3, 1), (1, 5, 9, 2, 2), (50, 9, 7, 2, 1)])
def test_weighted_gather_sum_backward_kernel(kernels, dtype, weights_grad, R, d, T, B, M):
    table = torch.randn(M, R, d, dtype=dtype, device=_device())
    idx = torch.randint(0, R, (T, B), device=_device())
    weights = torch.randn(T, B, device=_device(), dtype=dtype)
    grad = torch.randn(M, T, d, dtype=dtype, device=_device())
    got = kernels.weighted_gather_sum_backward(grad, table, idx, weights, weights_grad)
    expected = ops.weighted_gather_sum_backward(grad.cpu(), table.cpu(), idx.cpu(),
                                                weights.cpu(), weights_grad)
    _close(got[0], expected[0], _tol(dtype))
    if weights_grad:
        _close(got[1], expected[1], _tol(dtype))
    else:
        assert got[1].numel() == 0 and expected[1].numel() == 0


def test_weighted_gather_sum_backward_kernel_without_weights(kernels):
    table = torch.randn(1, 12, 10, device=_device())
    idx = torch.randint(0, 12, (8, 3), device=_device())
    grad = torch.randn(1, 8, 10, device=_device())
    got, _ = kernels.weighted_gather_sum_backward(grad, table, idx, None, False)
    expected, _ = ops.weighted_gather_sum_backward(grad.cpu(), table.cpu(), idx.cpu(), None, False)
    _close(got, expected, 1e-6)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [5, 8])
def test_weighted_gather_sum_backward_kernel_skewed_rows(kernels, dtype, B):
    """Rows of very different lengths in one program (a hot row, unused rows), d = 70 ending
    inside a chunk, B odd or a power of two: against float64 autograd, bitwise repeatable."""
    from gtkernels.reference import hashing as ref

    R, d, T = 9, 70, 23
    idx = torch.randint(0, R, (T, B), device=_device())
    idx[torch.rand(T, B, device=_device()) < 0.5] = 4
    idx[idx == 7] = 6
    table = torch.randn(2, R, d, dtype=dtype, device=_device())
    weights = torch.randn(T, B, device=_device())
    grad = torch.randn(2, T, d, dtype=dtype, device=_device())
    got = kernels.weighted_gather_sum_backward(grad, table, idx, weights, True)
    leaves = [table.double().requires_grad_(), weights.double().requires_grad_()]
    expected = torch.autograd.grad(ref.weighted_gather_sum(leaves[0], idx, leaves[1]), leaves,
                                   grad.double())
    assert torch.equal(got[0][:, 7].cpu(), torch.zeros(2, d, dtype=dtype))
    _close(got[0], expected[0].to(dtype), _tol(dtype))
    _close(got[1], expected[1].float(), _tol(dtype))
    assert_bitwise_repeatable(
        lambda: kernels.weighted_gather_sum_backward(grad, table, idx, weights, True), runs=3)


# On a GPU the DEVICE_PARAMS tests of test_hashing.py / test_gather_sum.py cover this path.
only_interpreted = pytest.mark.skipif(not interpreting(),
                                      reason="launchers serve CPU tensors only when interpreted")


@pytest.fixture
def triton_kernels_serve_cpu():
    """Registers the Triton launchers as the ops' CPU kernels while the test runs (the C++
    kernels come back after), so the public functions and their autograd run end to end
    through the launchers as they do on CUDA."""
    from gtkernels.triton import gather_sum, hashing

    lib = torch.library.Library("gtkernels", "IMPL")
    for module, names in [(hashing, ["hashed_lookup", "hash_weights", "hash_weights_backward"]),
                          (gather_sum, ["weighted_gather_sum", "weighted_gather_sum_backward"])]:
        for name in names:
            torch.library.register_kernel(f"gtkernels::{name}", "cpu", getattr(module, name),
                                          lib=lib)
    yield
    lib._destroy()


@only_interpreted
@pytest.mark.usefixtures("triton_kernels_serve_cpu")
@pytest.mark.parametrize("weighting", ["softmax", "l1_softmax", "none"])
@pytest.mark.parametrize("M", [None, 2])
def test_hashed_lookup_end_to_end_through_triton(weighting, M):
    import gtkernels as gk
    from gtkernels.reference import hashing as ref

    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    tables = torch.randn(*(() if M is None else (M,)), 4, 8, 37, dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(*(() if M is None else (M,)), 37, dtype=torch.float64, requires_grad=True)
    y = gk.hashed_lookup(x, tables, tau=3, weighting=weighting, temperature=0.7, bias=bias)
    y_ref = ref.hashed_lookup(x, tables, 3, weighting, 0.7, bias)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, tables, bias), grad_out)
    expected = torch.autograd.grad(y_ref, (x, tables, bias), grad_out, allow_unused=True,
                                   materialize_grads=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@only_interpreted
@pytest.mark.usefixtures("triton_kernels_serve_cpu")
@pytest.mark.parametrize("M", [None, 3])
def test_weighted_gather_sum_end_to_end_through_triton(M):
    import gtkernels as gk
    from gtkernels.reference import hashing as ref

    table = torch.randn(*(() if M is None else (M,)), 30, 300, requires_grad=True)
    idx = torch.randint(0, 30, (11, 4), dtype=torch.int32)
    weights = torch.randn(11, 4, requires_grad=True)
    y = gk.weighted_gather_sum(table, idx, weights)
    y_ref = ref.weighted_gather_sum(table, idx, weights)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, (table, weights), grad_out)
    expected = torch.autograd.grad(y_ref, (table, weights), grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("R", [1, 32768, 40000])  # int16 keys up to 2**15 rows, int32 past
def test_sort_by_row_is_stable_with_row_offsets(R):
    from gtkernels.triton.gather_sum import _sort_by_row

    idx = torch.randint(0, R, (300, 5), device=_device())
    idx[0, 0], idx[-1, -1] = R - 1, 0
    order, offsets = _sort_by_row(idx, R)
    flat = idx.reshape(-1).cpu()
    expected_order = torch.sort(flat, stable=True)[1]
    assert torch.equal(order.cpu(), expected_order)
    counts = torch.bincount(flat, minlength=R)
    assert torch.equal(offsets.cpu(), torch.cat([torch.zeros(1, dtype=torch.int64),
                                                 counts.cumsum(0)]))
