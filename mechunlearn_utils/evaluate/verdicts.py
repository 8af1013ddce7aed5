"""The verdict rule of the workbook: is FLU better than every rival, by a margin? Used by the
attacks' verdicts (`attacks.report.attack_verdicts`) and notebook 07 (`workbook.results`); and the same
question with uncertainty: a paired bootstrap over facts (`bootstrap_ci`, `diff_ci`, `ci_verdict`)."""

from __future__ import annotations

import numpy as np


def claim_verdict(values: dict, flu: str = "flu", rivals=("ap", "ct"), lower_is_better: bool = True,
                  margin: float = 0.05) -> tuple[str, str]:
    """Is FLU better than every rival by at least `margin`? -> (verdict, the numbers in words).

    'reproduced' when FLU beats every rival by the margin, 'not reproduced' when it beats none,
    'mixed' otherwise; 'not measured' when FLU or every rival is missing."""
    present = [r for r in rivals if r in values]
    if flu not in values or not present:
        return "not measured", "missing: " + ", ".join(m for m in (flu, *rivals) if m not in values)
    sign = 1 if lower_is_better else -1
    wins = [sign * (values[r] - values[flu]) >= margin for r in present]
    verdict = "reproduced" if all(wins) else ("not reproduced" if not any(wins) else "mixed")
    return verdict, in_words(values, flu, rivals)


def in_words(values: dict, flu: str = "flu", rivals=("ap", "ct")) -> str:
    """FLU's value against its rivals' ("FLU 0.006 vs ap 0.173, ct 0.007"), the rivals present only."""
    return f"FLU {values[flu]:.3f} vs " + ", ".join(f"{r} {values[r]:.3f}" for r in rivals if r in values)


# --------------------------------------------------------------------------- uncertainty over facts

def _boot_indices(n: int, n_boot: int, seed: int):
    if n < 1:
        raise ValueError("a bootstrap needs at least one fact")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-fact `values` (facts resampled with
    replacement, `n_boot` times, fixed `seed`): (low, high)."""
    v = np.asarray(values, dtype=float)
    means = v[_boot_indices(len(v), n_boot, seed)].mean(1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def diff_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap interval of mean(a) - mean(b): `a[i]` and `b[i]` belong to the same fact
    and are resampled together (the methods were scored on the same athletes)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_boot, seed, level)


def ci_verdict(per_fact: dict, flu: str = "flu", rivals=("ap", "ct"), lower_is_better: bool = True,
               n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[str, dict]:
    """The verdict with intervals: per rival, the paired bootstrap CI of (rival - FLU), signed so
    that > 0 is the paper's side (FLU better). -> (verdict, {rival: (low, high)}).

    'reproduced' when every rival's interval lies entirely on the paper's side, 'not reproduced'
    when every one lies entirely on the other side, 'mixed' when some lie on each side,
    'inconclusive' otherwise (an interval covers 0); 'not measured' without FLU or any rival."""
    present = [r for r in rivals if r in per_fact]
    if flu not in per_fact or not present:
        return "not measured", {}
    sign = 1 if lower_is_better else -1
    cis = {}
    for r in present:
        lo, hi = diff_ci(per_fact[r], per_fact[flu], n_boot, seed, level)
        cis[r] = (lo, hi) if sign > 0 else (-hi, -lo)
    wins = [lo > 0 for lo, _ in cis.values()]
    losses = [hi < 0 for _, hi in cis.values()]
    if all(wins):
        return "reproduced", cis
    if all(losses):
        return "not reproduced", cis
    return ("mixed" if any(wins) and any(losses) else "inconclusive"), cis


def spread_table(per_fact: dict, level: float = 0.95, seed: int = 0):
    """The spread of each per-fact mean: ``per_fact[(task, method)] = {measure: values}`` -> a long
    table task, method, measure, mean, low, high (`bootstrap_ci` over the facts), for error bars."""
    import pandas as pd

    rows = [dict(task=t, method=m, measure=k, mean=float(np.mean(v)), **dict(zip(("low", "high"),
                                                                             bootstrap_ci(v, seed=seed, level=level))))
            for (t, m), d in per_fact.items() for k, v in d.items() if len(v)]
    return pd.DataFrame(rows, columns=["task", "method", "measure", "mean", "low", "high"])


def seed_means(per_fact: dict, per_seed: dict):
    """The mean of each per-fact measure per (task, method, seed), for the pairs edited at more than
    one seed: seed 0 from ``per_fact[(task, method)]``, seed k from ``per_seed[(task, method, k)]``
    (both ``{measure: values}``). Empty, with the same index names, when nothing has another seed."""
    import pandas as pd

    rows = {(t, m, 0): per_fact[t, m] for t, m, _ in per_seed if (t, m) in per_fact} | dict(per_seed)
    table = pd.DataFrame({key: {k: float(np.mean(v)) for k, v in d.items() if len(v)} for key, d in rows.items()}).T
    index = pd.MultiIndex.from_tuples(list(table.index) if len(table) else [], names=["task", "method", "seed"])
    return table.set_axis(index).sort_index()


def interval_text(low: float, high: float) -> str:
    """An interval as every table and reading guide of the workbook writes it: ``[-0.045, +0.123]``."""
    return f"[{low:+.3f}, {high:+.3f}]"


def ci_columns(cis: dict, flu: str = "flu") -> dict:
    """A verdict table's interval columns: per rival "<rival>-<flu> CI" as text, and ``cis`` (the
    {rival: (low, high)} of `ci_verdict`) kept whole for `ci_metrics`."""
    return {**{f"{r}-{flu} CI": interval_text(lo, hi) for r, (lo, hi) in cis.items()}, "cis": dict(cis)}


def ci_metrics(task: str, claim: str, verdict: str, cis: dict) -> dict:
    """metrics.json entries of one verdict with intervals: ``verdict_ci.<claim>.<task>`` and per rival
    ``<task>.<claim>.ci.<rival>_minus_flu_low`` / ``_high`` (the form `workbook.results.attach_cis`
    reads; notebooks 04 and 05 write it)."""
    out = {f"verdict_ci.{claim}.{task}": verdict}
    for rival, (lo, hi) in cis.items():
        out[f"{task}.{claim}.ci.{rival}_minus_flu_low"], out[f"{task}.{claim}.ci.{rival}_minus_flu_high"] = lo, hi
    return out


def above_chance(hits: int, n: int, chance: float, alpha: float = 0.05) -> dict:
    """Is an accuracy of `hits` / `n` above `chance`? Exact one-sided binomial test (scipy's
    `binomtest`, present with scikit-learn). -> {"accuracy", "chance", "p_value", "above", "n"}."""
    from scipy.stats import binomtest

    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n and n >= 1, got hits={hits}, n={n}")
    p = float(binomtest(int(hits), int(n), chance, alternative="greater").pvalue)
    return dict(accuracy=hits / n, chance=chance, p_value=p, above=bool(p < alpha), n=int(n))
