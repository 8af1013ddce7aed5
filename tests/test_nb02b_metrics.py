"""Notebook 02b (SMOKE run): every window is edited at its own lr, measured, restored; curves complete."""

import pytest

from mechunlearn_utils.attacks.depth import choose_lr

pytestmark = pytest.mark.notebook
STEM = "02b_depth_sweep"
MEASURES = ("forget_normal", "target_normal", "forget_question", "forget_para1", "forget_para2", "forget_para3",
            "forget_fr", "forget_de", "forget_es", "maintain", "relearn_heldout", "relearn_train")


def test_every_window_has_every_measure(smoke_metrics):
    m = smoke_metrics(STEM)
    starts = m["window_starts"]
    assert len(starts) == 2 and starts[0] == 0 and starts[-1] == 18 - m["k"]  # SMOKE: shallowest and deepest
    for s in starts:
        for key in MEASURES:
            assert 0 <= m[f"window.{s}.{key}"] <= 1, key
        assert m[f"window.{s}.lm_loss_delta"] == pytest.approx(m[f"window.{s}.lm_loss"] - m["base.lm_loss"])
        assert m[f"window.{s}.n_params"] == m["n_params_per_window"]  # parameter-matched
        assert m[f"window.{s}.seconds"] > 0 and isinstance(m[f"window.{s}.took"], bool)
    for key in (*MEASURES, "lr", "took", "lm_loss_delta", "seconds"):
        assert len(m[f"curve.{key}"]) == len(starts)
    for key in MEASURES:
        assert 0 <= m[f"base.{key}"] <= 1
    assert m["base.forget_normal"] > 0.5, "the forget athletes are ones the model knows"


def test_each_window_uses_the_smallest_lr_that_took(smoke_metrics):
    m = smoke_metrics(STEM)
    for s in m["window_starts"]:
        lrs, forget = m[f"window.{s}.trial_lrs"], m[f"window.{s}.trial_forget"]
        assert lrs == sorted(lrs) and set(lrs) <= set(m["lrs"])
        rows = [dict(lr=lr, forget_p_true=f) for lr, f in zip(lrs, forget)]
        best = choose_lr(rows, m["forget_target"])
        assert m[f"window.{s}.lr"] == pytest.approx(best["lr"]) and m[f"window.{s}.took"] == best["took"]
        if best["took"]:  # the search stops at the first lr that takes
            assert lrs[-1] == best["lr"] and all(f > m["forget_target"] for f in forget[:-1])
        else:
            assert lrs == sorted(m["lrs"])


def test_edits_move_the_training_format(smoke_metrics):
    m = smoke_metrics(STEM)
    took = [s for s in m["window_starts"] if m[f"window.{s}.took"]]
    assert took, "the shallowest window should take on the grid even in SMOKE mode"
    for s in took:
        assert m[f"window.{s}.forget_normal"] < m["base.forget_normal"] - 0.3
        assert m[f"window.{s}.target_normal"] > m["base.target_normal"] + 0.3


def test_marks_and_settings_are_recorded(smoke_metrics):
    m = smoke_metrics(STEM)
    for key in ("probe_saturation_layer", "extraction_min_layer"):
        v = m[f"marks.{key}"]
        assert v is None or 0 <= v < 18
        assert isinstance(m[f"marks.{key.split('_')[0]}_source"], str)
    assert m["k"] >= 1 and m["stride"] >= 1 and 0 < m["decoder_share"] < 1
    assert m["seconds_total"] > 0 and m["smoke"] is True
