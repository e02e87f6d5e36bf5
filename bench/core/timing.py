"""Timing and memory measurement: CUDA events on the GPU (do_bench median), wall clock on CPU."""
import shutil
import statistics
import subprocess
import time

import torch


def time_ms(fn, device, warmup_ms=25, rep_ms=100):
    """Median time of fn() in milliseconds on `device` ("cuda" or "cpu")."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                             return_mode="median"))
    start = time.perf_counter()
    fn()  # warm-up (first-call allocation, lazy init)
    slow = time.perf_counter() - start > 0.25  # a slow peer: one timed call is enough
    # At least 5 timed calls otherwise: with 3, the cpu-8k ratio read 2.8x to 4.1x on a shared
    # 2-core machine where 15 interleaved calls of each gave a median of 3.8x.
    times, spent = [], 0.0
    while len(times) < (1 if slow else 5) or (spent < rep_ms * 1e-3 and len(times) < 50):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
    return statistics.median(times)


def peak_extra_bytes(fn, device):
    """Peak device memory allocated by one fn() call beyond what was allocated before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


GPU_STATE_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu",
                    "clocks_throttle_reasons.active")


def gpu_state(device):
    """The GPU's state just after a timed case, as nvidia-smi reads it: {field: value} for
    GPU_STATE_FIELDS (SM and memory clock MHz, power W, temperature C, the active
    clock-throttle reasons bit mask), or None off CUDA or without nvidia-smi. The same kernels
    have timed up to 1.5x apart between processes on the H200; this shows whether the clocks
    moved with them."""
    if device != "cuda" or shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", f"--query-gpu={','.join(GPU_STATE_FIELDS)}",
             "--format=csv,noheader,nounits", "-i", str(torch.cuda.current_device())]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    values = [v.strip() for v in done.stdout.strip().split(",")]
    if done.returncode != 0 or len(values) != len(GPU_STATE_FIELDS):
        return None
    return dict(zip(GPU_STATE_FIELDS, values))
