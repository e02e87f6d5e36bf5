"""The package loads, reports its build, and guards against a torch ABI mismatch."""
import importlib

import pytest
import torch

import gtkernels as gk
from gtkernels import _loader


def test_build_info_reports_versions():
    info = gk.build_info()
    assert info["version"] == gk.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["with_cuda"]:
        assert info["cuda_version"] == torch.version.cuda
        assert info["archs"], "a CUDA build lists its architectures"
    else:
        assert info["cuda_version"] is None


def test_local_version_names_torch():
    local = gk.__version__.split("+")[1]
    torch_tag = "torch" + ".".join(torch.__version__.split(".")[:2])
    assert torch_tag in local


def test_mismatched_torch_gives_clear_error(monkeypatch):
    meta = importlib.import_module("gtkernels._build_meta")
    monkeypatch.setattr(meta, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match="built against torch 1.0.0"):
        _loader.load_extension()


def test_ops_are_registered():
    assert hasattr(torch.ops.gtkernels, "sign_hash")
