"""Which C++ error paths end the process with a segfault, and after what (CUDA, Triton, OpenMP).

    python3 scripts/diag_throw.py            # one line per case: ok / exit N / SIGNAL
    python3 scripts/diag_throw.py --gdb      # and the C stack of the first crashing case

Each case runs in its own process: a PRE step, then one PROBE.
  PRE   none | cuda (one CUDA op) | triton (gk.weighted_gather_sum on cuda, a Triton kernel)
        | omp (a large CPU gather sum, every at::parallel_for thread started)
  PROBE bt     glibc backtrace() through ctypes: the unwinder walks the whole stack, no throw
        pyerr  a Python error raised inside a custom op: pybind11 throws it through the
               dispatcher's C++ frames, no c10::Error and no backtrace capture
        torch  a TORCH_CHECK of torch itself (view of a wrong size): c10::Error, backtrace
               captured by glibc backtrace(), thrown from libtorch_cpu
        ours   gtkernels' own out-of-range TORCH_CHECK (weighted_gather_sum, check_index=False),
               the test_weighted_gather_sum_bad_inputs case
"""
import ctypes
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PRES = ["none", "cuda", "triton", "omp"]
PROBES = ["bt", "pyerr", "torch", "ours"]


def pre(name):
    import torch
    import gtkernels as gk
    if name == "cuda":
        torch.ones(4, device="cuda").sum().item()
    elif name == "triton":
        table = torch.randn(100, 64, device="cuda")
        idx = torch.randint(0, 100, (32, 4), device="cuda")
        gk.weighted_gather_sum(table, idx).sum().item()
    elif name == "omp":
        gk.weighted_gather_sum(torch.randn(1000, 64), torch.randint(0, 1000, (20000, 8)))


def probe(name):
    import torch
    import gtkernels as gk
    if name == "bt":
        buf = (ctypes.c_void_p * 128)()
        n = ctypes.CDLL(None).backtrace(buf, 128)
        print(f"backtrace() returned {n} frames")
        return
    try:
        if name == "pyerr":
            @torch.library.custom_op("gtk_diag::raises", mutates_args=())
            def raises(x: torch.Tensor) -> torch.Tensor:
                raise ValueError("raised in the op")

            raises(torch.ones(2))
        elif name == "torch":
            torch.ones(6).view(4)
        elif name == "ours":
            gk.weighted_gather_sum(torch.randn(10, 4), torch.tensor([[0, 12]]), check_index=False)
    except (RuntimeError, ValueError) as exc:
        print(f"caught {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return
    raise SystemExit("no error raised")


def env_facts():
    import torch
    import gtkernels as gk
    print("python", sys.version.split()[0], "| torch", torch.__version__,
          "| gtkernels", gk.build_info()["version"], "| threads", torch.get_num_threads(),
          "| cuda", torch.cuda.is_available())
    print("glibc", os.confstr("CS_GNU_LIBC_VERSION"))
    keep = ("gomp", "iomp", "stdc++", "gcc_s", "libc10.so", "libunwind")
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if any(k in line for k in keep)})
    print("loaded:", *libs, sep="\n  ")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        pre(sys.argv[2])
        probe(sys.argv[3])
        return
    env_facts()
    import torch
    pres = PRES if torch.cuda.is_available() else ["none", "omp"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first_crash = None
    for p in pres:
        for q in PROBES:
            cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--case", p, q]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                status = "ok: " + (r.stdout.strip().splitlines() or [""])[-1]
            elif r.returncode < 0:
                status = signal.Signals(-r.returncode).name
                first_crash = first_crash or cmd
            else:
                status = f"exit {r.returncode}: " + (r.stderr.strip().splitlines() or [""])[-1]
            print(f"pre={p:7s} probe={q:6s} {status}", flush=True)
    if first_crash and "--gdb" in sys.argv:
        if shutil.which("gdb") is None:
            print("no gdb on this machine")
            return
        print("--- gdb:", " ".join(first_crash[-3:]), flush=True)
        subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary",
                        "--args", *first_crash], env=env)


if __name__ == "__main__":
    main()
