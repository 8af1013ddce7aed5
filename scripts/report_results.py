"""A results folder as markdown tables: editing per task, verdicts, attacks, probes, masking, times.

    .venv/bin/python scripts/report_results.py                 # <repo>/results
    .venv/bin/python scripts/report_results.py /path/to/results > report.md
    .venv/bin/python scripts/report_results.py /path/to/results --readme README.md --full docs/results.md

Everything is read from the metrics.json files (and 07's verdicts.csv) that `make workbook`
writes; the README's results tables are made with it, so no number there is typed by hand.
`--readme` writes the verdicts and the run table between the README's two `report_results`
marker lines (the block is replaced whole; nothing outside it changes); `--full` the whole report
to a file of its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mechunlearn_utils.workbook.results import metrics_long
from mechunlearn_utils.workbook.runner import notebook_stems

EDIT_COLUMNS = {
    "sports": ["forget.normal.p_true", "forget.question.p_true", "forget.mcq.p_true", "forget.normal.p_target",
               "maintain.normal.p_true", "maintain.question.p_true", "side.lm_loss", "side.unrelated_acc", "lr",
               "train.seconds"],
    "counterfact": ["forget.prompt.p_true", "forget.paraphrase.p_true", "forget.mcq.p_true", "forget.prompt.p_target",
                    "neighborhood.p_true", "maintain.prompt.p_true", "side.lm_loss", "side.unrelated_acc", "lr",
                    "train.seconds"],
}
ATTACK_MEASURES = ["edit.heldout_p_true", "relearn10.normal.p_true", "relearn20.normal.p_true",
                   "relearn_lora_splits.heldout_mean", "soft_prompt.forget_p_true"]
VERDICT_COLUMNS = ["claim", "task", "measure", "verdict", "numbers", "paper", "verdict_ci", "ci (rival - flu)",
                   "ci source"]
BEGIN, END = "<!-- report_results: begin", "<!-- report_results: end -->"
SECTIONS = ("localizations", "depth", "edits", "verdicts", "attacks", "relearning", "probes", "masking", "runs")
README_SECTIONS = ("verdicts", "runs")  # the README's block; the whole report goes to --full
MASK_FIELDS = ["n_weights", "smallest_n", "gen_forget_at_smallest_n", "maintain_drop_at_smallest_n"]
DEPTH_MEASURES = ["lr", "took", "forget_normal", "target_normal", "forget_question", "forget_para1", "forget_fr",
                  "forget_de", "forget_es", "maintain", "lm_loss_delta", "relearn_heldout_before", "relearn_heldout",
                  "relearn_train"]


def localization_table(m: dict) -> pd.DataFrame:
    """02: the layers each localization trains (MLP / attention) and its parameter count, per task."""
    rows = {}
    for key in m:
        if key.endswith(".mlp_layers"):
            task, method = key.split(".")[:2]
            rows[(task, method)] = {"MLP layers": ", ".join(map(str, m[key])) or "-",
                                    "attention layers": ", ".join(map(str, m.get(f"{task}.{method}.attn_layers", [])))
                                    or "-", "weights": m.get(f"{task}.{method}.n_params")}
    return pd.DataFrame(rows).T.rename_axis(["task", "method"]) if rows else pd.DataFrame()


def depth_table(m: dict) -> pd.DataFrame:
    """02b: one row per window (first layer), the sweep's measures; the unedited model first."""
    rows = {"base": {k: m.get(f"base.{k}") for k in DEPTH_MEASURES}}
    for s in m.get("window_starts", []):
        rows[f"MLPs {s}-{s + m['k'] - 1}"] = {k: m.get(f"window.{s}.{k}") for k in DEPTH_MEASURES}
    return pd.DataFrame(rows).T if len(rows) > 1 else pd.DataFrame()


def relearn_table(m: dict) -> pd.DataFrame:
    """05: per (task, method, attack) the forget p(true) at each evaluated relearning step, of the
    held-out athletes and of the half the attack trained on ("held-out / trained")."""
    rows = {}
    for key, held in m.items():
        if not key.endswith(".forget_p_true_by_step"):
            continue
        prefix = key[: -len(".forget_p_true_by_step")]
        steps, trained = m.get(f"{prefix}.steps", []), m.get(f"{prefix}.train_p_true_by_step", [])
        if len(steps) == len(held) == len(trained):
            rows[tuple(prefix.split(".", 2))] = {f"step {s}": f"{h:.3f} / {t:.3f}" for s, h, t in zip(steps, held, trained)}
    return pd.DataFrame(rows).T.rename_axis(["task", "method", "attack"]) if rows else pd.DataFrame()


def run_table(results: Path) -> pd.DataFrame:
    """Per notebook: seconds, the dtype and torch threads it ran with, the code (`git_commit`) and
    the CPU (`host`, "-" in runs older than its recording)."""
    rows = {}
    for stem in notebook_stems():
        m = _metrics(results, stem)
        if m.get("seconds_total") is not None:
            rows[stem] = {"seconds": round(m["seconds_total"]), "dtype": m.get("dtype", "-"),
                          "threads": m.get("torch_threads", "-"), "commit": m.get("git_commit", "-"),
                          "host": m.get("host", "-")}
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).T
    frame.loc["total"] = {**dict.fromkeys(frame.columns, ""), "seconds": int(frame.seconds.sum())}
    return frame


