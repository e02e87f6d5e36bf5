"""Helpers shared by the tests: devices, poisoning, and the tolerance rule of DESIGN.md."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Parametrise device with the gpu marker on cuda, so `-m gpu` selects exactly the GPU cases.
DEVICE_PARAMS = [pytest.param("cpu")] + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape full of NaN (float) or -1 (int): unwritten outputs stand out."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    den = ref.norm().item()
    diff = (x.double() - ref).norm().item()
    return diff / den if den > 0 else diff


def assert_within_tolerance(out, ref64, torch_same_precision, factor=2.0, floor=1e-6, name="out"):
    """FlashAttention's rule: err(out) <= factor * err(torch at out's precision) + floor.

    ref64: the float64 reference; torch_same_precision: the same computation in plain torch
    at the kernel's input precision (its error sets the scale)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref64)
    base = rel_err(torch_same_precision, ref64)
    assert err <= factor * base + floor, f"{name}: rel err {err:.3e} > {factor} x {base:.3e} + {floor}"


def assert_bitwise_repeatable(grads_fn, runs=10):
    """Calls grads_fn() `runs` times; every call must return bitwise-identical tensors."""
    first = grads_fn()
    for _ in range(runs - 1):
        for a, b in zip(first, grads_fn()):
            assert torch.equal(a, b)
