"""The C++ entry points' own checks (csrc/common/checks.h) raise RuntimeError with their
formatted message: numbers, shapes and dtypes are printed without std::ostream (on the H200
machine, messages built through it ended the process instead of raising)."""
import pytest
import torch

import gtkernels  # noqa: F401  (registers torch.ops.gtkernels)

OPS = torch.ops.gtkernels


@pytest.mark.parametrize("call, match", [
    (lambda: OPS.sign_hash(torch.randn(4, 8), 31), r"tau must be in \[1, 30\], got 31"),
    (lambda: OPS.sign_hash(torch.randint(0, 3, (4, 8)), 4), "x_in must be floating, got Long"),
    (lambda: OPS.weighted_gather_sum(torch.randn(10, 4), torch.tensor([[0, 1]]), None),
     "table_in must have 3 dims, got 2"),
    (lambda: OPS.weighted_gather_sum(torch.randn(1, 10, 4), torch.tensor([[0, 12]]), None),
     r"idx entry 1 = 12 is out of range \[0, 10\)"),
    (lambda: OPS.hashed_lookup(torch.randn(2, 8), torch.randn(1, 2, 16, 3), None, 4, "sparse",
                               1.0), "weighting must be 'softmax', 'l1_softmax' or 'none', got 'sparse'"),
])
def test_cpp_check_raises_formatted_message(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
