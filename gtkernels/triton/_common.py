"""Helpers shared by the Triton launchers: accumulator dtype, autotuning, device guard."""
import functools

import torch
import triton
import triton.language as tl

from . import interpreting


def acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def tuned(configs, key, **autotune_options):
    """Autotunes on the GPU; the interpreter gets the launcher's explicit block sizes."""
    def wrap(kernel):
        unknown = set(key) - set(kernel.arg_names)
        assert not unknown, f"autotune keys {unknown} are not arguments of {kernel.__name__}"
        if interpreting():
            return kernel
        return triton.autotune(configs=configs, key=key, **autotune_options)(kernel)
    return wrap


def on_input_device(launcher):
    """Runs a launcher with its first tensor argument's CUDA device current: Triton launches
    on the current device."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)
    return run
