"""Pure functions behind widgets and shared plots."""

import pandas as pd
import pytest

from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.viz.plotting import edit_summary_plot
from mechunlearn_utils.viz.widgets import edit_fact_widget, edit_one_athlete

LATE = ["model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def test_edit_one_athlete_moves_the_new_answer_and_restores(tiny):
    athletes = load_athletes().groupby("sport").head(8).reset_index(drop=True)
    before = {n: p.clone() for n, p in tiny.named_parameters().items()}
    name = athletes.athlete.iloc[0]
    table = edit_one_athlete(tiny, LATE, athletes, name, "golf", steps=30, lr=3e-2, general_text=[" ".join(load_athletes().athlete)])
    assert table.loc[("after", "normal"), "p(golf)"] > table.loc[("before", "normal"), "p(golf)"]
    assert all((p == before[n]).all() for n, p in tiny.named_parameters().items())
    with pytest.raises(ValueError, match="already plays"):
        edit_one_athlete(tiny, LATE, athletes, name, athletes.sport.iloc[0])
    with pytest.raises(ValueError, match="not among"):
        edit_one_athlete(tiny, LATE, athletes, "Nobody Atall", "golf")


def test_widget_builds(tiny):
    class Loc:
        params = LATE
    ui = edit_fact_widget(tiny, {"late": Loc()}, load_athletes().head(6), [])
    assert len(ui.children) == 3


def test_edit_summary_plot_has_three_panels():
    rows = pd.DataFrame({"forget.normal.p_true": [0.1, 0.5], "maintain.normal.p_true": [0.8, 0.9],
                         "forget.question.p_true": [0.2, 0.6], "forget.mcq.p_true": [0.3, 0.3]},
                        index=["flu", "ap"])
    fig = edit_summary_plot(rows, "sports", "t")
    assert len(fig.axes) == 3 and len(fig.axes[0].collections) >= 1
