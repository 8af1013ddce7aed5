"""A results folder as markdown tables: editing per task, verdicts, attacks, probes, masking, times.

    .venv/bin/python scripts/report_results.py                 # <repo>/results
    .venv/bin/python scripts/report_results.py /path/to/results > report.md

Everything is read from the metrics.json files (and 07's verdicts.csv) that `make workbook`
writes; the README's results tables are made with it, so no number there is typed by hand.
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
                   "soft_prompt.forget_p_true"]
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


def _metrics(results: Path, stem: str) -> dict:
    path = results / stem / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _table(frame: pd.DataFrame, title: str, **kw) -> str:
    return f"\n### {title}\n\n{frame.to_markdown(floatfmt='.4g', **kw)}\n" if len(frame) else ""


def report(results) -> str:
    results = Path(results)
    out = [f"# Results in {results}"]
    out.append(_table(localization_table(_metrics(results, "02_localization")), "02 localizations"))
    out.append(_table(depth_table(_metrics(results, "02b_depth_sweep")), "02b depth sweep"))
    edits = metrics_long(_metrics(results, "03_editing_and_unlearning"))
    for task in edits.task.unique():
        wide = edits[edits.task == task].pivot_table(index="method", columns="measure", values="value")
        cols = [c for c in EDIT_COLUMNS["counterfact" if task == "counterfact" else "sports"] if c in wide]
        out.append(_table(wide[cols], f"03 editing: {task}"))
    verdicts = results / "07_results" / "verdicts.csv"
    if verdicts.exists():
        v = pd.read_csv(verdicts)[["claim", "task", "measure", "verdict", "numbers"]]
        out.append(_table(v, "07 verdicts", index=False))
    attacks = metrics_long(_metrics(results, "05_attacks"))
    if len(attacks):
        a = attacks[attacks.measure.isin(ATTACK_MEASURES)]
        out.append(_table(a.pivot_table(index=["task", "method"], columns="measure", values="value"),
                          "05 attacks (held-out forget p(true))"))
    probes = metrics_long(_metrics(results, "04_probing_latent_knowledge"))
    if len(probes):
        p = probes[probes.measure.str.endswith((".mid", ".back_half"))]
        out.append(_table(p.pivot_table(index=["task", "method"], columns="measure", values="value"), "04 probes"))
    masks = _metrics(results, "06_weight_masking")
    if masks:
        m = pd.DataFrame({k: {f: masks.get(f"{k}.{f}") for f in MASK_FIELDS} for k in masks.get("methods", [])}).T
        out.append(_table(m, "06 masking"))
    times = {s: _metrics(results, s).get("seconds_total") for s in notebook_stems()}
    times = pd.Series({s: t for s, t in times.items() if t is not None}, name="seconds", dtype=float)
    if len(times):
        out.append(_table(pd.concat([times, pd.Series({"total": times.sum()}, name="seconds")]).to_frame(),
                          "seconds per notebook (seconds_total)"))
    return "\n".join(out)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=str(Path(__file__).resolve().parents[1] / "results"))
    text = report(ap.parse_args(argv).results)
    print(text)
    return text


if __name__ == "__main__":
    main()
