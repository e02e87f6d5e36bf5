"""Loads the compiled extension gtkernels._C, which registers the ops with the dispatcher.

A build made against another torch than the one installed would fail deep inside the dynamic
linker (an undefined-symbol trace); this module turns that into an error that says what to do.
"""
import importlib

import torch

_REBUILD = ("Rebuild gtkernels for this torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps -e .")


def _torch_minor(version):
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def load_extension():
    """Imports gtkernels._C after checking it was built for the installed torch."""
    try:
        meta = importlib.import_module("gtkernels._build_meta")
    except ImportError as exc:
        raise ImportError("gtkernels is not built (gtkernels/_build_meta.py is missing). "
                          "Install it with: pip install --no-build-isolation -e .") from exc
    if _torch_minor(meta.TORCH_VERSION) != _torch_minor(torch.__version__):
        raise ImportError(
            f"gtkernels was built against torch {meta.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; the C++ ABI differs between torch releases. "
            + _REBUILD)
    try:
        return importlib.import_module("gtkernels._C")
    except ImportError as exc:
        raise ImportError(f"gtkernels._C failed to load ({exc}). " + _REBUILD) from exc
