"""Do two runs of the workbook agree? Largest difference per notebook, timings ignored.

    .venv/bin/python scripts/compare_runs.py results /tmp/results_run2
    .venv/bin/python scripts/compare_runs.py results results-bf16 --tol 0.05   # + keys beyond 0.05
"""

from __future__ import annotations

import argparse

from mechunlearn_utils.workbook.results import compare_runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--tol", type=float, default=None, help="also count and list keys differing by more")
    args = ap.parse_args(argv)
    table = compare_runs(args.run_a, args.run_b, tol=args.tol)
    print(table.drop(columns=["over_tol"], errors="ignore").to_string(index=False))
    if args.tol is not None:
        for row in table.itertuples():
            if row.over_tol:
                print(f"{row.stem}: {row.n_over_tol} beyond {args.tol:g}: {', '.join(row.over_tol)}")
    return table


if __name__ == "__main__":
    main()
