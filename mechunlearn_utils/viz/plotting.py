"""Plots shared by several notebooks (seaborn / matplotlib)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def edit_summary_plot(rows: pd.DataFrame, kind: str, title: str = ""):
    """Per method: forget (training format) vs maintain, and vs forget in an unseen format.

    `rows`: one row per method with the columns of `evals.evaluate_task`.
    """
    train_fmt, other_fmt = ("normal", "question") if kind == "sports" else ("prompt", "paraphrase")
    df = rows.reset_index().rename(columns={"index": "method"})
    df = df.rename(columns={df.columns[0]: "method"})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [(f"forget.{train_fmt}.p_true", f"maintain.{train_fmt}.p_true", "maintain (training format)"),
              (f"forget.{train_fmt}.p_true", f"forget.{other_fmt}.p_true", f"forget, {other_fmt} format"),
              (f"forget.{train_fmt}.p_true", "forget.mcq.p_true", "forget, multiple choice")]
    for ax, (x, y, label) in zip(axes, panels):
        if x in df and y in df:
            sns.scatterplot(df, x=x, y=y, hue="method", s=70, ax=ax, legend=ax is axes[-1])
            ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="forget p(true), training format", ylabel=label)
    if axes[-1].get_legend():
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig
