"""python -m bench.profile --family F --problem P [--impl I ...] [--rows 15]

Where the time of a bench case goes: runs each selected implementation's forward and
forward+backward a few times under torch.profiler and prints its kernels sorted by device
time (one table per implementation and pass). Complements `python -m bench`, which gives the
totals: use this to decide which kernel of an op to work on.
"""
import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.core.registry import load_families
from bench.core.runner import _first, _fwd_bwd

REPEATS = 5


def kernel_table(fn, device, rows):
    """Runs fn a few times (after one warm-up call) and returns the profiler's table of the
    `rows` most expensive operations, sorted by device (or CPU) time."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(REPEATS):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--family", required=True)
    parser.add_argument("--problem", required=True, nargs="+")
    parser.add_argument("--impl", nargs="*", help="implementations (default: ours)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the small problem sizes")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    registry = load_families()
    for prob, impls in registry.cases([args.family], args.problem):
        inputs = prob.make(device, args.quick or device == "cpu")
        for im in impls:
            if (args.impl and im.name not in args.impl) or (not args.impl and not im.ours):
                continue
            built = im.build(inputs)
            forward = built.forward if prob.train_step else built
            print(f"\n### {prob.family}/{prob.name} {im.name}: forward, {REPEATS} calls")
            print(kernel_table(forward, device, args.rows))
            grads = [inputs[g] for g in prob.grads]
            if prob.train_step:
                print(f"\n### {prob.family}/{prob.name} {im.name}: train step, {REPEATS} calls")
                print(kernel_table(built.step, device, args.rows))
            elif im.backward and grads:
                grad_out = torch.randn_like(_first(forward()))
                step = _fwd_bwd(forward, grads, grad_out)
                print(f"\n### {prob.family}/{prob.name} {im.name}: forward+backward, "
                      f"{REPEATS} calls")
                print(kernel_table(step, device, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
