"""python -m bench [--quick | --full] [--family F ...] [--problem P ...] [--out DIR]"""
import argparse
import os
import sys

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small problems (under two minutes on a 2-core CPU)")
    size.add_argument("--full", action="store_true",
                      help="the BENCH.md sizes even without a GPU")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--family", nargs="*", help="only these families")
    parser.add_argument("--problem", nargs="*", help="only these problems")
    parser.add_argument("--impl", nargs="*", help="only these implementations")
    parser.add_argument("--out", default="bench_results", help="folder for JSON and PNGs")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing results.json that this run does not measure")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or (device == "cpu" and not args.full)
    if quick and not args.quick:
        print("no GPU: running the --quick sizes (pass --full for BENCH.md's sizes)")

    from bench.core import report
    from bench.core.registry import load_families
    from bench.core.runner import run_all

    registry = load_families()
    env = report.environment(device, quick)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    earlier = report.merge_rows(json_path, []) if args.merge else []

    def save(rows):  # after every case, so that a run cut short keeps what it measured
        report.write_json(report.add_ratios(report.merge_rows_into(earlier, rows)), env,
                          json_path)

    rows = run_all(registry, device, quick, args.family, args.problem, args.impl, on_row=save)
    rows = report.add_ratios(report.merge_rows_into(earlier, rows))
    report.write_json(rows, env, json_path)
    pngs = report.plot_families(rows, env, args.out)
    print()
    print(report.summary(rows, env))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" + "".join(f", {p}" for p in pngs))
    ours_failed = [r for r in rows if r["ours"] and r["error"] and
                   not r["error"].startswith("unsupported")]
    return 1 if ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())
