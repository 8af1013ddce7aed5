"""Plots of the circuit analyses (logit lens, patching heatmaps, layer x head tables, restoration
curves) and the per-athlete patching heatmap widget (seaborn, ipywidgets)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


def plot_logit_lens(lens: pd.DataFrame, highlight: pd.DataFrame | None = None, label: str = "",
                    ax=None):
    """Lines over layers: mean p_norm and p_correct (with 95% CI); optionally one prompt dashed."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    long = lens.melt(id_vars=["layer"], value_vars=["p_norm", "p_correct"], var_name="measure")
    sns.lineplot(long, x="layer", y="value", hue="measure", marker="o", ax=ax)
    if highlight is not None:
        for col, c in (("p_norm", "C0"), ("p_correct", "C1")):
            ax.plot(highlight.layer, highlight[col], ls="--", c=c, label=f"{col} ({label})")
    ax.axhline(1 / 3, c="grey", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(ylim=(0, 1.02), ylabel="probability of the right sport", title="Logit lens at the final token")
    ax.legend(fontsize=8)
    return ax.figure


def plot_patching_heatmaps(arrays: dict, xlabels, title: str = "", vmax: float = 1.0):
    """One layer x position heatmap per component (restoration; 0 corrupt, 1 clean)."""
    comps = list(arrays)
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 4.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, comp in zip(axes, comps):
        data = np.asarray(arrays[comp])
        sns.heatmap(data, ax=ax, cmap="RdBu_r", center=0, vmin=-vmax, vmax=vmax,
                    xticklabels=list(xlabels), yticklabels=True, cbar=ax is axes[-1])
        ax.set(title=comp, xlabel="position")
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7, rotation=90)
        ax.tick_params(axis="y", labelsize=7, rotation=0)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


TRACE_CMAPS = {"resid_pre": "Purples", "mlp_out": "Greens", "attn_out": "Reds"}  # ROME's colours


def plot_token_trace(trace, title: str = ""):
    """ROME's causal-trace figure: per kind, p(right answer) after restoring one (position, layer)
    of the noised run, positions down (subject tokens starred), layers across (a `TokenTrace`)."""
    kinds = list(trace.p)
    labels = [f"{t}*" if i in trace.subject_positions else t for i, t in enumerate(trace.labels)]
    lo = min(trace.p_noised, *(float(v.min()) for v in trace.p.values()))
    hi = max(trace.p_clean, *(float(v.max()) for v in trace.p.values()))
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.2 + 0.35 * len(trace.layers) * len(kinds) + 1.5 * len(kinds),
                                                     0.28 * len(labels) + 1.6), sharey=True)
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        sns.heatmap(trace.p[kind], ax=ax, cmap=TRACE_CMAPS.get(kind, "viridis"), vmin=lo, vmax=hi,
                    xticklabels=trace.layers, yticklabels=labels, cbar_kws={"label": "p(answer)"})
        ax.set(title=f"restore {kind}", xlabel="layer")
        ax.tick_params(axis="y", labelsize=7, rotation=0)
    np.atleast_1d(axes)[0].set_ylabel("restored position (* subject)")
    fig.suptitle(f"{title}  (clean p {trace.p_clean:.3f}, noised p {trace.p_noised:.3f})")
    fig.tight_layout()
    return fig


def plot_layer_by_head(matrix, title: str, cbar_label: str, center=None, fmt=".2f"):
    """Heatmap of a [layer x column] table (DLA per head/MLP, attention per head, ...)."""
    data = pd.DataFrame(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * data.shape[1], 0.32 * data.shape[0] + 1.2))
    sns.heatmap(data, ax=ax, cmap="RdBu_r" if center is not None else "viridis", center=center,
                annot=True, fmt=fmt, annot_kws={"size": 7}, cbar_kws={"label": cbar_label})
    ax.invert_yaxis()
    ax.set(title=title, ylabel="layer")
    fig.tight_layout()
    return fig


def plot_restore_curves(sites: pd.DataFrame, title: str = "Restoration by layer"):
    """Mean (95% CI) restoration per layer for every (component, site) of a `patch_sites` table."""
    data = sites.assign(where=sites.component + " @ " + sites.site)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    sns.lineplot(data, x="layer", y="restore", hue="where", marker="o", ax=ax)
    ax.axhline(0, c="grey", lw=0.8)
    ax.axhline(1, c="grey", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(title=title, ylabel="fraction restored (0 corrupt, 1 clean)")
    ax.legend(fontsize=8)
    return fig


def figure_png(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def athlete_heatmap_widget(model, pairs: pd.DataFrame, components=("resid_pre", "mlp_out", "attn_out"),
                           precomputed: dict | None = None):
    """Dropdown of athletes -> their patching heatmaps (`activation_patching` +
    `plot_patching_heatmaps`). `precomputed`: {athlete: PatchingResult} already at hand.

    The figure is shown as an `ipywidgets.Image` (PNG bytes), not through an Output widget: the
    notebook runner (nbclient) mimics Output widgets with extra messages that can stall papermill.
    """
    import ipywidgets as widgets

    from mechunlearn_utils.interp.patching import activation_patching

    if len(pairs) == 0:
        raise ValueError("no clean/corrupt pairs to choose from")
    results = dict(precomputed or {})
    by_name = {p.athlete: p for p in pairs.itertuples(index=False)}
    dropdown = widgets.Dropdown(options=list(by_name), description="athlete")
    status = widgets.Label()
    image = widgets.Image(format="png")

    def render(athlete: str) -> bytes:
        pair = by_name[athlete]
        if athlete not in results:
            results[athlete] = activation_patching(model, pair.clean_prompt, pair.corrupt_prompt,
                                                   pair.answer_id, pair.other_ids, components,
                                                   progress=False)
        res = results[athlete]
        return figure_png(plot_patching_heatmaps(
            {c: res[c] for c in components}, res.tokens,
            f"{pair.athlete} ({pair.sport}) vs {pair.corrupt_athlete} ({pair.corrupt_sport})"))

    def show(change=None):
        status.value = f"patching {dropdown.value} ..."
        image.value = render(dropdown.value)
        status.value = ""

    dropdown.observe(show, names="value")
    show()
    return widgets.VBox([widgets.HBox([dropdown, status]), image])
