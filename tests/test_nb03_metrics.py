"""Notebook 03 (SMOKE run): every method edits, evaluations are complete and in range."""

import pytest

from mechunlearn_utils.edit.storage import load_edited, restore

pytestmark = pytest.mark.notebook
TASK = "athletes_to_sport"


def test_every_method_has_every_measure(smoke_metrics):
    m = smoke_metrics("03_editing_and_unlearning")
    methods = {k.split(".")[1] for k in m if k.startswith(TASK + ".") and k.endswith(".train.seconds")}
    assert methods, "no edit was trained"
    for method in methods | {"base"}:
        for fmt in ("normal", "question", "mcq"):
            for measure in ("forget", "maintain"):
                v = m[f"{TASK}.{method}.{measure}.{fmt}.p_true"]
                assert 0 <= v <= 1
        assert m[f"{TASK}.{method}.side.lm_loss"] > 0
        each = m[f"{TASK}.{method}.per_fact.side.lm_loss"]  # per held-out paragraph, for 07's interval
        assert 2 <= len(each) <= m["n_heldout_text"] and sum(each) / len(each) == pytest.approx(
            m[f"{TASK}.{method}.side.lm_loss"], rel=1e-4)
    assert m["weights_restored"] is True  # the notebook's bitwise weight check ran (it raises otherwise)
    assert m["protocol"] == "scaled" and (m["lm_context"], m["lm_positions"], m["lm_pool"]) == (64, 16, 0)


def test_edits_take_in_the_training_format(smoke_metrics):
    m = smoke_metrics("03_editing_and_unlearning")
    base = m[f"{TASK}.base.forget.normal.p_true"]
    assert base > 0.5, "the smoke forget set should be athletes the model knows"
    for method in ("flu", "random"):
        if f"{TASK}.{method}.forget.normal.p_true" in m:
            # the injected sport replaced the true one where the edit trained
            assert m[f"{TASK}.{method}.forget.normal.p_true"] < base - 0.3
            assert m[f"{TASK}.{method}.forget.normal.p_target"] > m[f"{TASK}.base.forget.normal.p_target"] + 0.3


def test_saved_edits_reload(smoke_metrics, smoke_results_dir):
    from mechunlearn_utils import load_model

    smoke_metrics("03_editing_and_unlearning")
    paths = sorted((smoke_results_dir / "03_editing_and_unlearning" / "edits" / TASK).glob("*.safetensors"))
    assert paths
    model = load_model("gemma-3-270m")
    before = {n: p.clone() for n, p in model.named_parameters().items() if "layers" in n}
    base = load_edited(model, paths[0])
    changed = [n for n, p in model.named_parameters().items() if "layers" in n and not (p == before[n]).all()]
    assert changed and set(changed) <= set(base)
    restore(model, base)
    assert all((p == before[n]).all() for n, p in model.named_parameters().items() if "layers" in n)


def test_sweep_is_recorded_and_its_choice_is_used(smoke_metrics):
    from mechunlearn_utils.edit.train import rank_settings

    m = smoke_metrics("03_editing_and_unlearning")
    swept = {k.split(".")[2] for k in m if k.startswith(f"sweep.{TASK}.")}
    assert swept, "the SMOKE run sweeps too"
    for method in swept:
        cols = ("lr", "forget_coef", "forget_p_true", "maintain_p_true")
        rows = [dict(zip(cols, vals)) for vals in zip(*(m[f"sweep.{TASK}.{method}.{c}"] for c in cols))]
        assert len(rows) == len({(r["lr"], r["forget_coef"]) for r in rows}) >= 2
        best = rank_settings(rows, m["sweep_forget_target"])[0]  # the training split decides, by the notebook's rule
        assert m[f"{TASK}.{method}.lr"] == pytest.approx(best["lr"])
        assert m[f"{TASK}.{method}.forget_coef"] == pytest.approx(best["forget_coef"])


def test_other_seeds_edit_other_athletes_and_take(smoke_metrics):
    """Section 4b: the edits at SEED + 1 evaluate as many facts as section 4's, other ones, and took
    (every forgotten athlete started above notebook 00's known threshold, 0.5)."""
    m = smoke_metrics("03_editing_and_unlearning")
    assert m["seeds"] == 2 and m["seed_methods"]
    for method in m["seed_methods"]:
        first = m[f"{TASK}.{method}.per_fact.forget.normal.p_true"]
        other = m[f"{TASK}.{method}.per_fact_seed1.forget.normal.p_true"]
        assert len(other) == len(first) and other != first, method
        assert sum(other) / len(other) < 0.5, method
        assert len(m[f"{TASK}.{method}.per_fact_seed1.side.lm_loss"]) == m["n_heldout_text"]