def _metrics(results: Path, stem: str) -> dict:
    path = results / stem / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _table(frame: pd.DataFrame, title: str, **kw) -> str:
    if isinstance(frame.index, pd.MultiIndex):  # one column per level, not tuples
        frame, kw = frame.reset_index(), {**kw, "index": False}
    return f"\n### {title}\n\n{frame.to_markdown(floatfmt='.4g', **kw)}\n" if len(frame) else ""


def report(results, only: tuple[str, ...] | None = None) -> str:
    """The markdown report; `only`: the sections to keep ("localizations", "depth", "edits", "verdicts",
    "attacks", "relearning", "probes", "masking", "runs"), all by default."""
    results = Path(results)
    sec: dict[str, list[str]] = {}
    sec["localizations"] = [_table(localization_table(_metrics(results, "02_localization")), "02 localizations")]
    depth = _metrics(results, "02b_depth_sweep")
    contrast = pd.DataFrame({m: {"low": depth.get(f"contrast.{m}.ci_low"), "high": depth.get(f"contrast.{m}.ci_high")}
                             for m in ("unseen_mean", "relearn_heldout") if f"contrast.{m}.ci_low" in depth}).T
    sec["depth"] = [_table(depth_table(depth), "02b depth sweep"),
                    _table(contrast, "02b contrast: extraction minus lookup windows, 95% bootstrap interval over "
                                     "the athletes (> 0: the lookup edit generalized / held better)")]
    edits = metrics_long(_metrics(results, "03_editing_and_unlearning"))
    sec["edits"] = []
    for task in edits.task.unique():
        wide = edits[edits.task == task].pivot_table(index="method", columns="measure", values="value")
        cols = [c for c in EDIT_COLUMNS["counterfact" if task == "counterfact" else "sports"] if c in wide]
        sec["edits"].append(_table(wide[cols], f"03 editing: {task}"))
    verdicts = results / "07_results" / "verdicts.csv"
    if verdicts.exists():
        v = pd.read_csv(verdicts)
        v = v[[c for c in VERDICT_COLUMNS if c in v]].fillna("")
        sec["verdicts"] = [_table(v, "07 verdicts (ours; the paper's numbers for the same measure; the 95% "
                                     "bootstrap interval over facts of rival - FLU, > 0 = the paper's side)", index=False)]
    attacks = metrics_long(_metrics(results, "05_attacks"))
    if len(attacks):
        a = attacks[attacks.measure.isin(ATTACK_MEASURES)]
        sec["attacks"] = [_table(a.pivot_table(index=["task", "method"], columns="measure", values="value"),
                                 "05 attacks (held-out forget p(true))")]
    sec["relearning"] = [_table(relearn_table(_metrics(results, "05_attacks")),
                                "05 relearning: forget p(true) held-out / trained half, by step")]
    probes = metrics_long(_metrics(results, "04_probing_latent_knowledge"))
    if len(probes):
        p = probes[probes.measure.str.endswith(".mid") & ~probes.measure.str.contains("resid")]
        sec["probes"] = [_table(p.pivot_table(index=["task", "method"], columns="measure", values="value"),
                                "04 probes at the middle layer (paper.*: probes fit on each edited model's "
                                "maintain athletes, final token; the others: base-model probes)")]
    masks = _metrics(results, "06_weight_masking")
    if masks:
        m = pd.DataFrame({k: {f: masks.get(f"{k}.{f}") for f in MASK_FIELDS} for k in masks.get("methods", [])}).T
        sec["masking"] = [_table(m, "06 masking")]
    sec["runs"] = [_table(run_table(results), "seconds per notebook (seconds_total), dtype, threads, code, host")]
    unknown = set(only or ()) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown report sections {sorted(unknown)}; choose from {SECTIONS}")
    return "\n".join([f"# Results in {results}"] + [t for name in SECTIONS if only is None or name in only
                                                     for t in sec.get(name, [])])


def into_readme(readme: Path, text: str) -> str:
    """`readme`'s text with the block between its `report_results` markers replaced by `text`."""
    doc = readme.read_text()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise SystemExit(f"{readme} needs one line starting {BEGIN!r} and one {END!r} after it")
    head, rest = doc.split(BEGIN, 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(END, 1)
    body = "\n".join(line for line in text.splitlines() if not line.startswith("# Results in "))
    body = body.replace("\n### ", "\n#### ")
    return f"{head}{BEGIN}{marker_line}\n{body.strip()}\n{END}{tail}"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--readme", help=f"write the sections {README_SECTIONS} into this README between its "
                                     "report_results markers")
    ap.add_argument("--full", help="write the whole report to this markdown file (e.g. docs/results.md)")
    args = ap.parse_args(argv)
    text = report(args.results)
    if args.full:
        title = f"# Results of a full run (generated by scripts/report_results.py from {Path(args.results).name}/)"
        Path(args.full).write_text(title + text[text.index("\n"):] + "\n")
        print(f"wrote the report to {args.full}")
    if args.readme:
        Path(args.readme).write_text(into_readme(Path(args.readme), "\n" + report(args.results, README_SECTIONS)))
        print(f"wrote {README_SECTIONS} into {args.readme}")
    if not (args.full or args.readme):
        print(text)
    return text


if __name__ == "__main__":
    main()
