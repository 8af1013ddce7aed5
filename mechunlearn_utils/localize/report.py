"""Reporting on localizations: flat metrics, overlaps, depth, tables, plots, and how far each
design choice (AP aggregation, CT fact count, FLU selection) moves a localization."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from mechunlearn_utils.localize.common import LocalizationError, TracingResult
from mechunlearn_utils.localize.flu import FLUResult
from mechunlearn_utils.localize.matching import ATTN_MATRICES, MLP_MATRICES, Localization, named_parameters


def localization_metrics(task: str, locs: dict) -> dict:
    """Flat metrics: <task>.<method>.{mlp_layers, attn_layers, n_params, n_matrices, seconds,
    forward_passes, backward_passes, forward_sequences}."""
    out = {}
    for name, loc in locs.items():
        key = f"{task}.{name}"
        out.update({f"{key}.mlp_layers": loc.mlp_layers, f"{key}.attn_layers": loc.attn_layers,
                    f"{key}.n_params": loc.n_params, f"{key}.n_matrices": len(loc.matrices())})
        passes = loc.meta.get("passes") or {}
        out[f"{key}.seconds"] = float(loc.meta.get("seconds") or 0.0)
        out[f"{key}.forward_passes"] = int(passes.get("forward", 0))
        out[f"{key}.backward_passes"] = int(passes.get("backward", 0))
        out[f"{key}.forward_sequences"] = int(passes.get("forward_sequences", 0))
    return out


def _finite(x):
    return float(x) if np.isfinite(x) else None


def task_metrics(task: str, locs: dict, ap: TracingResult, ct: TracingResult, flu: FLUResult,
                 agreement: dict) -> dict:
    """Flat metrics of one task (notebook 02's metrics.json; keys documented there)."""
    out = localization_metrics(task, locs)
    t = task
    out.update({
        f"{t}.budget": locs["flu"].n_params, f"{t}.ct.n_facts": ct.info["n_facts"],
        f"{t}.ct.noise_samples": ct.info["n_samples"], f"{t}.ct.noise_scale": ct.info["noise_scale"],
        f"{t}.ct.p_clean": ct.info["p_clean"], f"{t}.ct.p_corrupt": ct.info["p_corrupt"],
        f"{t}.ap.n_facts": ap.info["n_facts"],
        f"{t}.ap.ld_clean": ap.info["ld_clean"], f"{t}.ap.ld_corrupt": ap.info["ld_corrupt"],
        f"{t}.ap.agreement.pearson": _finite(agreement["pearson"]),
        f"{t}.ap.agreement.spearman": _finite(agreement["spearman"]),
        f"{t}.ap.agreement.n_components": len(agreement["components"]),
        f"{t}.ap.agreement.components": agreement["components"],
        f"{t}.flu.threshold": flu.threshold, f"{t}.flu.hand_given": flu.hand_given,
        f"{t}.flu.extraction_layer": flu.extraction_layer,
        f"{t}.flu.extraction_heads": [f"{l}.{h}" for l, h in flu.extraction_heads],
        f"{t}.flu.mlp_effect": [] if flu.mlp_effect is None else np.asarray(flu.mlp_effect).tolist(),
        f"ratio_ct_over_ap.{t}.seconds": ct.seconds / ap.seconds,
        f"ratio_ct_over_ap.{t}.forward_sequences": ct.passes.forward_sequences / ap.passes.forward_sequences,
        f"ratio_ct_over_ap.{t}.seconds_per_fact": (ct.seconds / ct.info["n_facts"])
        / (ap.seconds / ap.info["n_facts"]),
        f"ratio_ct_over_ap.{t}.forward_sequences_per_fact": (ct.passes.forward_sequences / ct.info["n_facts"])
        / (ap.passes.forward_sequences / ap.info["n_facts"]),
    })
    for name, res in (("ct", ct), ("ap", ap)):
        for agg, suffix in (("paper", ""), ("abs", "_abs")):
            ls = res.layer_scores(agg)
            out.update({f"{t}.{name}{suffix}.layer_attn": np.asarray(ls["attn"]).tolist(),
                        f"{t}.{name}{suffix}.layer_mlp": np.asarray(ls["mlp"]).tolist()})
    out[f"{t}.ct.noise_rule"] = ct.info.get("noise_rule")
    out[f"{t}.ap.corruption_length_mismatch"] = (ap.info.get("corruption_stats") or {}).get("n_length_mismatch")
    return out


def jaccard(a: Localization, b: Localization, model=None) -> float:
    """Parameter-weighted Jaccard overlap of two localizations (1 = same parameters)."""
    sa, sb = set(a.params), set(b.params)
    if model is None:
        return len(sa & sb) / max(len(sa | sb), 1)
    names = named_parameters(model)
    size = lambda s: sum(names[p].numel() for p in s)  # noqa: E731
    return size(sa & sb) / max(size(sa | sb), 1)


def overlap_matrix(locs: dict, model=None) -> pd.DataFrame:
    keys = list(locs)
    return pd.DataFrame([[jaccard(locs[a], locs[b], model) for b in keys] for a in keys],
                        index=keys, columns=keys)


def _ranges(layers: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4,7'."""
    out, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            out.append(f"{start}" if start == l else f"{start}-{l}")
            start = None
    return ",".join(out) or "-"


def mean_depth(loc: Localization, n_layers: int, block: str | None = None) -> float:
    """Parameter-weighted mean layer of a localization's matrices / (n_layers - 1); NaN if none.

    ``block='mlp'`` or ``'attn'`` restricts to those matrices (each layer counted once per matrix)."""
    layers = []
    for label in loc.matrices():
        m = re.match(r"(attn|mlp)(\d+)\.", label)
        if m and (block is None or m[1] == block):
            layers.append(int(m[2]))
    return float(np.mean(layers) / max(n_layers - 1, 1)) if layers else float("nan")


def summary_table(locs: dict) -> pd.DataFrame:
    """One row per localization: MLP / attention layers, matrices, parameters, cost."""
    rows = []
    for name, loc in locs.items():
        passes = loc.meta.get("passes") or {}
        rows.append({"method": name, "MLP layers": _ranges(loc.mlp_layers),
                     "attention layers": _ranges(loc.attn_layers), "matrices": len(loc.matrices()),
                     "params (M)": round(loc.n_params / 1e6, 2),
                     "seconds": round(float(loc.meta.get("seconds") or 0.0), 1),
                     "forward seqs": int(passes.get("forward_sequences", 0))})
    return pd.DataFrame(rows).set_index("method")


def depth_table(locs: dict, n_layers: int) -> pd.DataFrame:
    """Mean layer / depth of each localization: all matrices, MLP matrices, attention matrices."""
    return pd.DataFrame({name: {"all": mean_depth(l, n_layers), "mlp": mean_depth(l, n_layers, "mlp"),
                                "attn": mean_depth(l, n_layers, "attn")} for name, l in locs.items()}).T


# =========================================================================== plots

def localization_grid(loc: Localization, n_layers: int) -> pd.DataFrame:
    """[matrix kind x layer] 0/1 table of what a localization trains."""
    kinds = [f"attn.{k}" for k in ATTN_MATRICES] + [f"mlp.{k}" for k in MLP_MATRICES]
    grid = pd.DataFrame(0, index=kinds, columns=range(n_layers))
    for label in loc.matrices():
        m = re.match(r"(attn|mlp)(\d+)\.(\w+)$", label)
        if m:
            grid.loc[f"{m[1]}.{m[3]}", int(m[2])] = 1
    if loc.method == "nonlocalized":
        grid[:] = 1
    return grid


def plot_localization(loc: Localization, n_layers: int, ax=None):
    """Heatmap of the matrices a localization trains (rows: matrix kind, columns: layer)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(min(0.45 * n_layers + 2, 12), 2.8))
    sns.heatmap(localization_grid(loc, n_layers), cmap="Blues", vmin=0, vmax=1, cbar=False,
                linewidths=0.5, linecolor="white", ax=ax)
    ax.set(xlabel="layer", ylabel="", title=f"{loc.task} · {loc.method}: {loc.n_params / 1e6:.2f}M params")
    return ax.figure


def plot_scores(scores: dict, title: str = "", ax=None, center: float = 0.0):
    """Heatmap rows = component (heads, MLP), columns = layer, from a TracingResult.scores."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = {}
    for kind, s in scores.items():
        s = np.asarray(s)
        if s.ndim == 2:
            rows.update({f"{kind}.h{h}": s[:, h] for h in range(s.shape[1])})
        else:
            rows[kind] = s
    table = pd.DataFrame(rows).T
    if ax is None:
        _, ax = plt.subplots(figsize=(min(0.45 * table.shape[1] + 2, 12), 0.3 * len(table) + 1.2))
    lim = float(np.abs(table.values).max()) or 1.0
    sns.heatmap(table, cmap="RdBu_r", center=center, vmin=-lim, vmax=lim, ax=ax)
    ax.set(xlabel="layer", title=title)
    return ax.figure


def plot_flu(flu: FLUResult, title: str = ""):
    """Left: each head's direct effect on the answer (extraction heads boxed); right: each MLP's
    effect through the extraction layer's input, with the FLU threshold."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if flu.hand_given:
        raise LocalizationError("hand-given FLU layers have no path-patching scores to plot")
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw=dict(width_ratios=[1.4, 1]))
    eff = np.asarray(flu.head_effect)
    lim = float(np.abs(eff).max()) or 1.0
    sns.heatmap(eff.T, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, ax=a0,
                cbar_kws=dict(label="direct effect"))
    for l, h in flu.extraction_heads:
        a0.add_patch(plt.Rectangle((l, h), 1, 1, fill=False, lw=2, ec="k"))
    a0.set(xlabel="layer", ylabel="head", title="heads -> final residual (path patching)")
    mlp = np.asarray(flu.mlp_effect)
    a1.bar(range(len(mlp)), mlp, color=["C3" if l in flu.layers else "C7" for l in range(len(mlp))])
    a1.axhline(flu.threshold, ls="--", c="k", lw=1)
    a1.set(xlabel="MLP layer", ylabel="effect", xticks=range(len(mlp)),
           title=f"MLPs -> layer {flu.extraction_layer} input (red: FLU)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# =========================================================================== design choices

def compare_localizations(pairs: dict, locs: dict, n_layers: int, model=None) -> pd.DataFrame:
    """One row per design choice {name: (default method, variant method)}: both localizations'
    MLP and attention layers, their parameter-weighted Jaccard overlap and how far the variant's
    mean depth (all matrices, 0 = first layer, 1 = last) sits from the default's."""
    rows = []
    for choice, (a, b) in pairs.items():
        if a not in locs or b not in locs:
            raise LocalizationError(f"{choice}: need localizations {a!r} and {b!r}, have {sorted(locs)}")
        la, lb = locs[a], locs[b]
        da, db = mean_depth(la, n_layers), mean_depth(lb, n_layers)
        rows.append({"choice": choice, "default": a, "variant": b,
                     "default MLPs": _ranges(la.mlp_layers), "variant MLPs": _ranges(lb.mlp_layers),
                     "default attn": _ranges(la.attn_layers), "variant attn": _ranges(lb.attn_layers),
                     "jaccard": jaccard(la, lb, model), "depth default": da, "depth variant": db,
                     "depth shift": db - da})
    return pd.DataFrame(rows).set_index("choice")


def design_choice_reading(table: pd.DataFrame, n_layers: int) -> list[str]:
    """Sentences computed from `compare_localizations`' table: which choice moves the most."""
    lines = []
    for choice, r in table.iterrows():
        shift = r["depth shift"] * (n_layers - 1)
        lines.append(f"{choice}: {r['default']} trains MLPs {r['default MLPs']} / attention {r['default attn']}; "
                     f"{r['variant']} trains MLPs {r['variant MLPs']} / attention {r['variant attn']}; "
                     f"overlap {r['jaccard']:.2f}, mean layer moves by {shift:+.1f}")
    if len(table):
        worst = table["jaccard"].idxmin()
        lines.append(f"the choice that moves the localization most: {worst} (overlap "
                     f"{table.loc[worst, 'jaccard']:.2f}); least: {table['jaccard'].idxmax()} "
                     f"(overlap {table['jaccard'].max():.2f})")
    return lines


def _unit(x):
    x = np.asarray(x, float)
    m = np.abs(x).max()
    return x / m if m > 0 else x


def plot_design_choices(curves: dict, selections: dict, n_layers: int, title: str = ""):
    """One figure, one panel per design choice: per-layer curves of the default and the variant
    (each scaled to its maximum) with the layers each one selects marked underneath.

    ``curves``: {choice: {label: per-layer values}}; ``selections``: {choice: {label: layers}}."""
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (choice, lines) in zip(axes[0], curves.items()):
        for i, (label, y) in enumerate(lines.items()):
            ax.plot(range(len(y)), _unit(y), marker="o", ms=3, label=label, color=f"C{i}")
            sel = selections.get(choice, {}).get(label, [])
            ax.scatter(sel, [-0.12 - 0.1 * i] * len(sel), marker="s", s=18, color=f"C{i}")
        ax.set(xlabel="layer", xticks=range(0, n_layers, 2), ylim=(-0.15 - 0.1 * len(lines), 1.08),
               title=choice)
        ax.axhline(0, c="k", lw=0.5)
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("score / max (squares: selected layers)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
