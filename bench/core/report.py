"""Bench results: ratios to the best peer, a printed table, JSON and a PNG plot per family."""
import json
import os
import platform
import subprocess
from datetime import datetime, timezone

import torch


def add_ratios(rows):
    """Adds speedup = best peer time / this time, per problem, for fwd and fwd+bwd."""
    for key in ("fwd_ms", "fwd_bwd_ms"):
        best = {}
        for r in rows:
            if not r["ours"] and not r.get("baseline") and r[key]:
                k = (r["family"], r["problem"])
                best[k] = min(best.get(k, float("inf")), r[key])
        for r in rows:
            b = best.get((r["family"], r["problem"]))
            r[key.replace("_ms", "_speedup")] = b / r[key] if b and r[key] else None
    return rows


def _fmt(v, spec):
    """format(v, spec), or a dash of the same width for a missing value."""
    width = int(spec.split(".")[0])
    return format(v, spec) if v is not None else "-".rjust(width)


def table(rows):
    width = max([22] + [len(r["family"] + r["problem"]) + 2 for r in rows])  # family/problem
    head = (f"{'problem':<{width}}{'impl':<28}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MB':>10}"
            f"{'fwd x':>8}{'f+b x':>8}  check / error")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else None
        name = ("* " if r["ours"] else "~ " if r.get("baseline") else "  ") + r["impl"]
        lines.append(f"{r['family'] + '/' + r['problem']:<{width}}{name:<28.28}"
                     f"{_fmt(r['fwd_ms'], '10.3f')}{_fmt(r['fwd_bwd_ms'], '12.3f')}"
                     f"{_fmt(peak, '10.0f')}{_fmt(r.get('fwd_speedup'), '8.2f')}"
                     f"{_fmt(r.get('fwd_bwd_speedup'), '8.2f')}  {r['error'] or r['check']}")
    lines.append("* = gtkernels, ~ = baseline (not a peer); "
                 "'x' = best peer's time / this time (higher is faster)")
    if any(r.get("train_step") for r in rows):
        lines.append("train-step problems: fwd = the model's forward, fwd+bwd = one whole step "
                     "(zero_grad, forward, loss, backward, optimizer)")
    return "\n".join(lines)


def ratio_lines(rows):
    """For each of our rows: its speedup against every other implementation of the problem."""
    lines = []
    for ours in (r for r in rows if r["ours"] and r["fwd_ms"]):
        parts = []
        for other in rows:
            if other is ours or (other["family"], other["problem"]) != (ours["family"], ours["problem"]):
                continue
            if not other["fwd_ms"]:
                continue
            fb = (f" / {other['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x f+b"
                  if other["fwd_bwd_ms"] and ours["fwd_bwd_ms"] else "")
            parts.append(f"{other['impl']}: {other['fwd_ms'] / ours['fwd_ms']:.2f}x fwd{fb}")
        if parts:
            lines.append(f"{ours['problem']} [{ours['impl']}] vs " + "; ".join(parts))
    return "\n".join(lines)


def summary(rows, env):
    """The header line, the table and the per-peer speedups, as printed after a run."""
    return (f"{env['device']} | torch {env['torch']} | triton {env['triton']} | "
            f"commit {env['commit']} | {'quick' if env['quick'] else 'full'} sizes\n"
            f"{table(rows)}\n\nspeedups of gtkernels (other impl's time / ours):\n"
            f"{ratio_lines(rows)}")


def environment(device, quick):
    commit = os.environ.get("GTK_COMMIT")  # set by whoever copies a tree without .git
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=False).stdout.strip() or None
        except OSError:
            commit = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton_version, "commit": commit,
        "quick": quick, "cpu_threads": torch.get_num_threads(),
    }


def write_json(rows, env, path):
    clean = [{k: v for k, v in r.items() if k != "trace"} for r in rows]
    with open(path, "w") as f:
        json.dump({"environment": env, "results": clean}, f, indent=1)


def merge_rows(path, rows):
    """Rows of an earlier results.json that `rows` does not re-measure, then `rows`."""
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        return merge_rows_into(json.load(f)["results"], rows)


def merge_rows_into(old, rows):
    """`old` rows whose (family, problem, impl) is not in `rows`, then `rows`."""
    keys = {(r["family"], r["problem"], r["impl"]) for r in rows}
    return [r for r in old if (r["family"], r["problem"], r["impl"]) not in keys] + rows


def plot_families(rows, env, out_dir):
    """One PNG per family: fwd and fwd+bwd time of each implementation per problem (log)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for family in sorted({r["family"] for r in rows}):
        fam = [r for r in rows if r["family"] == family and r["fwd_ms"]]
        if not fam:
            continue
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(fam) + 1.5))
        labels = [f"{r['problem']} | {r['impl']}" for r in fam]
        y = range(len(fam))
        ax.barh([i + 0.2 for i in y], [r["fwd_ms"] for r in fam], 0.4, label="fwd")
        ax.barh([i - 0.2 for i in y], [r["fwd_bwd_ms"] or 0 for r in fam], 0.4, label="fwd+bwd")
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_title(f"{family} on {env['device']} (torch {env['torch']})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{family}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
