"""GTK_AUTOTUNE=0: the launchers run the first config that survives pruning, unbenchmarked."""
import importlib

import pytest

from gtkernels.triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


class RecordingKernel:
    """Stands in for a JITFunction: records the grid and the launch arguments."""
    arg_names = ["x_ptr", "N", "BLOCK"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_first_pruned_config_without_benchmarks(monkeypatch):
    import triton

    from gtkernels.triton import _common
    monkeypatch.setenv("GTK_AUTOTUNE", "0")
    common = importlib.reload(_common)
    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s)
               for b, w, s in [(16, 2, 1), (64, 4, 2), (128, 8, 3)]]

    def keep_large(configs, named_args, **kwargs):
        assert named_args["N"] == 1000 and kwargs == {"FLAG": True}
        return [c for c in configs if c.kwargs["BLOCK"] >= 64]

    kernel = RecordingKernel()
    launcher = common.autotune(configs, key=["N"],
                               prune_configs_by={"early_config_prune": keep_large})(kernel)
    assert launcher.fn is kernel  # the compile checks unwrap .fn
    launcher[lambda meta: (triton.cdiv(meta["N"], meta["BLOCK"]),)]("x", 1000, FLAG=True)
    grid, args, kwargs = kernel.calls[0]
    assert grid == (16,) and args == ("x", 1000)
    assert kwargs == {"FLAG": True, "BLOCK": 64, "num_warps": 4, "num_stages": 2}


def test_autotunes_by_default(monkeypatch):
    import triton

    from gtkernels.triton import _common
    monkeypatch.delenv("GTK_AUTOTUNE", raising=False)
    common = importlib.reload(_common)
    from gtkernels.triton.norms import _row_sq_norms_kernel
    tuned = common.autotune([triton.Config({})], key=[])(_row_sq_norms_kernel)
    assert isinstance(tuned, triton.runtime.Autotuner)


def test_first_config_launch_end_to_end(monkeypatch):
    """The codebook scan through the GTK_AUTOTUNE=0 launcher (its first pruned config), on CPU
    tensors through the interpreter: exact against float64."""
    import torch
    import triton.language as tl

    from gtkernels.triton import _common, codebook, interpreting
    if not interpreting():
        pytest.skip("runs the launcher on CPU tensors through the interpreter")
    monkeypatch.setenv("GTK_AUTOTUNE", "0")
    common = importlib.reload(_common)
    tuned = codebook._scan_kernel_tuned
    launcher = common.autotune(tuned.configs, tuned.keys,
                               prune_configs_by={"early_config_prune": tuned.early_config_prune}
                               )(codebook._scan_kernel)
    monkeypatch.setattr(codebook, "_scan_kernel_tuned", launcher)
    monkeypatch.setattr(codebook, "interpreting", lambda: False)
    monkeypatch.setattr(codebook, "dot_dtype", lambda dtype: tl.float32)
    x, c = torch.randn(48, 12), torch.randn(300, 12)
    _, idx = codebook.codebook_search(x[:, None], c[None], 2, "l2")
    expected = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1).topk(2, largest=False)
    assert torch.equal(idx[:, 0], expected.indices)
