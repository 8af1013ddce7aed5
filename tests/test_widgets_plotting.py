"""Pure functions behind widgets and shared plots: a widget's controls drive its output; plots draw
the data they are given."""

import numpy as np
import pandas as pd
import pytest

from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES
from mechunlearn_utils.viz.plotting import edit_summary_plot
from mechunlearn_utils.viz.widgets import balanced_maintain, edit_fact_widget, edit_one_athlete, query_saved_edit

LATE = ["model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def test_edit_one_athlete_moves_the_new_answer_and_restores(tiny):
    athletes = load_athletes().groupby("sport").head(8).reset_index(drop=True)
    before = {n: p.clone() for n, p in tiny.named_parameters().items()}
    name = athletes.athlete.iloc[0]
    text = [" ".join(load_athletes().athlete)]
    seen = []
    result = edit_one_athlete(tiny, LATE, athletes, name, "golf", steps=30, lr=3e-2, general_text=text,
                              heldout_text=text, on_step=seen.append)
    table = result.answers
    assert [r["step"] for r in seen] == list(range(30)) and result.lr == 3e-2
    side = result.side_effects
    assert list(side.index) == ["maintain p(true)", "LM loss (held-out text)"]
    assert side.loc["maintain p(true)", ["before", "after"]].between(0, 1).all()
    assert np.allclose(side.change, side.after - side.before, atol=1e-3) and (side.change != 0).any()
    assert table.loc[("after", "normal"), "p(golf)"] > table.loc[("before", "normal"), "p(golf)"]
    assert all((p == before[n]).all() for n, p in tiny.named_parameters().items())
    with pytest.raises(ValueError, match="already plays"):
        edit_one_athlete(tiny, LATE, athletes, name, athletes.sport.iloc[0])
    with pytest.raises(ValueError, match="not among"):
        edit_one_athlete(tiny, LATE, athletes, "Nobody Atall", "golf")


def test_query_saved_edit_shows_the_saved_edit_without_training(tiny, tmp_path):
    """A saved edit of an editing task, queried on one of its athletes: the injected sport rises
    after, the lr is the edit's, nothing trains, the base weights come back bit for bit."""
    from mechunlearn_utils.data.tasks import make_task
    from mechunlearn_utils.edit.storage import restore, save_edit, snapshot
    from mechunlearn_utils.edit.train import EditConfig, train_edit

    athletes = load_athletes().groupby("sport").head(8).reset_index(drop=True)
    task = make_task("athletes_to_sport", athletes=athletes, n=4, seed=0)
    base = snapshot(tiny, LATE)
    cfg = EditConfig(steps=30, lr=3e-2, batch_size=4, lm_coef=0.0)
    train_edit(tiny, LATE, task, [], cfg, progress=False)
    path = save_edit(tiny, LATE, tmp_path / "flu", {"task": task.name, "task_meta": task.meta, "config": vars(cfg)})
    restore(tiny, base)
    before = {n: p.clone() for n, p in tiny.named_parameters().items()}
    result = query_saved_edit(tiny, path, athletes)
    first = task.train_forget.iloc[0]
    table = result.answers
    assert result.lr == 3e-2 and f"p({first.target})" in table.columns
    assert table.loc[("after", "normal"), f"p({first.target})"] > table.loc[("before", "normal"), f"p({first.target})"]
    assert all((p == before[n]).all() for n, p in tiny.named_parameters().items())
    with pytest.raises(ValueError, match="not an athlete this edit changed"):
        query_saved_edit(tiny, path, athletes, athlete=task.train_maintain.athlete.iloc[0])


def test_widget_controls_drive_the_edit_it_shows(tiny, capsys):
    """Set the dropdowns and the slider, press the button: the table shown is the edit asked for;
    another sport gives another table; a sport the athlete already plays gives the error."""
    class Loc:
        params = LATE
    athletes = load_athletes().groupby("sport").head(4).reset_index(drop=True)
    ui = edit_fact_widget(tiny, {"late": Loc()}, athletes, [], heldout_text=[" ".join(load_athletes().athlete)],
                          lrs={"late": 1e-3})
    (_, athlete), (sport, steps, button) = ui.children[0].children, ui.children[1].children
    bar = ui.children[2]
    assert list(sport.options) == list(EDIT_CANDIDATES)
    row = athletes.iloc[5]
    athlete.value, steps.value = row.athlete, 5
    capsys.readouterr()
    sport.value = "golf"
    button.click()
    first = capsys.readouterr().out
    assert "p(golf)" in first and f"p({row.sport})" in first and "after" in first
    assert (bar.value, bar.max) == (5, 5)  # the progress bar followed every training step
    assert "lr 0.001" in first and "maintain p(true)" in first and "LM loss (held-out text)" in first
    assert "change" in first and "3 baseball, 3 basketball, 3 football" in first  # balanced; 3: the edited sport's rest
    other = next(s for s in EDIT_CANDIDATES if s not in (row.sport, "golf"))
    sport.value = other
    button.click()
    second = capsys.readouterr().out
    assert f"p({other})" in second and "p(golf)" not in second
    sport.value = row.sport
    button.click()
    assert "already plays" in capsys.readouterr().out


def test_maintain_set_is_balanced_over_sports_and_leaves_out_the_edited_athlete():
    athletes = load_athletes().groupby("sport").head(7).reset_index(drop=True)
    edited = athletes.athlete.iloc[0]
    maintain = balanced_maintain(athletes, edited, per_sport=5)
    assert edited not in set(maintain.athlete) and maintain.athlete.is_unique
    assert maintain.sport.value_counts().tolist() == [5] * athletes.sport.nunique()
    assert set(maintain.athlete) <= set(athletes.athlete)
    small = balanced_maintain(athletes, edited, per_sport=50)  # capped by the smallest sport (the edited one's: 6 left)
    assert small.sport.value_counts().tolist() == [6] * athletes.sport.nunique()


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
        assert ax.get_xlabel() == "forget p(true), training format (log)" and ax.get_xscale() == "log"
    assert [ax.get_ylabel() for ax in fig.axes] == ["maintain (training format)", "forget, question format",
                                                     "forget, multiple choice"]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["flu", "ap"]


def test_pareto_plot_gives_each_method_a_marker_clips_at_the_floor_and_draws_the_paper_hollow():
    from mechunlearn_utils.viz.plotting import FORGET_FLOOR, method_style, pareto_plot

    ours = pd.DataFrame([("t", m, f"{s}.normal.p_true", v) for m, f, mt in
                         (("flu", 0.0, 0.9), ("ap", 0.0, 0.8), ("ct", 0.02, 0.95))
                         for s, v in (("forget", f), ("maintain", mt))], columns=["task", "method", "measure", "value"])
    paper = pd.DataFrame([("t", "flu", "forget.normal.p_true", 0.007), ("t", "flu", "maintain.normal.p_true", 0.895)],
                         columns=["task", "method", "measure", "value"])
    fig = pareto_plot(ours, paper)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.collections) == 4
    got = {c.get_label(): c for c in ax.collections}
    assert tuple(got["flu"].get_offsets()[0]) == (FORGET_FLOOR, 0.9)  # saturated at 0: drawn at the floor
    assert tuple(got["ap"].get_offsets()[0]) == (FORGET_FLOOR, 0.8)
    assert tuple(got["ct"].get_offsets()[0]) == pytest.approx((0.02, 0.95))
    assert tuple(got["flu (paper)"].get_offsets()[0]) == pytest.approx((0.007, 0.895))
    assert len(got["flu (paper)"].get_facecolor()) == 0 and got["flu"].get_facecolor()[0][-1] == 1  # hollow / filled
    assert len({method_style(m)["marker"] for m in ("flu", "ap", "ct", "random", "nonlocalized", "extraction")}) == 6
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["flu", "ap", "ct", "flu (paper)"]
    with pytest.raises(ValueError, match="no task"):
        pareto_plot(ours.iloc[:0])


