"""python -m bench.report_only DIR: the table, speedups and PNGs of DIR/results.json (e.g. after
a run made of one process per problem)."""
import json
import os
import sys

from bench.core import report


def main(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    rows = report.add_ratios(data["results"])
    print(report.summary(rows, data["environment"]))
    report.plot_families(rows, data["environment"], out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
