"""sign_hash: kernels against the reference, registration checks, bad inputs."""
import pytest
import torch

import gtkernels as gk
from gtkernels.reference import hashing as ref
from utils import DEVICE_PARAMS, FLOAT_DTYPES


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
