"""Command line: quick questions to a model, and the workbook runner.

    python -m mechunlearn_utils run --smoke --only 00_setup     # = python -m mechunlearn_utils.workbook.runner ...
    python -m mechunlearn_utils fetch-paper-data                 # the paper's data files, into the cache
    python -m mechunlearn_utils recall --model gemma-3-270m --facts data/athletes.csv
    python -m mechunlearn_utils recall --facts my.csv --format question --dtype float32
    python -m mechunlearn_utils recall --facts my.csv --template "{athlete} is famous for playing"
    python -m mechunlearn_utils recall --facts my.csv --edit results/03_editing_and_unlearning/edits/athletes_to_sport/flu

`recall` prints JSON: n, accuracy (argmax over the candidate sports), mean normalized probability
of the right sport, and accuracy per sport. The CSV needs columns athlete,sport.
"""

from __future__ import annotations

import argparse
import json
import sys

from mechunlearn_utils.data.prompts import SPORT_FORMATS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mechunlearn_utils", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recall", help="how well a model recalls athletes' sports")
    rec.add_argument("--model", default="gemma-3-270m", help="packaged name or HF hub id")
    rec.add_argument("--facts", required=True, help="CSV with columns athlete,sport ('paper' = the paper's)")
    rec.add_argument("--format", default="normal", choices=SPORT_FORMATS)
    rec.add_argument("--template", help="custom prompt containing {athlete} (overrides --format)")
    rec.add_argument("--edit", metavar="PATH",
                     help="an edit saved by notebook 03 (.safetensors, with its .json) applied to the model first")
    rec.add_argument("--device", default="auto")
    rec.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                     help="float32: exact; auto: bf16 where native and measured faster ($MECHUNLEARN_DTYPE overrides)")
    rec.add_argument("--batch-size", type=int, default=32)
    fetch = sub.add_parser("fetch-paper-data", help="download the paper's data files (sha256-checked) into the cache")
    fetch.add_argument("--dest", help="folder to download into (default: the cache; then set MECHUNLEARN_PAPER_DATA)")
    run = sub.add_parser("run", add_help=False, help="run the workbook's notebooks (options: run --help)")
    run.add_argument("runner_args", nargs=argparse.REMAINDER)
    return ap


def recall_command(args) -> dict:
    from mechunlearn_utils.data.datasets import load_athletes
    from mechunlearn_utils.edit.storage import load_edited
    from mechunlearn_utils.evaluate.suite import sports_recall
    from mechunlearn_utils.core.models import load_model

    athletes = load_athletes(args.facts)  # validates the CSV before the (slow) model load
    if args.template is not None and "{athlete}" not in args.template:
        raise ValueError("--template must contain '{athlete}'")
    model = load_model(args.model, args.device, dtype=args.dtype)
    if args.edit:
        load_edited(model, args.edit)
    summary, _ = sports_recall(model, athletes, args.format, args.template, args.batch_size)
    return {"model": args.model, "dtype": str(model.dtype).removeprefix("torch."), "edit": args.edit, "format": "custom" if args.template else args.format,
            **summary}


def main(argv=None) -> int:
    from mechunlearn_utils.data.datasets import DataError
    from mechunlearn_utils.edit.loop import EditError
    from mechunlearn_utils.core.models import ModelLoadError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # everything after `run` belongs to the runner, --help included
        from mechunlearn_utils.workbook import runner

        return runner.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch-paper-data":
            from mechunlearn_utils.data.paper import fetch_paper_data

            fetch_paper_data(args.dest)
            return 0
        result = recall_command(args)
    except (DataError, EditError, ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
