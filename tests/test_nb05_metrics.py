"""Notebook 05 (SMOKE run): every attack ran on every smoke edit and moved what it should."""

import math

import pytest

pytestmark = pytest.mark.notebook

TASK = "athletes_to_sport"  # the task notebook 03 edits in SMOKE mode
VARIANTS = ("relearn_lora", "relearn_full", "relearn_2ath")
FORMATS = ("question", "mcq", "para1", "para2", "para3")
LANGS = ("fr", "de", "es")


@pytest.fixture(scope="module")
def m(smoke_metrics):
    return smoke_metrics("05_attacks")


def test_edits_found_and_took(m):
    assert m["smoke"] is True and m["weights_restored"] is True  # the bitwise weight check ran
    assert {"flu", "ap"} <= set(m["methods"])
    base = m[f"{TASK}.base.edit.forget_p_true"]
    assert base > 0.5  # the forget athletes are ones the base model knows
    for meth in m["methods"]:
        assert 0 <= m[f"{TASK}.{meth}.edit.heldout_p_true"] <= 1
        assert m[f"{TASK}.{meth}.edit.forget_p_true"] < base  # the edit lowered p(true)


def test_relearning_curves(m):
    for meth in m["methods"]:
        edit_heldout = m[f"{TASK}.{meth}.edit.heldout_p_true"]
        for v in VARIANTS:
            steps = m[f"{TASK}.{meth}.{v}.steps"]
            curve = m[f"{TASK}.{meth}.{v}.forget_p_true_by_step"]
            train = m[f"{TASK}.{meth}.{v}.train_p_true_by_step"]
            assert steps[0] == 0 and steps[-1] >= 1 and len(curve) == len(steps) == len(train)
            assert all(0 <= p <= 1 for p in curve + train)
            # step 0 is the edited model itself (the LoRA adapter starts as a no-op)
            assert curve[0] == pytest.approx(edit_heldout, abs=1e-4), (meth, v)
            # the attack changes the model: the athletes it trains on move, by 1e-4 or by 10% (p spans
            # 1e-5 after FLU to 0.3 after extraction; one SMOKE step of full fine-tuning at lr 3e-6 in
            # bf16 took FLU's 1.6e-5 to 2.2e-5, measured)
            assert abs(train[-1] - train[0]) > 1e-4 or abs(math.log(train[-1] / train[0])) > 0.1, (meth, v)
            if v != "relearn_2ath":
                assert train[-1] > train[0], (meth, v)
            assert m[f"{TASK}.{meth}.recovered.{v}"] == pytest.approx(curve[-1] - curve[0], abs=1e-6)
        assert m[f"{TASK}.{meth}.relearn20.normal.p_true"] == m[f"{TASK}.{meth}.relearn_lora.forget_p_true_by_step"][-1]


def test_soft_prompt(m):
    for meth in m["methods"]:
        p = m[f"{TASK}.{meth}.soft_prompt.forget_p_true"]
        assert 0 <= p <= 1 and m[f"{TASK}.{meth}.soft_prompt.p_true"] == p
        assert m[f"{TASK}.{meth}.soft_prompt.train_loss"] > 0
        assert m[f"{TASK}.{meth}.recovered.soft_prompt"] == pytest.approx(
            p - m[f"{TASK}.{meth}.edit.heldout_p_true"], abs=1e-6)


def test_formats_and_languages(m):
    for meth in [*m["methods"], "base"]:
        for f in FORMATS:
            assert 0 <= m[f"{TASK}.{meth}.format.{f}.forget_p_true"] <= 1
        for lang in LANGS:
            assert 0 <= m[f"{TASK}.{meth}.lang.{lang}.forget_p_true"] <= 1
    for lang in LANGS:
        # the base model answers in every language (else a low edited number would mean nothing)
        assert m[f"base.lang.{lang}.accuracy"] > 0.5 and m[f"base.lang.{lang}.n"] > 0
        assert m[f"{TASK}.base.lang.{lang}.forget_p_true"] > 0.4
    assert m[f"{TASK}.flu.recovered.lang.fr"] == pytest.approx(
        m[f"{TASK}.flu.lang.fr.forget_p_true"] - m[f"{TASK}.flu.edit.forget_p_true"], abs=1e-6)