def test_pareto_plot_draws_each_methods_interval_over_facts():
    from mechunlearn_utils.evaluate.verdicts import spread_table
    from mechunlearn_utils.viz.plotting import FORGET_FLOOR, pareto_plot

    each = {("t", "flu"): {"forget.normal.p_true": [0.0, 0.0, 0.1, 0.3], "maintain.normal.p_true": [0.8, 0.9, 1.0, 0.9]},
            ("t", "ap"): {"forget.normal.p_true": [0.5, 0.5, 0.5, 0.5], "maintain.normal.p_true": [0.7, 0.7, 0.7, 0.7]}}
    spread = spread_table(each)
    assert set(spread.columns) == {"task", "method", "measure", "mean", "low", "high"} and len(spread) == 4
    flu = spread[(spread.method == "flu") & (spread.measure == "forget.normal.p_true")].iloc[0]
    assert flu["mean"] == pytest.approx(0.1) and flu.low < 0.1 < flu.high
    ours = spread.rename(columns={"mean": "value"})[["task", "method", "measure", "value"]]
    fig = pareto_plot(ours, spread=spread)
    bars = [c for c in fig.axes[0].containers if c.has_xerr]
    assert len(bars) == 2  # one per method, in the plot order flu, ap
    (xbar,) = bars[0].lines[2][0].get_segments()
    assert xbar[0][0] == pytest.approx(max(flu.low, FORGET_FLOOR)) and xbar[1][0] == pytest.approx(flu.high)
    (ap_bar,) = bars[1].lines[2][0].get_segments()
    assert ap_bar[0][0] == pytest.approx(ap_bar[1][0]) == pytest.approx(0.5)  # AP's facts agree: no width
    assert len(pareto_plot(ours).axes[0].containers) == 0  # no spread given: no bars

