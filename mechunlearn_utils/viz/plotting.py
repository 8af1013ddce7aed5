"""Plots shared by several notebooks (seaborn / matplotlib).

Every plot that compares methods draws each method with its own colour *and* marker (`METHOD_STYLE`),
so points that coincide stay distinguishable; forget probabilities, which edits push towards 0, are
drawn on a log axis clipped at `FORGET_FLOOR` so saturated edits do not stack at x = 0.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

FORGET_FLOOR = 1e-4  # forget p(true) below this is drawn at it (a log axis has no 0)
_ORDER = ("flu", "ap", "ct", "random", "nonlocalized", "extraction", "base", "all_mlps", "ap_mlp", "ct_mlp", "manual")
_MARKERS = ("o", "s", "D", "X", "P", "^", "*", "v", "<", ">", "h", "p", "8", "d")


def method_style(method: str) -> dict:
    """Colour and marker of a method, the same in every plot (unknown methods get the next free ones)."""
    import zlib

    i = _ORDER.index(method) if method in _ORDER else len(_ORDER) + zlib.crc32(method.encode()) % 7  # stable
    return dict(color=sns.color_palette("tab10", 10)[i % 10], marker=_MARKERS[i % len(_MARKERS)])


def method_scatter(ax, frame: pd.DataFrame, x: str, y: str, hollow: bool = False, log_x: bool = True,
                   size: float = 70, label_suffix: str = "", spread: pd.DataFrame | None = None):
    """One point per row of `frame` (indexed by method) at (`x`, `y`), in the method's style; hollow
    markers for reference points (the paper's). With `log_x`, x is clipped at `FORGET_FLOOR`.
    Methods are drawn (and listed) in the workbook's order: flu, ap, ct, random, ...
    `spread`: indexed by method, columns ``<measure>.low`` / ``<measure>.high`` (a 95% interval over
    facts, `evaluate.verdicts.spread_table`): drawn as error bars where present."""
    rank = {m: i for i, m in enumerate(_ORDER)}
    frame = frame.loc[sorted(frame.index, key=lambda m: (rank.get(str(m), len(rank)), str(m)))]
    for method, row in frame.iterrows():
        if pd.isna(row.get(x)) or pd.isna(row.get(y)):
            continue
        st = method_style(str(method))
        xv = max(float(row[x]), FORGET_FLOOR) if log_x else float(row[x])
        ax.scatter([xv], [float(row[y])], s=size, marker=st["marker"], label=f"{method}{label_suffix}",
                   facecolors="none" if hollow else st["color"], edgecolors=st["color"], linewidths=1.5, zorder=3)
        if spread is not None and method in spread.index:
            _error_bars(ax, spread.loc[method], x, y, xv, float(row[y]), st["color"], log_x)
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(FORGET_FLOOR * 0.6, 1.6)
    else:
        ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)


def _error_bars(ax, lims: pd.Series, x: str, y: str, xv: float, yv: float, color, log_x: bool):
    def err(measure, v, floor):
        lo, hi = lims.get(f"{measure}.low"), lims.get(f"{measure}.high")
        if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
            return None
        return [[max(v - max(float(lo), floor), 0.0)], [max(max(float(hi), floor) - v, 0.0)]]

    xerr, yerr = err(x, xv, FORGET_FLOOR if log_x else -np.inf), err(y, yv, -np.inf)
    if xerr is not None or yerr is not None:
        ax.errorbar([xv], [yv], xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=1, alpha=0.6,
                    capsize=2, zorder=2)


def spread_wide(spread: pd.DataFrame | None, task: str | None = None) -> pd.DataFrame | None:
    """A `spread_table` (long: task, method, measure, low, high) as method x ``<measure>.low/.high``."""
    if spread is None or spread.empty:
        return None
    d = spread if task is None else spread[spread.task == task]
    wide = d.pivot_table(index="method", columns="measure", values=["low", "high"])
    wide.columns = [f"{measure}.{bound}" for bound, measure in wide.columns]
    return wide


def edit_summary_plot(rows: pd.DataFrame, kind: str, title: str = "", spread: pd.DataFrame | None = None):
    """Per method: forget (training format) vs maintain, and vs forget in an unseen format.

    `rows`: one row per method with the columns of `evaluate.suite.evaluate_task`; `spread`: the
    task's `spread_table` (error bars: 95% intervals over the evaluated facts).
    """
    spread = spread_wide(spread)
    train_fmt, other_fmt = ("normal", "question") if kind == "sports" else ("prompt", "paraphrase")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [(f"forget.{train_fmt}.p_true", f"maintain.{train_fmt}.p_true", "maintain (training format)"),
              (f"forget.{train_fmt}.p_true", f"forget.{other_fmt}.p_true", f"forget, {other_fmt} format"),
              (f"forget.{train_fmt}.p_true", "forget.mcq.p_true", "forget, multiple choice")]
    for ax, (x, y, label) in zip(axes, panels):
        if x in rows and y in rows:
            method_scatter(ax, rows, x, y, spread=spread)
            ax.set(xlabel="forget p(true), training format (log)", ylabel=label)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def pareto_plot(ours: pd.DataFrame, paper: pd.DataFrame | None = None, tasks=None,
                spread: pd.DataFrame | None = None):
    """Forget vs maintain in the training format, one panel per task: this run's methods (filled) and
    the paper's (hollow, same colour and marker) where the paper reports the same two measures.

    `ours` / `paper`: long tables with columns task, method, measure, value (`workbook.results.
    metrics_long`; the paper's with its table mapped to our task names); `spread`: our points' 95%
    intervals over facts (`evaluate.verdicts.spread_table`), drawn as error bars."""
    tasks = sorted(ours.task.unique()) if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("no task to plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        fmt = "prompt" if task == "counterfact" else "normal"
        x, y = f"forget.{fmt}.p_true", f"maintain.{fmt}.p_true"
        for frame, hollow, suffix in ((ours, False, ""), (paper, True, " (paper)")):
            if frame is None or frame.empty:
                continue
            d = frame[(frame.task == task) & frame.measure.isin([x, y])]
            wide = d.pivot_table(index="method", columns="measure", values="value")
            if x in wide and y in wide:
                method_scatter(ax, wide, x, y, hollow=hollow, label_suffix=suffix,
                               spread=None if hollow else spread_wide(spread, task))
        ax.set(title=task, xlabel=f"forget p(true), {fmt} (log; < {FORGET_FLOOR:g} drawn at it)",
               ylabel=f"maintain p(true), {fmt}")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    fig.tight_layout()
    return fig
