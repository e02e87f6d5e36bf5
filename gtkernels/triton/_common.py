"""Helpers shared by the Triton launchers: accumulator dtype, autotuning, device guard."""
import functools
import os

import torch
import triton
import triton.language as tl

from . import interpreting


def acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def autotune(configs, key, prune_configs_by=None, **options):
    """triton.autotune; with GTK_AUTOTUNE=0 in the environment, a launcher that runs the first
    config that survives the pruning instead, without benchmarking any (compute-sanitizer runs
    and quick GPU checks: autotuning under the sanitizer costs minutes)."""
    if os.environ.get("GTK_AUTOTUNE", "1") != "0":
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune_configs_by,
                               **options)
    prune = (prune_configs_by or {}).get("early_config_prune")
    return lambda kernel: _FirstConfig(kernel, configs, prune)


class _FirstConfig:
    """kernel[grid](...) with the first (pruned) config's meta-parameters, warps and stages."""

    def __init__(self, kernel, configs, prune):
        self.fn, self.configs, self.prune = kernel, configs, prune

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.fn.arg_names, args))
            config = (self.prune(self.configs, named, **kwargs) if self.prune
                      else self.configs)[0]
            self.best_config = config  # as triton's Autotuner: the config of the last launch
            meta = {**named, **kwargs, **config.kwargs}
            return self.fn[grid(meta) if callable(grid) else grid](
                *args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                num_stages=config.num_stages)
        return launch


def tuned(configs, key, **autotune_options):
    """Autotunes on the GPU; the interpreter gets the launcher's explicit block sizes."""
    def wrap(kernel):
        unknown = set(key) - set(kernel.arg_names)
        assert not unknown, f"autotune keys {unknown} are not arguments of {kernel.__name__}"
        if interpreting():
            return kernel
        return autotune(configs, key, **autotune_options)(kernel)
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
