"""Where notebooks write what they found, and how later notebooks read it.

Every notebook writes ``RESULTS_DIR/<notebook stem>/metrics.json``: a flat dict of documented keys
(str -> number, string, bool or list of numbers), with the ``dtype`` its model ran in. Writes are
atomic (temp file + rename), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mechunlearn_utils.core.paths import DATA_DIR, STEMS, MissingResultsError, atomic_write_text  # noqa: F401 (re-exported)
from mechunlearn_utils.core.serialize import to_plain
from mechunlearn_utils.data.tasks import WHOLE_SPORT_TASKS
from mechunlearn_utils.evaluate.verdicts import ci_metrics, ci_verdict, claim_verdict, in_words, interval_text  # noqa: F401 (claim_verdict: 07)

# Which notebook produces which results directory: used to tell the user what to run.
NOTEBOOK_OF = {stem: f"notebooks/{stem}.py" for stem in STEMS.values()}


def notebook_dir(results_dir, stem: str) -> Path:
    path = Path(results_dir) / stem
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_metrics(results_dir, stem: str, metrics: dict) -> Path:
    """Write a flat metrics dict to RESULTS_DIR/<stem>/metrics.json atomically; returns the path.

    Adds ``dtype``: what the model of this process ran in (`core.precision.loaded_dtype`: float32 or
    bfloat16; "none" when no model was loaded), ``torch_threads`` (fp32 sums can round
    differently with another thread count), ``git_commit`` (the code that ran,
    `core.paths.git_commit`), ``host`` (the CPU, `core.precision.host_description`) and
    ``allocator`` (tcmalloc or the system's: times differ, numbers do not; `core.allocator`), unless
    `metrics` has them."""
    import torch

    from mechunlearn_utils.core.allocator import allocator_in_use
    from mechunlearn_utils.core.paths import git_commit
    from mechunlearn_utils.core.precision import host_description, loaded_dtype

    flat = {"dtype": loaded_dtype() or "none", "torch_threads": torch.get_num_threads(), "git_commit": git_commit(),
            "host": host_description(), "allocator": allocator_in_use()}
    for key, value in metrics.items():
        if isinstance(value, dict):
            raise TypeError(f"metrics must be flat: {key!r} holds a dict (flatten it: '{key}.sub')")
        flat[str(key)] = to_plain(value, finite=True, dicts=False)
    path = notebook_dir(results_dir, stem) / "metrics.json"
    atomic_write_text(path, json.dumps(flat, indent=1, sort_keys=True))
    return path


def read_metrics(results_dir, stem: str) -> dict:
    """Read an earlier notebook's metrics, or say which notebook to run first."""
    path = Path(results_dir) / stem / "metrics.json"
    if not path.exists():
        source = NOTEBOOK_OF.get(stem, f"notebooks/{stem}.py")
        raise MissingResultsError(
            f"{path} is missing: run {source} first (same RESULTS_DIR), e.g. "
            f"`python -m mechunlearn_utils.workbook.runner --only {stem}`")
    return json.loads(path.read_text())


def require_file(results_dir, stem: str, name: str) -> Path:
    """Path of a file an earlier notebook saved, or a clear error naming that notebook."""
    path = Path(results_dir) / stem / name
    if not path.exists():
        source = NOTEBOOK_OF.get(stem, f"notebooks/{stem}.py")
        raise MissingResultsError(f"{path} is missing: run {source} first (same RESULTS_DIR)")
    return path


def save_figure(fig, results_dir, stem: str, name: str) -> Path:
    """Save a matplotlib figure as PNG next to the notebook's metrics."""
    path = notebook_dir(results_dir, stem) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def verdict_lines(table, tasks: dict, mcq_usable: bool, flu: str = "flu", ot=("ap", "ct")) -> list[str]:
    """Plain-language comparisons that decide the paper's claims for each task, with numbers.

    `table`: rows (task, method) with `evals.evaluate_task` columns and a '(base)' row per task.
    Generalization is judged in MCQ when the model is above chance there, else in the question
    (sports) or paraphrase (CounterFact) format, and the line says which.
    """
    lines = []
    for name, task in tasks.items():
        t = table.loc[name]
        methods = [m for m in t.index if m != "(base)"]
        train_fmt = "normal" if task.kind == "sports" else "prompt"
        gen_fmt = "mcq" if mcq_usable else ("question" if task.kind == "sports" else "paraphrase")
        col = f"forget.{train_fmt}.p_true"
        took = {m: float(t.loc[m, col]) for m in methods}
        lines.append(f"[{name}] training-format forget p(true): "
                     + ", ".join(f"{m} {v:.3f}" for m, v in took.items())
                     + f" (base {float(t.loc['(base)', col]):.3f})")
        gcol = f"forget.{gen_fmt}.p_true"
        if flu in methods and any(o in methods for o in ot) and gcol in t:
            others = {o: float(t.loc[o, gcol]) for o in ot if o in methods}
            f = float(t.loc[flu, gcol])
            verdict = "reproduced" if f < min(others.values()) else "NOT reproduced"
            lines.append(f"[{name}] FLU generalizes better than OT in the {gen_fmt} format: {verdict} "
                         f"(forget p(true) FLU {f:.3f} vs " + ", ".join(f"{o} {v:.3f}" for o, v in others.items())
                         + ")" + ("" if mcq_usable else " [MCQ is at chance on this model]"))
        if "side.lm_loss" in t:
            base = float(t.loc["(base)", "side.lm_loss"])
            deltas = {m: float(t.loc[m, "side.lm_loss"]) - base for m in methods}
            lines.append(f"[{name}] LM loss change on held-out text: "
                         + ", ".join(f"{m} {d:+.3f}" for m, d in deltas.items()))
    return lines


# --------------------------------------------------------------------------- side by side with the paper

PAPER_RESULTS_CSV = DATA_DIR / "paper_results.csv"
WHOLE_SPORT_POOLED = "whole_sport_pooled"  # the task name of `pool_whole_sport`'s rows
PAPER_TABLE_OF_TASK = {"sport_to_golf": "sports_golf", "athletes_to_sport": "sports_athletes",
                       "counterfact": "counterfact", **{t: "sports_golf" for t in WHOLE_SPORT_TASKS},
                       WHOLE_SPORT_POOLED: "sports_golf"}  # the paper's table is the mean over its sports


def paper_by_task(paper, tasks):
    """The paper's rows (`load_paper_results`) with a `task` column: for each of our `tasks`, the rows of
    the paper's table for it (`PAPER_TABLE_OF_TASK`; the three per-sport whole-sport tasks share one)."""
    import pandas as pd

    parts = [paper[paper.table == PAPER_TABLE_OF_TASK[t]].assign(task=t) for t in dict.fromkeys(tasks)
             if t in PAPER_TABLE_OF_TASK]
    return pd.concat(parts, ignore_index=True) if parts else paper.iloc[:0].assign(task=[])


def load_paper_results(path=PAPER_RESULTS_CSV):
    """The paper's numbers (data/paper_results.csv): columns table, method, measure, value."""
    import pandas as pd

    return pd.read_csv(path)


def metrics_long(metrics: dict, tasks=None):
    """A notebook-03 style flat dict `<task>.<method>.<measure>` -> long table task/method/measure/value."""
    import pandas as pd

    rows = []
    for key, value in metrics.items():
        parts = key.split(".", 2)
        if len(parts) == 3 and isinstance(value, (int, float)) and not isinstance(value, bool):
            if tasks is None or parts[0] in tasks:
                rows.append(dict(task=parts[0], method=parts[1], measure=parts[2], value=float(value)))
    return pd.DataFrame(rows, columns=["task", "method", "measure", "value"])


def side_by_side(ours, paper):
    """Join our long table with the paper's on (task, method, measure): columns ours, paper."""
    paper = paper_by_task(paper, ours.task.unique())
    merged = ours.merge(paper[["task", "method", "measure", "value"]], on=["task", "method", "measure"],
                        how="inner", suffixes=("_ours", "_paper"))
    return merged.rename(columns={"value_ours": "ours", "value_paper": "paper"})


def paper_numbers(paper, task: str, measure: str, methods=("flu", "ap", "ct")) -> str:
    """The paper's values of one measure for FLU and its rivals on a task, in `claim_verdict`'s words
    ("FLU 0.010 vs ap 0.590, ct 0.280"); "" when the paper does not report that measure there."""
    rows = paper[(paper.table == PAPER_TABLE_OF_TASK.get(task)) & (paper.measure == measure)]
    vals = dict(zip(rows.method, rows.value))
    return in_words(vals, methods[0], methods[1:]) if methods[0] in vals else ""


def robustness_vs_side_effects(edits_long, attacks_long, robustness: str = "relearn20.normal.p_true",
                               side: str = "side.lm_loss"):
    """One row per (task, method) measured in both: the attack's forget p(true) (`robustness`, lower =
    more robust) and the side effect as a change from the unedited model (`side` minus base)."""
    base = edits_long[(edits_long.method == "base") & (edits_long.measure == side)].set_index("task").value
    eff = edits_long[(edits_long.method != "base") & (edits_long.measure == side)]
    eff = eff.assign(side_effect=eff.value - eff.task.map(base))[["task", "method", "side_effect"]]
    rob = attacks_long[attacks_long.measure == robustness][["task", "method", "value"]]
    out = rob.rename(columns={"value": "attack_p_true"}).merge(eff, on=["task", "method"])
    return out.dropna().reset_index(drop=True)


TIMING_WORDS = ("seconds", "load_seconds", "wall", "_s_", "per_step", "torch_threads", "git_commit", "host")  # how the run ran


def _numbers(value) -> list[float] | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def compare_runs(dir_a, dir_b, ignore=TIMING_WORDS, tol: float | None = None):
    """Largest absolute difference per notebook between two RESULTS_DIRs (timings ignored).

    Returns a table: stem, n_compared, max_abs_diff, worst_key, and `mismatched` (keys present in
    one run only, or non-numeric values that differ: verdicts, the dtype); with `tol`, also
    `n_over_tol` and `over_tol` (the keys whose largest difference exceeds it), e.g. to compare a
    bf16 run with an fp32 one."""
    import pandas as pd

    rows = []
    for path in sorted(Path(dir_a).glob("*/metrics.json")):
        stem = path.parent.name
        other = Path(dir_b) / stem / "metrics.json"
        if not other.exists():
            rows.append(dict(stem=stem, n_compared=0, max_abs_diff=math.nan, worst_key="", mismatched=["<missing>"],
                             n_over_tol=0, over_tol=[]))
            continue
        a, b = json.loads(path.read_text()), json.loads(other.read_text())
        keys = [k for k in sorted(set(a) | set(b)) if not any(w in k for w in ignore)]
        worst, worst_key, n, mismatched, over = 0.0, "", 0, [], []
        for k in keys:
            va, vb = _numbers(a.get(k)), _numbers(b.get(k))
            if va is None or vb is None or len(va) != len(vb):
                if a.get(k) != b.get(k):
                    mismatched.append(k)
                continue
            d = max((abs(x - y) for x, y in zip(va, vb) if not (math.isnan(x) and math.isnan(y))), default=0.0)
            n += 1
            if d > worst or not worst_key:
                worst, worst_key = d, k
            if tol is not None and d > tol:
                over.append(k)
        rows.append(dict(stem=stem, n_compared=n, max_abs_diff=worst, worst_key=worst_key, mismatched=mismatched,
                         n_over_tol=len(over), over_tol=over))
    columns = ["stem", "n_compared", "max_abs_diff", "worst_key", "mismatched"]
    return pd.DataFrame(rows, columns=columns + (["n_over_tol", "over_tol"] if tol is not None else []))


def compare_verdicts(dir_a, dir_b, labels=("a", "b")):
    """Notebook 07's verdicts (`verdicts.csv`) of two RESULTS_DIRs side by side, one row per claim,
    task and measure: each run's margin verdict and interval verdict, and `changed` (either differs;
    a row present in one run only counts as changed). Says which notebook to run when one is missing."""
    import pandas as pd

    key = ["id", "task", "measure"]
    tables = []
    for d, label in zip((dir_a, dir_b), labels):
        t = pd.read_csv(require_file(d, "07_results", "verdicts.csv"))
        cols = [c for c in ("verdict", "verdict_ci", "numbers") if c in t]
        tables.append(t.set_index(key)[cols].add_suffix(f" ({label})"))
    both = tables[0].join(tables[1], how="outer")
    a, b = labels
    changed = pd.Series(False, index=both.index)
    for col in ("verdict", "verdict_ci"):
        if f"{col} ({a})" in both and f"{col} ({b})" in both:
            changed |= both[f"{col} ({a})"].fillna("-") != both[f"{col} ({b})"].fillna("-")
    return both.assign(changed=changed).reset_index()


def latent_position(probes: dict, positions=("final", "subject")) -> str:
    """The probe position (notebook 04 keys `<task>.base.<pos>.true_acc.mid`) where the probe reads
    the true fact best in the unedited model, averaged over tasks; the first when nothing is there."""
    def base_acc(pos):
        vals = [v for k, v in probes.items() if k.endswith(f".base.{pos}.true_acc.mid")]
        return sum(vals) / len(vals) if vals else -1.0

    return max(positions, key=base_acc)


# Claims whose inputs carry per-fact values, and where their bootstrap verdict lives: notebook 05 keeps the
# held-out athletes' p(true) after LoRA relearning (`verdict_ci.relearn_lora.<task>`,
# `<task>.relearn_lora.ci.<rival>_minus_flu_low/high`) and under the soft prompt
# (`verdict_ci.soft_prompt.<task>`); notebook 04 the per-athlete hits of the paper's probes
# (`verdict_ci.latent_paper.<task>`, ...); notebook 03 each evaluated fact's p(true) and each held-out
# paragraph's LM loss, from which `per_fact_cis` makes the verdicts of generalization and side effects.
# Per claim, the sources in order of preference: the relearning and soft-prompt verdicts pooled over
# several splits first, when 05 ran them.
# Notebook 03's claims likewise: pooled over the extra seeds of its edits (`<claim>_seeds`) where 03 made them.
CI_SOURCES = {"relearning": ("relearn_lora_splits", "relearn_lora"), "latent_paper": ("latent_paper",),
              "soft_prompt": ("soft_prompt_splits", "soft_prompt"),
              "generalizes": ("generalizes_seeds", "generalizes"),
              "side_effects_maintain": ("side_effects_maintain_seeds", "side_effects_maintain"),
              "side_effects_lm": ("side_effects_lm_seeds", "side_effects_lm")}
SEED_PREFIX = "per_fact_seed"  # notebook 03's extra seeds: `<task>.<method>.per_fact_seed<k>.<measure>`

# Claims of notebook 03 whose per-fact values it keeps (`<task>.<method>.per_fact.<measure>`, the measure of
# 07's verdict row): is lower the paper's side? Generalization: the forget p(true) in an unseen format;
# side effects: the maintain p(true) (higher is better) and the LM loss per held-out paragraph (lower is better).
PER_FACT_CLAIMS = {"generalizes": True, "side_effects_maintain": False, "side_effects_lm": True}


def per_fact_measure(measure: str) -> str:
    """The per-fact measure behind a verdict row's measure: a change from the base model
    (``side.lm_loss - base``) has the same paired differences between methods as the measure itself."""
    return measure.split(" - ")[0]


def per_fact_values(metrics: dict) -> dict:
    """Notebook 03's per-fact lists (`<task>.<method>.per_fact.<measure>`) as {(task, method): {measure: values}}."""
    return {tm: {measure: by_seed[0] for measure, by_seed in d.items() if 0 in by_seed}
            for tm, d in per_fact_by_seed(metrics).items()}


def per_fact_by_seed(metrics: dict) -> dict:
    """Notebook 03's per-fact lists of every seed it edited with: {(task, method): {measure: {k: values}}},
    k = 0 for the edit of `SEED` (`<task>.<method>.per_fact.<measure>`) and k >= 1 for the edits of
    `SEED + k` (`<task>.<method>.per_fact_seed<k>.<measure>`, other facts and other training draws)."""
    out: dict = {}
    for key, value in metrics.items():
        task, method, rest = (key.split(".", 2) + ["", ""])[:3]
        head, _, measure = rest.partition(".")
        if not isinstance(value, list) or not measure:
            continue
        if head == "per_fact":
            k = 0
        elif head.startswith(SEED_PREFIX) and head[len(SEED_PREFIX):].isdigit():
            k = int(head[len(SEED_PREFIX):])
        else:
            continue
        out.setdefault((task, method), {}).setdefault(measure, {})[k] = value
    return out


def pool_whole_sport(metrics: dict, name: str = WHOLE_SPORT_POOLED) -> dict:
    """The paper's whole-sport numbers are means over its three sport splits. When notebook 03 ran
    two or more of the per-sport tasks (`data.tasks.WHOLE_SPORT_TASKS`), their pooled task `name`:
    per (method, measure) measured in every one of them, the mean over the sports, and per-fact
    lists concatenated (different athletes; paired across methods within each sport, so the
    paired bootstrap stays paired). {} with fewer than two."""
    tasks = [t for t in WHOLE_SPORT_TASKS if any(k.startswith(f"{t}.") for k in metrics)]
    if len(tasks) < 2:
        return {}
    values: dict = {}
    for key, value in metrics.items():
        task, rest = (key.split(".", 1) + [""])[:2]
        if task in tasks and rest and not isinstance(value, bool) and isinstance(value, (int, float, list)):
            values.setdefault(rest, {})[task] = value
    out = {}
    for rest, by_task in values.items():
        if len(by_task) < len(tasks):
            continue
        if all(isinstance(v, list) for v in by_task.values()):
            if ".per_fact." in f".{rest}":
                out[f"{name}.{rest}"] = [x for t in tasks for x in by_task[t]]
        elif not any(isinstance(v, list) for v in by_task.values()):
            out[f"{name}.{rest}"] = sum(float(by_task[t]) for t in tasks) / len(tasks)
    return out


def per_fact_cis(verdicts: list[dict], metrics: dict, claims: dict = PER_FACT_CLAIMS,
                 methods=("flu", "ap", "ct")) -> dict:
    """The paired bootstrap verdicts (`evaluate.verdicts.ci_verdict`) of notebook 03's claims from the
    per-fact values 03 keeps, as metrics in the key form of notebooks 04 and 05 (`ci_metrics`), for
    `attach_cis`, and ``ci_seeds.<claim>.<task>``: how many of 03's seeds each interval pools.
    Verdict rows without per-fact values (an older 03 run) get none."""
    out, each = {}, per_fact_by_seed(metrics)
    for v in verdicts:
        if v["id"] not in claims:
            continue
        measure = per_fact_measure(v["measure"])
        by_seed = {m: each[v["task"], m][measure] for m in methods if measure in each.get((v["task"], m), {})}
        seeds = sorted(set.intersection(*(set(d) for d in by_seed.values()))) if by_seed else []
        if not seeds:
            continue
        # Paired across methods within a seed (the same facts in the same order), so the pooled lists stay paired.
        per = {m: [x for k in seeds for x in d[k]] for m, d in by_seed.items()}
        verdict, cis = ci_verdict(per, lower_is_better=claims[v["id"]])
        if cis:
            out.update(ci_metrics(v["task"], v["id"] + ("_seeds" if len(seeds) > 1 else ""), verdict, cis))
            out[f"ci_seeds.{v['id']}.{v['task']}"] = len(seeds)  # notebook 07 keeps these as they are
    return out


def attach_cis(verdicts: list[dict], metrics: dict, sources: dict = CI_SOURCES, rivals=("ap", "ct")) -> list[str]:
    """Add `verdict_ci` and `ci (rival - flu)` to each verdict row whose claim has per-fact intervals
    in `metrics` (notebook 05's and 04's metrics merged; in place); returns the claim ids that got them."""
    got = []
    for v in verdicts:
        options = sources.get(v["id"], ())
        options = (options,) if isinstance(options, str) else options
        variant = next((o for o in options if f"verdict_ci.{o}.{v['task']}" in metrics), None)
        if variant is None:
            continue
        key = f"verdict_ci.{variant}.{v['task']}"
        cis = [(r, metrics.get(f"{v['task']}.{variant}.ci.{r}_minus_flu_low"),
                metrics.get(f"{v['task']}.{variant}.ci.{r}_minus_flu_high")) for r in rivals]
        v["verdict_ci"] = metrics[key]
        v["ci source"] = variant
        v["ci (rival - flu)"] = ", ".join(f"{r} {interval_text(lo, hi)}" for r, lo, hi in cis if lo is not None)
        got.append(v["id"])
    return sorted(set(got))
