"""Timing and memory measurement: CUDA events on the GPU (do_bench median), wall clock on CPU."""
import statistics
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
    times, spent = [], 0.0
    while len(times) < (1 if slow else 3) or (spent < rep_ms * 1e-3 and len(times) < 50):
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
