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
def _fresh_seed(request):
    """Fresh random inputs every run. A failing test's report shows its seed; GTK_SEED=<seed>
    draws that test's inputs again."""
    if os.environ.get("GTK_SEED"):
        seed = int(os.environ["GTK_SEED"])
        torch.manual_seed(seed)
    else:
        seed = torch.seed()
    request.node.gtk_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and hasattr(item, "gtk_seed"):
        report.sections.append(("seed", f"GTK_SEED={item.gtk_seed}"))


@pytest.fixture
def deterministic_and_poisoned():
    """Deterministic algorithms on: torch.empty then fills with NaN, so unwritten outputs show."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def pytest_runtest_logreport(report):
    """GTK_INSTAFAIL=1 prints each failure as it happens (GPU runs may be cut off by a
    time limit before pytest's summary)."""
    if report.failed and os.environ.get("GTK_INSTAFAIL") == "1":
        text = report.longreprtext
        print(f"\nFAILED {report.nodeid} ({report.when})\n{text[-1500:]}\n", flush=True)
