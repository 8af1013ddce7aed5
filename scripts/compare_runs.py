"""Do two runs of the workbook agree? Largest difference per notebook, timings ignored.

    .venv/bin/python scripts/compare_runs.py results /tmp/results_run2
    .venv/bin/python scripts/compare_runs.py results results-bf16 --tol 0.05   # + keys beyond 0.05
    .venv/bin/python scripts/compare_runs.py results results-bf16 --verdicts   # + 07's verdicts side by side
"""

from __future__ import annotations

import argparse

from mechunlearn_utils.workbook.results import compare_runs, compare_verdicts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--tol", type=float, default=None, help="also count and list keys differing by more")
    ap.add_argument("--verdicts", action="store_true", help="also notebook 07's verdicts of both runs, side by side")
    args = ap.parse_args(argv)
    table = compare_runs(args.run_a, args.run_b, tol=args.tol)
    print(table.drop(columns=["over_tol"], errors="ignore").to_string(index=False))
    if args.tol is not None:
        for row in table.itertuples():
            if row.over_tol:
                print(f"{row.stem}: {row.n_over_tol} beyond {args.tol:g}: {', '.join(row.over_tol)}")
    if args.verdicts:
        v = compare_verdicts(args.run_a, args.run_b, labels=("A", "B"))
        cols = ["id", "task", "measure", "verdict (A)", "verdict (B)", "verdict_ci (A)", "verdict_ci (B)"]
        print(f"\nverdicts: {int(v.changed.sum())} of {len(v)} rows differ (A = {args.run_a}, B = {args.run_b})")
        print(v[v.changed][cols].to_string(index=False) if v.changed.any() else "(none)")
    return table


if __name__ == "__main__":
    main()
