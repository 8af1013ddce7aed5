"""Depth sweep library on the tiny random model: windows, the lr rule, bitwise restore, metrics."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn_utils import attacks as A
from mechunlearn_utils.attacks import depth as D
from mechunlearn_utils.edit.storage import snapshot
from mechunlearn_utils.edit.train import EditConfig
from mechunlearn_utils.core.reproducibility import WeightsChangedError
from mechunlearn_utils.workbook.results import write_metrics


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.hf.state_dict().items()}


# --------------------------------------------------------------------------- windows

def test_window_starts_cover_the_depth():
    assert D.window_starts(18, 4, 3) == [0, 3, 6, 9, 12, 14]  # the deepest window is always included
    assert D.window_starts(18, 4, 2) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert D.window_starts(18, 4, 2, include_last=False)[-1] == 14
    assert D.window_starts(2, 1, 1) == [0, 1]
    with pytest.raises(D.DepthError, match="window size"):
        D.window_starts(18, 19, 1)
    with pytest.raises(D.DepthError, match="stride"):
        D.window_starts(18, 4, 0)


def test_window_params_are_every_mlp_matrix_of_the_window(tiny):
    one = D.window_params(tiny, 1, 1)
    assert one == [f"model.layers.1.mlp.{m}.weight" for m in ("down_proj", "gate_proj", "up_proj")]
    both = D.window_params(tiny, 0, 2)
    assert both[:3] == [f"model.layers.0.mlp.{m}.weight" for m in ("down_proj", "gate_proj", "up_proj")]
    assert both[3:] == one
    d, ff = tiny.hf.config.hidden_size, tiny.hf.config.intermediate_size
    assert D.n_weights(tiny, one) == 3 * d * ff  # parameter-matched: every window of k layers is the same size
    assert D.n_weights(tiny, D.window_params(tiny, 0, 1)) == D.n_weights(tiny, one)
    for bad in ((1, 2), (-1, 1), (0, 0)):
        with pytest.raises(D.DepthError, match="outside"):
            D.window_params(tiny, *bad)


# --------------------------------------------------------------------------- lr rule

ROWS = [dict(lr=1e-4, forget_p_true=0.01, maintain_p_true=0.7),
        dict(lr=1e-5, forget_p_true=0.50, maintain_p_true=0.9),
        dict(lr=3e-5, forget_p_true=0.08, maintain_p_true=0.8)]


def test_choose_lr_takes_the_smallest_lr_that_takes():
    best = D.choose_lr(ROWS, forget_target=0.1)
    assert best["lr"] == 3e-5 and best["took"] is True  # not 1e-4, though it forgot more
    assert D.choose_lr(ROWS, forget_target=0.005) == {**ROWS[0], "took": False}  # none took: forgot most
    assert D.choose_lr(ROWS, forget_target=0.6)["lr"] == 1e-5
    with pytest.raises(D.DepthError):
        D.choose_lr([], 0.1)


def _fake_training(monkeypatch, forget_by_lr):
    """train_edit sets the window's weights to lr (a marker); the measure reads forget_by_lr."""
    trained = []

    def fake_train(model, names, task, text, cfg, progress=False):
        trained.append(cfg.lr)
        with torch.no_grad():
            for p in D.select_parameters(model, names).values():
                p.fill_(cfg.lr)

    monkeypatch.setattr(D, "train_edit", fake_train)
    monkeypatch.setattr(D, "train_split_measures",
                        lambda model, task: dict(forget_p_true=forget_by_lr[trained[-1]], maintain_p_true=0.5))
    return trained


def test_select_lr_stops_at_the_first_lr_that_takes(tiny, task, monkeypatch):
    names = D.window_params(tiny, 1, 1)
    base = snapshot(tiny, names)
    trained = _fake_training(monkeypatch, {1e-5: 0.6, 3e-5: 0.05, 1e-4: 0.0, 3e-4: 0.0})
    try:
        chosen, rows = D.select_lr(tiny, names, task, [], [3e-4, 1e-4, 1e-5, 3e-5], EditConfig(), 0.1)
        assert trained == [1e-5, 3e-5] and [r["lr"] for r in rows] == trained  # ascending, then stop
        assert chosen["lr"] == 3e-5 and chosen["took"]
        assert all(torch.all(p == 3e-5) for p in D.select_parameters(tiny, names).values())  # its edit is on
    finally:
        D.restore(tiny, base)


def test_select_lr_keeps_the_best_trial_when_none_takes(tiny, task, monkeypatch):
    names = D.window_params(tiny, 0, 1)
    base = snapshot(tiny, names)
    trained = _fake_training(monkeypatch, {1e-5: 0.6, 3e-5: 0.3, 1e-4: 0.4})
    try:
        chosen, rows = D.select_lr(tiny, names, task, [], [1e-5, 3e-5, 1e-4], EditConfig(), 0.1)
        assert trained == [1e-5, 3e-5, 1e-4] and not chosen["took"] and chosen["lr"] == 3e-5
        assert all(torch.all(p == 3e-5) for p in D.select_parameters(tiny, names).values())
    finally:
        D.restore(tiny, base)


