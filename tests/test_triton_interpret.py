"""Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1) at small sizes.

Each family's Triton launchers get tested here or in its own test file the same way: the
launcher is called directly on CPU tensors, outside the dispatcher."""
import pytest
import torch

from gtkernels.triton import HAS_TRITON, interpreting
from utils import rel_err

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (interpreting() or torch.cuda.is_available()),
    reason="needs triton with a GPU or TRITON_INTERPRET=1")


def _device():
    return "cpu" if interpreting() else "cuda"


@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (129, 300), (0, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sq_norms(shape, dtype):
    from gtkernels.triton.norms import row_sq_norms

    x = torch.randn(shape, dtype=dtype, device=_device())
    out = row_sq_norms(x)
    expected = x.double().pow(2).sum(1)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5
