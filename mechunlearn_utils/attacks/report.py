"""The attacks' summary: records, recovery table, verdicts, relearning curves, positive control, plots."""

from __future__ import annotations

import pandas as pd

from mechunlearn_utils.evaluate.verdicts import bootstrap_ci, ci_columns, ci_verdict, claim_verdict


def attack_records(results: dict, baseline: dict, prefix: str = "") -> list[dict]:
    """Rows for `recovery_table` from ``{(task, method): {attack: p_after_attack}}`` and
    ``{(task, method): p_after_edit}`` (the same athletes, the edited model without attack)."""
    return [dict(task=t, method=m, attack=prefix + a, p_attack=float(p), p_edit=float(baseline[t, m]))
            for (t, m), row in results.items() if m != "base" for a, p in row.items()]


def recovery_table(records: pd.DataFrame) -> pd.DataFrame:
    """Rows (task, method), columns attack: forget p_true after the attack minus after the edit.

    `records` columns: task, method, attack, p_attack, p_edit (both on the same athletes)."""
    r = records.assign(recovered=records.p_attack - records.p_edit)
    return r.pivot_table(index=["task", "method"], columns="attack", values="recovered", sort=False)


def attack_verdicts(records: pd.DataFrame, flu: str = "flu", rivals=("ap", "ct"), margin: float = 0.05) -> pd.DataFrame:
    """Per (task, attack): does FLU's edit hold better than the rivals' (lower forget p(true) after
    the attack, by at least `margin`)? The verdict rule of notebook 07 (`evaluate.verdicts.claim_verdict`)."""
    rows = []
    for (task, attack), g in records.groupby(["task", "attack"], sort=False):
        values = dict(zip(g.method, g.p_attack))
        verdict, words = claim_verdict(values, flu, rivals, lower_is_better=True, margin=margin)
        others = ", ".join(f"{m} {p:.3f}" for m, p in values.items() if m not in (flu, *rivals))
        rows.append(dict(task=task, attack=attack, verdict=verdict,
                         numbers=words + (f" (also {others})" if others else "")))
    return pd.DataFrame(rows, columns=["task", "attack", "verdict", "numbers"])


def relearn_curve_frame(results: dict) -> pd.DataFrame:
    """Long table (task, method, variant, step, forget_p_true, train_p_true) from
    {(task, method, variant): RelearnResult}: the held-out half and the half relearning trained on."""
    rows = [dict(task=t, method=m, variant=v, step=s, forget_p_true=p, train_p_true=q)
            for (t, m, v), r in results.items() for s, p, q in zip(r.steps, r.forget_p_true, r.train_p_true)]
    return pd.DataFrame(rows)


def control_check(curves: pd.DataFrame, control: str = "extraction", variant: str = "relearn_lora",
                  min_gain: float = 0.2) -> dict:
    """Positive control of the relearning attack, per task: does the control localization's edit
    (an extraction-stage edit, which the paper's account predicts is shallow) come back on the
    held-out half? ``{task: {"start", "end", "gain", "attack_has_power", "line"}}``. When no edit,
    the control included, regains `min_gain`, the attack may be too weak to tell localizations apart.
    Tasks without the control give ``attack_has_power=None``."""
    out = {}
    for task, g in curves[curves.variant == variant].groupby("task", sort=False):
        c = g[g.method == control].sort_values("step")
        if c.empty:
            out[task] = dict(start=None, end=None, gain=None, attack_has_power=None,
                             line=f"{task}: no {control!r} edit, so the attack has no positive control here")
            continue
        start, end = float(c.forget_p_true.iloc[0]), float(c.forget_p_true.iloc[-1])
        gain = end - start
        best = g.groupby("method").apply(lambda d: d.sort_values("step").forget_p_true.iloc[-1]
                                         - d.sort_values("step").forget_p_true.iloc[0], include_groups=False)
        power = bool(best.max() >= min_gain)
        line = (f"{task}: the control ({control}) goes from {start:.3f} to {end:.3f} held-out p(true) "
                f"({gain:+.3f}); largest regain of any edit {best.max():+.3f} ({best.idxmax()}). ")
        line += ("The attack can bring an edit back, so a low curve means the edit resisted it."
                 if power else f"No edit regains {min_gain}: the attack may be too weak here to tell the "
                 "localizations apart, so read the relearning rows with that caveat.")
        out[task] = dict(start=start, end=end, gain=gain, attack_has_power=power, line=line)
    return out


def plot_relearn_curves(curves: pd.DataFrame, title: str = ""):
    """One panel per relearning variant: forget p_true against step, a line per method; solid the
    held-out half, dashed the half relearning trained on."""
    import seaborn as sns

    long = curves.melt(id_vars=["task", "method", "variant", "step"], value_vars=["forget_p_true", "train_p_true"],
                       var_name="half", value_name="p_true")
    long["half"] = long.half.map({"forget_p_true": "held-out", "train_p_true": "trained on"})
    grid = sns.relplot(long, x="step", y="p_true", hue="method", style="half", col="variant", row="task",
                       kind="line", marker="o", height=3, facet_kws=dict(sharex=False))
    grid.set(ylim=(0, 1), ylabel="forget p(true)")
    grid.set_titles("{row_name}: {col_name}")
    grid.figure.suptitle(title, y=1.04)
    return grid.figure