# --------------------------------------------------------------------------- one real window

@pytest.fixture(scope="module")
def window_row(tiny, task, text):
    cfg = D.DepthConfig(k=1, lrs=(1e-3, 3e-2), forget_target=0.3, languages=(),
                        edit=EditConfig(steps=3, batch_size=4, lm_context=8),
                        relearn=A.RelearnConfig(mode="lora", steps=2, lora_rank=4, lm_context=8))
    before = _state(tiny)
    base = D.base_measures(tiny, task, text[-2:], None, cfg)
    row = D.run_window(tiny, 1, task, text, text[-2:], base["lm_loss"], None, cfg)
    return before, base, row


def test_run_window_restores_every_weight_bitwise(tiny, window_row):
    before = window_row[0]
    after = tiny.hf.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_run_window_row_has_every_measure(window_row):
    _, base, row = window_row
    for key in ("forget_normal", "target_normal", "forget_question", "forget_para1", "forget_para2",
                "forget_para3", "maintain", "relearn_heldout", "relearn_train", "relearn_heldout_before"):
        assert 0 <= row[key] <= 1, key
        if key in base:
            assert 0 <= base[key] <= 1
    assert row["lr"] in (1e-3, 3e-2) and isinstance(row["took"], bool)
    assert row["trial_lrs"][-1] == row["lr"] or not row["took"]
    assert row["n_params"] == 3 * 64 * 128 and row["start"] == row["end"] == 1 and row["centre"] == 1
    assert math.isfinite(row["lm_loss_delta"]) and row["seconds"] >= row["seconds_edit"] > 0
    assert row["relearn_steps"] == [0, 1, 2] and len(row["relearn_heldout_by_step"]) == 3
    assert base["lm_loss_delta"] == 0.0  # the base row is defined as 0 (depth.base_measures), not computed
    # the per-athlete values behind the means (what the contrast's interval resamples)
    n_held = len(row["relearn_heldout_each"])
    assert n_held >= 1 and sum(row["relearn_heldout_each"]) / n_held == pytest.approx(row["relearn_heldout"], abs=1e-6)
    unseen = [row[f"forget_{f}"] for f in ("question", "para1", "para2", "para3")]
    assert sum(row["forget_unseen_each"]) / len(row["forget_unseen_each"]) == pytest.approx(sum(unseen) / 4, abs=1e-6)
    assert not any(k.endswith("_each") for k in base)  # the base row stays scalar


def test_window_metrics_are_flat_and_writable(window_row, tmp_path):
    frame = pd.DataFrame([window_row[2]]).set_index("start", drop=False)
    m = D.window_metrics(frame)
    assert m["window.1.end"] == 1 and isinstance(m["window.1.took"], bool)
    assert isinstance(m["window.1.trial_lrs"], list) and "window.1.start" not in m
    assert write_metrics(tmp_path, D.STEM, m).exists()


def test_run_window_fails_when_the_base_is_not_restored(tiny, task, text, monkeypatch):
    """run_window digests the window before and checks it after (`assert_weights_restored`)."""
    names = D.window_params(tiny, 0, 1)
    base, real_restore = snapshot(tiny, names), D.restore

    def restore_off_by_one_ulp(model, saved):
        real_restore(model, saved)
        with torch.no_grad():
            w = D.select_parameters(model, names)[names[0]]
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))

    cfg = D.DepthConfig(k=1, lrs=(1e-2,), edit=EditConfig(steps=1, batch_size=2, lm_coef=0.0),
                        formats=(), languages=(), relearn=None)
    monkeypatch.setattr(D, "restore", restore_off_by_one_ulp)
    try:
        with pytest.raises(WeightsChangedError, match="window MLP 0"):
            D.run_window(tiny, 0, task, text, [], None, None, cfg)
    finally:
        monkeypatch.undo()
        D.restore(tiny, base)


# --------------------------------------------------------------------------- marks, figure, reading

def test_saturation_layer_and_marks_with_fallbacks():
    curve = [0.33, 0.5, 0.8, 0.97, 0.99, 1.0, 0.99]
    assert D.saturation_layer(curve) == 3  # first layer at 95% of the way from 0.33 to 1.0
    marks, notes = D.depth_marks({"sports.probe.saturation_layer": 4, "sports.extraction_heads.min_layer": 9})
    assert (marks["probe_saturation_layer"], marks["extraction_min_layer"], notes) == (4, 9, [])
    marks, notes = D.depth_marks({"sports.probe.name_only": curve, "sports.flu.extraction_heads": ["11.2", "8.0"]})
    assert (marks["probe_saturation_layer"], marks["extraction_min_layer"]) == (3, 8)
    assert len(notes) == 2 and all("02_localization" in n for n in notes)
    marks, notes = D.depth_marks(None)
    assert marks["probe_saturation_layer"] is None and marks["extraction_min_layer"] is None
    assert len(notes) == 2 and all("run" in n for n in notes)


