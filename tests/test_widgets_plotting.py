"""Pure functions behind widgets and shared plots: a widget's controls drive its output; plots draw
the data they are given."""

import numpy as np
import pandas as pd
import pytest

from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES
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


def test_widget_controls_drive_the_edit_it_shows(tiny, capsys):
    """Set the dropdowns and the slider, press the button: the table shown is the edit asked for;
    another sport gives another table; a sport the athlete already plays gives the error."""
    class Loc:
        params = LATE
    athletes = load_athletes().groupby("sport").head(4).reset_index(drop=True)
    ui = edit_fact_widget(tiny, {"late": Loc()}, athletes, [])
    (_, athlete), (sport, steps, button) = ui.children[0].children, ui.children[1].children
    assert list(sport.options) == list(EDIT_CANDIDATES)
    row = athletes.iloc[5]
    athlete.value, steps.value = row.athlete, 5
    capsys.readouterr()
    sport.value = "golf"
    button.click()
    first = capsys.readouterr().out
    assert "p(golf)" in first and f"p({row.sport})" in first and "after" in first
    other = next(s for s in EDIT_CANDIDATES if s not in (row.sport, "golf"))
    sport.value = other
    button.click()
    second = capsys.readouterr().out
    assert f"p({other})" in second and "p(golf)" not in second
    sport.value = row.sport
    button.click()
    assert "already plays" in capsys.readouterr().out


def test_edit_summary_plot_draws_each_method_at_its_numbers():
    rows = pd.DataFrame({"forget.normal.p_true": [0.1, 0.5], "maintain.normal.p_true": [0.8, 0.9],
                         "forget.question.p_true": [0.2, 0.6], "forget.mcq.p_true": [0.3, 0.35]},
                        index=["flu", "ap"])
    fig = edit_summary_plot(rows, "sports", "t")
    assert len(fig.axes) == 3
    ys = ["maintain.normal.p_true", "forget.question.p_true", "forget.mcq.p_true"]
    for ax, y in zip(fig.axes, ys):
        points = np.concatenate([c.get_offsets() for c in ax.collections])
        np.testing.assert_allclose(points, rows[["forget.normal.p_true", y]].to_numpy())
        assert ax.get_xlabel() == "forget p(true), training format"
    assert [ax.get_ylabel() for ax in fig.axes] == ["maintain (training format)", "forget, question format",
                                                     "forget, multiple choice"]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["flu", "ap"]