def test_quantization(m):
    for meth in m["methods"]:
        for q in ("int8", "int4"):
            assert 0 <= m[f"{TASK}.{meth}.quant_{q}.forget_p_true"] <= 1
            assert 0 <= m[f"{TASK}.{meth}.quant_{q}.base_p_true"] <= 1
            assert 0 <= m[f"{TASK}.{meth}.quant_{q}.erased_frac"] <= 1
        # an int4 step is 127/7 = 18x an int8 step: the same edit measures 18x fewer steps
        ratio = m[f"{TASK}.{meth}.quant_int8.edit_in_steps"] / m[f"{TASK}.{meth}.quant_int4.edit_in_steps"]
        assert ratio == pytest.approx(127 / 7, rel=1e-3)
        assert m[f"{TASK}.{meth}.quant_int4.erased_frac"] >= m[f"{TASK}.{meth}.quant_int8.erased_frac"]
        # int8 barely moves the base model with the same matrices quantized
        assert abs(m[f"{TASK}.{meth}.quant_int8.base_p_true"] - m[f"{TASK}.base.edit.forget_p_true"]) < 0.1


def test_positive_control_is_recorded(m):
    assert "extraction" in m["methods"], "notebook 03's smoke run must save the extraction-stage control edit"
    curve = m[f"{TASK}.extraction.relearn_lora.forget_p_true_by_step"]
    assert m[f"{TASK}.control.gain"] == pytest.approx(curve[-1] - curve[0], abs=1e-6)
    assert isinstance(m[f"{TASK}.control.attack_has_power"], bool)


def test_relearning_intervals(m):
    for meth in m["methods"]:
        for v in VARIANTS:
            lo, hi = m[f"{TASK}.{meth}.{v}.heldout_ci_low"], m[f"{TASK}.{meth}.{v}.heldout_ci_high"]
            assert 0 <= lo <= m[f"{TASK}.{meth}.{v}.forget_p_true_by_step"][-1] <= hi <= 1, (meth, v)
    for v in VARIANTS:
        assert m[f"verdict_ci.{v}.{TASK}"] in {"reproduced", "not reproduced", "mixed", "inconclusive",
                                               "not measured"}
    assert m["protocol"] == "scaled" and not any(".paper_soft_prompt." in k for k in m)  # off by default


def test_soft_prompt_interval(m):
    """The soft-prompt verdict with its paired bootstrap interval over the held-out athletes."""
    assert m[f"verdict_ci.soft_prompt.{TASK}"] in {"reproduced", "not reproduced", "mixed", "inconclusive"}
    lo, hi = m[f"{TASK}.soft_prompt.ci.ap_minus_flu_low"], m[f"{TASK}.soft_prompt.ci.ap_minus_flu_high"]
    assert -1 <= lo <= hi <= 1


def test_relearning_verdict_pooled_over_splits(m):
    """SMOKE runs RELEARN_SPLITS = 2: each athlete's held-out p(true) averaged over the splits that held it out."""
    assert m["relearn_splits"] == 2 and m[f"{TASK}.relearn_lora_splits.n_splits"] == 2
    assert m[f"{TASK}.relearn_lora_splits.n_athletes"] >= 2
    assert m[f"verdict_ci.relearn_lora_splits.{TASK}"] in {"reproduced", "not reproduced", "mixed", "inconclusive"}
    assert set(m["split_methods"]) == {"flu", "ap", "ct"} & set(m["methods"])  # SPLIT_METHODS that 03 edited
    for meth in m["methods"]:
        if meth in m["split_methods"]:
            assert 0 <= m[f"{TASK}.{meth}.relearn_lora_splits.heldout_mean"] <= 1
        else:  # relearned on the first split only
            assert f"{TASK}.{meth}.relearn_lora_splits.heldout_mean" not in m
    lo, hi = m[f"{TASK}.relearn_lora_splits.ci.ap_minus_flu_low"], m[f"{TASK}.relearn_lora_splits.ci.ap_minus_flu_high"]
    assert -1 <= lo <= hi <= 1


def test_soft_prompt_verdict_pooled_over_splits(m):
    """The soft prompt of FLU, AP and CT is trained again on the second split: its verdict pools both."""
    assert m[f"{TASK}.soft_prompt_splits.n_splits"] == 2 and m[f"{TASK}.soft_prompt_splits.n_athletes"] >= 2
    assert m[f"verdict_ci.soft_prompt_splits.{TASK}"] in {"reproduced", "not reproduced", "mixed", "inconclusive"}
    assert set(m["soft_prompt_split_methods"]) == {"flu", "ap", "ct"} & set(m["methods"])
    for meth in m["soft_prompt_split_methods"]:
        assert 0 <= m[f"{TASK}.{meth}.soft_prompt_splits.heldout_mean"] <= 1
    lo, hi = m[f"{TASK}.soft_prompt_splits.ci.ap_minus_flu_low"], m[f"{TASK}.soft_prompt_splits.ci.ap_minus_flu_high"]
    assert -1 <= lo <= hi <= 1