def _frame(k=4):
    starts = [0, 4, 8, 12]
    rows = []
    for i, s in enumerate(starts):
        v = 0.05 + 0.25 * i
        rows.append(dict(start=s, end=s + k - 1, centre=s + (k - 1) / 2, lr=[1e-5, 3e-5, 1e-4, 3e-4][i], took=i < 3,
                         forget_normal=0.02 + 0.05 * i, forget_question=v, forget_para1=v, forget_para2=v,
                         forget_para3=v, forget_fr=v, forget_de=v, forget_es=v, maintain=0.9 - 0.01 * i,
                         lm_loss_delta=0.1 - 0.02 * i, relearn_heldout=v, relearn_train=0.9))
    return pd.DataFrame(rows).set_index("start", drop=False)


def test_stage_of_and_summary():
    marks = {"probe_saturation_layer": 5, "extraction_min_layer": 8}
    assert [D.stage_of(s, 4, marks) for s in (0, 2, 4, 8, 12)] == ["lookup", "lookup", "between", "extraction",
                                                                    "extraction"]
    s = D.stage_summary(_frame(), marks, 4, ["relearn_heldout"])
    assert s["lookup.n_windows"] == 1 and s["extraction.n_windows"] == 2
    assert s["lookup.relearn_heldout"] == pytest.approx(0.05)
    assert s["extraction.relearn_heldout"] == pytest.approx(0.675)


def test_stage_contrast_interval_resamples_athletes():
    marks = {"probe_saturation_layer": 5, "extraction_min_layer": 8}
    frame = _frame()
    rng = np.random.default_rng(0)
    low, high = rng.uniform(0, 0.1, 10), rng.uniform(0.5, 0.9, 10)  # 10 athletes, lookup edits hold
    frame["relearn_heldout_each"] = [list(low), list(low), list(high), list(high)]
    lo, hi = D.stage_contrast_ci(frame, marks, 4, "relearn_heldout_each")
    assert 0.3 < lo < (high - low).mean() < hi  # extraction - lookup, > 0: the paper's side
    m = D.contrast_metrics(frame, marks, 4)
    assert m == {"contrast.relearn_heldout.ci_low": lo, "contrast.relearn_heldout.ci_high": hi}
    assert D.stage_contrast_ci(frame, {"probe_saturation_layer": None, "extraction_min_layer": None}, 4,
                               "relearn_heldout_each") is None
    text = "\n".join(D.reading_guide(frame, {}, marks, 4))
    assert f"held-out after relearning [{lo:+.3f}, {hi:+.3f}] (lookup lower)" in text


def test_reading_guide_is_computed_from_the_numbers():
    frame = _frame()
    base = dict(forget_normal=0.8, forget_question=0.8, forget_para1=0.8, forget_para2=0.8, forget_para3=0.8,
                forget_fr=0.7, forget_de=0.7, forget_es=0.7, maintain=0.9, relearn_heldout=0.8, relearn_train=0.8)
    lines = D.reading_guide(frame, base, {"probe_saturation_layer": 5, "extraction_min_layer": 8}, 4)
    text = "\n".join(lines)
    assert "3 of 4 windows" in text and "MLPs 12-15 3e-04 (never took)" in text
    assert "lowest 0.050 (MLPs 0-3), highest 0.800 (MLPs 12-15)" in text and "+1.00" in text
    assert "0.050 vs 0.675" in text
    lines = D.reading_guide(frame, base, {"probe_saturation_layer": None, "extraction_min_layer": None}, 4)
    assert "not computed" in lines[-1]


def test_plot_has_four_panels_and_the_marks():
    import matplotlib.pyplot as plt

    fig = D.plot_depth_sweep(_frame(), {"forget_normal": 0.8, "maintain": 0.9},
                             {"probe_saturation_layer": 5, "extraction_min_layer": 8}, 4, "t")
    assert len(fig.axes) == 5  # four panels + the LM-loss axis of the side-effects panel
    assert all(sum(list(l.get_xdata()) == [5, 5] for l in ax.lines) == 1 for ax in fig.axes[:4])
    assert not fig.axes[2].collections  # no per-athlete values: no band
    plt.close(fig)
    frame = _frame().assign(relearn_heldout_each=[[0.0, 0.1, 0.2]] * 4, forget_unseen_each=[[0.5, 0.5, 0.5]] * 4)
    assert D.unseen_columns(frame)[1] == ["forget_fr", "forget_de", "forget_es"]  # lists are not languages
    fig = D.plot_depth_sweep(frame, {}, {}, 4)
    (band,) = fig.axes[2].collections  # the relearning panel's interval over the athletes
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.0) and ys.max() == pytest.approx(0.2)  # the widest bootstrap means
    plt.close(fig)