def plot_recovery(table: pd.DataFrame, title: str = ""):
    """Heatmap of recovered forget p_true (method x attack)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * table.shape[1], 0.6 + 0.45 * table.shape[0]))
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in table.index]
    sns.heatmap(table.set_axis(labels), annot=True, fmt=".2f", cmap="RdBu_r", center=0, vmin=-1, vmax=1, ax=ax)
    ax.set(title=title or "forget p(true) recovered by each attack", xlabel="attack", ylabel="")
    return fig


# --------------------------------------------------------------------------- uncertainty (issue 15)

def relearn_ci_frame(results: dict, step: int = -1, level: float = 0.95) -> pd.DataFrame:
    """Per (task, method, variant): held-out p(true) at eval step index `step` (the last by default)
    with its bootstrap CI over the held-out athletes (`evaluate.verdicts.bootstrap_ci`), from the
    per-athlete values each `RelearnResult` keeps. Columns task, method, variant, p_true, ci_low, ci_high, n."""
    rows = []
    for (t, m, v), r in results.items():
        per = r.heldout_by_athlete[step]
        lo, hi = bootstrap_ci(per, level=level)
        rows.append(dict(task=t, method=m, variant=v, p_true=float(sum(per) / len(per)), ci_low=lo, ci_high=hi,
                         n=len(per)))
    return pd.DataFrame(rows, columns=["task", "method", "variant", "p_true", "ci_low", "ci_high", "n"])


def per_athlete_ci_verdicts(per_athlete: dict, flu: str = "flu", rivals=("ap", "ct")) -> pd.DataFrame:
    """Per (task, variant): the verdict with intervals (`evaluate.verdicts.ci_verdict`) on the held-out
    athletes' p(true) after an attack (lower = the edit held), ``per_athlete[(task, method, variant)]``
    a list in the same athlete order for every method: reproduced only when the paired CI of
    (rival - FLU) lies above 0 for every rival. Columns task, variant, verdict, and the CIs
    (`evaluate.verdicts.ci_columns`)."""
    rows = []
    for (t, v) in dict.fromkeys((t, v) for t, _, v in per_athlete):
        per_fact = {m: list(x) for (tt, m, vv), x in per_athlete.items() if (tt, vv) == (t, v)}
        verdict, cis = ci_verdict(per_fact, flu, rivals, lower_is_better=True)
        rows.append(dict(task=t, variant=v, verdict=verdict, **ci_columns(cis, flu)))
    return pd.DataFrame(rows)


def relearn_ci_verdicts(results: dict, flu: str = "flu", rivals=("ap", "ct")) -> pd.DataFrame:
    """`per_athlete_ci_verdicts` of the held-out athletes after relearning (`RelearnResult`s by
    (task, method, variant)), at the last evaluated step."""
    return per_athlete_ci_verdicts({k: r.heldout_by_athlete[-1] for k, r in results.items()}, flu, rivals)


def pooled_heldout(runs: list[tuple[list[str], list[float]]]) -> dict[str, float]:
    """Mean held-out p(true) per athlete over the splits where it was held out: `runs` holds, per
    split, (held-out athlete names, their p(true) after relearning), in the same order."""
    sums: dict[str, list[float]] = {}
    for names, values in runs:
        if len(names) != len(values):
            raise ValueError(f"{len(names)} held-out athletes but {len(values)} values in one split")
        for a, v in zip(names, values):
            sums.setdefault(a, []).append(float(v))
    return {a: sum(v) / len(v) for a, v in sums.items()}


def split_ci_verdicts(runs: dict, flu: str = "flu", rivals=("ap", "ct"), seed: int = 0) -> pd.DataFrame:
    """The relearning verdict over several splits of the forget set into attack-train / held-out
    halves: ``runs[(task, method)]`` is a list, one per split, of (held-out names, p(true) after
    relearning). Per athlete, the mean over the splits that held it out (`pooled_heldout`); then the
    paired bootstrap over athletes (`evaluate.verdicts.ci_verdict`). Columns task, n_splits,
    n_athletes, verdict, per method the pooled mean, the CIs of (rival - FLU) (`ci_columns`)."""
    rows = []
    for task in dict.fromkeys(t for t, _ in runs):
        pooled = {m: pooled_heldout(r) for (t, m), r in runs.items() if t == task}
        names = sorted(set.intersection(*(set(p) for p in pooled.values())))
        if not names:
            raise ValueError(f"{task}: no athlete was held out for every method")
        per_fact = {m: [p[a] for a in names] for m, p in pooled.items()}
        verdict, cis = ci_verdict(per_fact, flu, rivals, lower_is_better=True, seed=seed)
        rows.append(dict(task=task, n_splits=max(len(r) for (t, _), r in runs.items() if t == task),
                         n_athletes=len(names), verdict=verdict,
                         **{f"{m}.mean": float(sum(v) / len(v)) for m, v in per_fact.items()},
                         **ci_columns(cis, flu)))
    return pd.DataFrame(rows)


def plot_ci_bars(frame: pd.DataFrame, title: str = "", ylabel: str = "held-out forget p(true)"):
    """One panel per task: a point per method and variant with its CI as an error bar (the spread
    of a per-fact mean; `relearn_ci_frame`'s columns)."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(frame.task))
    variants = list(dict.fromkeys(frame.variant))
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.5 + 0.9 * frame.method.nunique() * len(tasks), 3.4),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        g = frame[frame.task == task]
        methods = list(dict.fromkeys(g.method))
        for k, (v, marker) in enumerate(zip(variants, "osD^v<>")):
            d = g[g.variant == v].set_index("method").reindex(methods).dropna(subset=["p_true"])
            x = [methods.index(m) + 0.15 * (k - (len(variants) - 1) / 2) for m in d.index]
            ax.errorbar(x, d.p_true, yerr=[d.p_true - d.ci_low, d.ci_high - d.p_true], fmt=marker, capsize=3, label=v)
        ax.set(xticks=range(len(methods)), xticklabels=methods, ylim=(0, 1), title=task, ylabel=ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title or "95% bootstrap CI over the held-out athletes", y=1.02)
    return fig
