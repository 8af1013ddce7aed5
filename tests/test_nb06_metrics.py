"""Notebook 06 (weight masking), SMOKE run: masks train, binarized sweeps, smallest N, restore."""

import numpy as np
import pytest

from mechunlearn_utils.core.reproducibility import EVAL_ATOL

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def m(smoke_metrics):
    return smoke_metrics("06_weight_masking")


def test_settings_and_restore(m):
    assert m["task"] == "athletes_to_sport" and m["gen_format"] in ("mcq", "question")
    assert m["methods"] and set(m["methods"]) <= {"flu", "ap", "random"}
    assert m["weights_restored"] is True, "a mask was left on the model"
    assert 0 <= m["restore_gap"] <= EVAL_ATOL  # evaluations: float rounding only (reproducibility.py)
    assert 0 < m["forget_threshold"] < 1


def test_masks_train_and_stay_sparse_enough(m):
    for meth in m["methods"]:
        assert 0 < m[f"{meth}.n_changed"] <= m[f"{meth}.n_weights"], meth
        assert m[f"{meth}.forget_loss_last"] < m[f"{meth}.forget_loss_first"], f"{meth}: masking did not learn"
        assert m[f"{meth}.train_seconds"] > 0


def test_sweep_curves_are_consistent(m):
    for meth in m["methods"]:
        n = np.array(m[f"{meth}.N"])
        assert len(n) >= 2 and (n > 0).all() and (np.diff(n) > 0).all() and n[-1] <= m[f"{meth}.n_changed"]
        for key in ("forget_p_true", "forget_p_target", "maintain_p_true", "gen_forget_p_true"):
            v = np.array(m[f"{meth}.{key}"])
            assert len(v) == len(n) and ((0 <= v) & (v <= 1)).all(), (meth, key)


def test_zeroing_the_most_changed_weights_moves_the_answer(m):
    moved = {meth: m["base.forget.normal.p_true"] - m[f"{meth}.forget_p_true"][-1] for meth in m["methods"]}
    assert max(moved.values()) > 0.1, f"binarized masks barely change the forget answer: {moved}"
    flu = m["methods"].index("flu") if "flu" in m["methods"] else None
    if flu is not None:
        assert m["flu.forget_p_target"][-1] > m["base.forget.normal.p_target"], "FLU mask: the injected sport did not gain"


def test_smallest_n_matches_its_curve(m):
    thr = m["forget_threshold"]
    for meth in m["methods"]:
        n, f, small = m[f"{meth}.N"], m[f"{meth}.forget_p_true"], m[f"{meth}.smallest_n"]
        if small == -1:
            assert min(f) >= thr and m[f"{meth}.maintain_drop_at_smallest_n"] == -1.0
            continue
        i = n.index(small)
        assert f[i] < thr and all(x >= thr for x in f[:i]), meth
        assert m[f"{meth}.maintain_drop_at_smallest_n"] == pytest.approx(
            m["base.maintain.normal.p_true"] - m[f"{meth}.maintain_p_true"][i])
