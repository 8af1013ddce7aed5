"""Do two runs of the workbook agree? Largest difference per notebook, timings ignored.

    .venv/bin/python scripts/compare_runs.py results /tmp/results_run2
"""

from __future__ import annotations

import argparse

from mechunlearn_utils.workbook.results import compare_runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    args = ap.parse_args(argv)
    table = compare_runs(args.run_a, args.run_b)
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
