"""Notebook 04 (probing latent knowledge), SMOKE run: probe curves of every edited model."""

import numpy as np
import pytest

from mechunlearn_utils.core.reproducibility import EVAL_ATOL

pytestmark = pytest.mark.notebook

POS = ("final", "subject")


@pytest.fixture(scope="module")
def m(smoke_metrics):
    return smoke_metrics("04_probing_latent_knowledge")


def _curve(m, t, meth, pos, label):
    return np.array(m[f"{t}.{meth}.{pos}.{label}_acc_by_layer"])


def test_every_edited_model_has_curves_in_range(m):
    L = m["n_layers"]
    assert m["tasks"] == ["athletes_to_sport"] and m["mid_layer"] == L // 2
    for t in m["tasks"]:
        methods = m[f"{t}.methods"]
        assert {"flu", "ap"} <= set(methods), methods
        assert m[f"{t}.n_probed"] > 0
        for meth in ["base", *methods]:
            for pos in POS:
                true, edit = _curve(m, t, meth, pos, "true"), _curve(m, t, meth, pos, "edit")
                assert len(true) == len(edit) == L
                assert ((0 <= true) & (true <= 1)).all() and ((0 <= edit) & (edit <= 1)).all()
                # the injected sport differs from the true one for every athlete: disjoint hits
                assert (true + edit <= 1 + 1e-9).all(), (meth, pos)
                assert m[f"{t}.{meth}.{pos}.true_acc.mid"] == true[L // 2]
                assert m[f"{t}.{meth}.{pos}.true_acc.back_half"] == pytest.approx(true[L // 2:].mean())


def test_base_probes_read_the_sport_of_athletes_they_never_saw(m):
    for t in m["tasks"]:
        for pos in POS:
            assert m[f"{t}.base.{pos}.true_acc.max"] >= 0.75, pos
        assert m[f"{t}.base.subject.edit_acc.mid"] <= 0.5


def test_each_edit_changes_the_residual_exactly_from_its_first_layer(m):
    for t in m["tasks"]:
        assert m[f"{t}.weights_restored"] is True, "the base weights did not come back bit for bit"
        assert 0 <= m[f"{t}.restore_rel_diff"] <= EVAL_ATOL  # re-read residuals: float rounding only
        for meth in m[f"{t}.methods"]:
            change = np.array(m[f"{t}.{meth}.resid_change_by_layer"])
            first = m[f"{t}.{meth}.first_edited_layer"]
            # Same process, same inputs, same weights below the edit: these layers run the same kernels
            # on the same bytes, so exact equality holds on any host (not a cross-host comparison).
            assert (change[:first] == 0).all(), f"{meth} changed layers below its first edited layer"
            assert change[first:].max() > 1e-3 and m[f"{t}.{meth}.resid_change"] == change[-1] > 0, meth
            for pos in POS:  # below the edit, the probes read exactly what they read on the base model
                for label in ("true", "edit"):
                    assert (_curve(m, t, meth, pos, label)[:first] == _curve(m, t, "base", pos, label)[:first]).all()


def test_flu_edit_rewrites_the_subject_representation(m):
    t = "athletes_to_sport"
    flu, base = m[f"{t}.flu.subject.true_acc.back_half"], m[f"{t}.base.subject.true_acc.back_half"]
    assert flu < base, f"after the FLU edit the true sport stays as decodable ({flu:.2f} vs base {base:.2f})"
    assert m[f"{t}.flu.subject.edit_acc.back_half"] > m[f"{t}.base.subject.edit_acc.back_half"]


def test_paper_protocol_probes_and_their_controls(m):
    """The paper's probes (fit on each edited model's maintain athletes, final token) with both controls."""
    L = m["n_layers"]
    for t in m["tasks"]:
        base_cv = _curve(m, t, "base", "paper.final", "maintain_cv")
        assert len(base_cv) == L and base_cv.max() >= 0.75  # the probe reads sports on the model it was fit on
        for meth in ["base", *m[f"{t}.methods"]]:
            curves = {lab: _curve(m, t, meth, "paper.final", lab) for lab in ("true", "shuffled", "maintain_cv")}
            assert all(len(c) == L and ((0 <= c) & (c <= 1)).all() for c in curves.values())
            # shuffled labels carry no sport: over the back half they read less than the real maintain probe
            assert curves["shuffled"][L // 2:].mean() < curves["maintain_cv"][L // 2:].mean(), meth
            hits = m[f"{t}.{meth}.paper.final.true_correct_mid"]
            assert len(hits) == m[f"{t}.n_probed"] and set(hits) <= {0.0, 1.0}
            assert np.mean(hits) == pytest.approx(m[f"{t}.{meth}.paper.final.true_acc.mid"])
        for meth in m[f"{t}.methods"]:  # same weights below the edit: the same residuals, the same probes
            first = m[f"{t}.{meth}.first_edited_layer"]
            for lab in ("true", "shuffled", "maintain_cv"):
                assert (_curve(m, t, meth, "paper.final", lab)[:first] == _curve(m, t, "base", "paper.final", lab)[:first]).all()
        lo, hi = m[f"{t}.latent_paper.ci.ap_minus_flu_low"], m[f"{t}.latent_paper.ci.ap_minus_flu_high"]
        assert -1 <= lo <= hi <= 1 and m[f"verdict_ci.latent_paper.{t}"] in {
            "reproduced", "not reproduced", "mixed", "inconclusive"}
