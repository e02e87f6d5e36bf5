"""Runs registered bench cases: correctness check, forward and forward+backward timing, peak
memory. One problem's inputs are built once and shared by all its implementations."""
import gc
import time
import traceback

import torch

from .registry import Unsupported
from .timing import gpu_state, peak_extra_bytes, time_ms


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _release(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _clock_note(row):
    state = row.get("gpu_state")
    return f" [SM {state['clocks.sm']} MHz]" if state else ""


def _fwd_bwd(forward, grad_tensors, grad_out):
    def step():
        out = _first(forward())
        torch.autograd.grad(out, grad_tensors, grad_out, allow_unused=True)
    return step


def run_case(problem, impl, inputs, state, device, timing):
    """Measures one implementation on one problem; `state` carries the peer output and grad_out.
    For a train-step problem, "fwd" is the model's forward and "fwd+bwd" one whole step."""
    row = {"family": problem.family, "problem": problem.name, "impl": impl.name,
           "ours": impl.ours, "baseline": impl.baseline, "fwd_ms": None, "fwd_bwd_ms": None, "peak_bytes": None,
           "check": "", "error": None}
    if problem.train_step:
        row["train_step"] = True
    try:
        built = impl.build(inputs)
        forward, step = (built.forward, built.step) if problem.train_step else (built, None)
        out = _first(forward())
        if problem.compare is not None and not impl.baseline:  # a baseline computes other things
            if "reference" not in state:
                state["reference"] = (impl.name, out.detach())
            else:
                ref_name, ref = state["reference"]
                row["check"] = f"{problem.compare(out.detach(), ref)} vs {ref_name}"
        grad_tensors = [inputs[g] for g in problem.grads]
        if step is None and impl.backward and grad_tensors and out.is_floating_point():
            if "grad_out" not in state:
                state["grad_out"] = torch.randn_like(out)
            step = _fwd_bwd(forward, grad_tensors, state["grad_out"])
        del out  # with its autograd graph: a large model's activations
        row["fwd_ms"] = time_ms(forward, device, **timing)
        if step is not None:
            row["fwd_bwd_ms"] = time_ms(step, device, **timing)
        row["gpu_state"] = gpu_state(device)
        row["peak_bytes"] = peak_extra_bytes(step or forward, device)
    except Unsupported as exc:
        row["error"] = f"unsupported: {exc}"
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # a failing peer is a result, not a crash of the run
        if "out of memory" in str(exc).lower():  # e.g. a library's own allocation failing
            row["error"] = "out of memory"
        else:
            first_line = str(exc).splitlines()[0][:120] if str(exc) else ""
            row["error"] = f"{type(exc).__name__}: {first_line}"
            row["trace"] = traceback.format_exc(limit=4)
    built = forward = step = None  # the model, its optimizer state: freed before the next case
    _release(device)
    return row


def run_all(registry, device, quick, families=None, problems=None, impls=None, timing=None,
            log=print, on_row=None):
    """Runs every selected case; returns the list of result rows. `on_row(rows)` is called
    after each case (e.g. to save partial results of a run that may be cut short)."""
    timing = timing or {}
    cases = [(p, [i for i in im if not impls or i.name in impls])
             for p, im in registry.cases(families, problems)]
    total = sum(len(im) for _, im in cases)
    rows, done, start = [], 0, time.time()
    for problem, impl_list in cases:
        if not impl_list:
            continue
        try:
            inputs = problem.make(device, quick)
        except Exception as exc:
            log(f"  {problem.family}/{problem.name}: problem setup failed: {exc}")
            done += len(impl_list)
            continue
        state = {}
        for impl in impl_list:
            done += 1
            log(f"[{done}/{total} {time.time() - start:6.0f}s] {problem.family}/{problem.name} "
                f"{impl.name} ...", end="", flush=True)
            row = run_case(problem, impl, inputs, state, device, timing)
            rows.append(row)
            log(" " + (row["error"] or f"fwd {row['fwd_ms']:.3f} ms"
                       + (f", {'train step' if problem.train_step else 'fwd+bwd'} "
                          f"{row['fwd_bwd_ms']:.3f} ms" if row["fwd_bwd_ms"] else "")
                       + (f"; {row['check']}" if row["check"] else "")
                       + _clock_note(row)))
            if on_row is not None:
                on_row(rows)
        del inputs, state
        _release(device)
    return rows
