import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are tested on the CPU through the interpreter; it must be on before
    # any kernel is decorated, that is before gtkernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gtkernels  # noqa: F401  (loads the ops)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; the seed is printed on failure by pytest's -ra summary."""
    seed = torch.seed()
    yield seed


def pytest_runtest_logreport(report):
    """GTK_INSTAFAIL=1 prints each failure as it happens (GPU runs may be cut off by a
    time limit before pytest's summary)."""
    if report.failed and os.environ.get("GTK_INSTAFAIL") == "1":
        text = report.longreprtext
        print(f"\nFAILED {report.nodeid} ({report.when})\n{text[-1500:]}\n", flush=True)
