"""Notebook 06's library on the tiny model: masks apply and come off exactly, training moves them,
binarizing keeps the N most-changed weights, the sweep and its summary, bad input."""

import pandas as pd
import pytest
import torch

from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.evaluate.suite import evaluate_task, final_logits
from mechunlearn_utils.edit.masking import (MaskConfig, MaskError, MaskResult, binary_masks, edit_measures, mask_eval,
                                       mask_widget,
                                       masked, owners, plot_mask_sweep, smallest_n, sweep_n, top_changed,
                                       train_mask)
from mechunlearn_utils.core.reproducibility import EVAL_ATOL
from mechunlearn_utils.data.tasks import make_task

LOC = ["model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]


@pytest.fixture(scope="module")
def trained(tiny, task, text):
    cfg = MaskConfig(steps=15, lr=0.05, l1_coef=1e-4, batch_size=4, lm_context=8)
    return train_mask(tiny, LOC, task, text, cfg, progress=False)


def _logits(model):
    batch = model.tokenize(["Fact : Michael Jordan plays the sport of", "Fact : Babe Ruth plays the sport of"])
    with torch.no_grad():
        return final_logits(model, **batch)


def test_masked_multiplies_and_restores_the_same_parameters_exactly(tiny):
    named = dict(tiny.hf.named_parameters())
    before = {n: (named[n], named[n].detach().clone()) for n in LOC}
    layout = {n: (named[n].data_ptr(), named[n].stride(), named[n].is_contiguous()) for n in LOC}
    base = _logits(tiny)
    half = {n: torch.full_like(named[n], 0.5) for n in LOC}
    with masked(tiny, half):
        mod, attr = tiny.hf.model.layers[1].mlp.down_proj, "weight"
        assert torch.allclose(getattr(mod, attr), 0.5 * before[LOC[0]][1])
        assert not torch.allclose(_logits(tiny), base)
    with masked(tiny, {n: torch.ones_like(named[n]) for n in LOC}):
        assert torch.allclose(_logits(tiny), base)  # m = 1 is the base model
    after = dict(tiny.hf.named_parameters())
    for n, (param, value) in before.items():
        assert after[n] is param and torch.equal(after[n], value)
        # same storage and layout too: a re-allocated or strided weight could run another kernel
        assert (after[n].data_ptr(), after[n].stride(), after[n].is_contiguous()) == layout[n]
    # The weights are the proof (bitwise, above); an evaluation is compared within EVAL_ATOL only.
    assert torch.allclose(_logits(tiny), base, rtol=0, atol=EVAL_ATOL)


def test_masked_restores_on_error_and_rejects_bad_masks(tiny):
    named = dict(tiny.hf.named_parameters())
    value = named[LOC[0]].detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with masked(tiny, {LOC[0]: torch.zeros_like(value)}):
            raise RuntimeError("boom")
    assert torch.equal(dict(tiny.hf.named_parameters())[LOC[0]], value)
    with pytest.raises(MaskError, match="shape"):
        with masked(tiny, {LOC[0]: torch.ones(3)}):
            pass
    with pytest.raises(MaskError, match="not in"):
        owners(tiny, ["model.layers.9.mlp.up_proj.weight"])
    with pytest.raises(MaskError, match="no parameters"):
        owners(tiny, [])


def test_train_mask_moves_masks_in_range_and_leaves_weights(tiny, task, trained):
    named = dict(tiny.hf.named_parameters())
    assert set(trained.scores) == set(LOC)
    s = torch.cat([v.flatten() for v in trained.scores.values()])
    assert s.min() >= 0 and s.max() <= 1 and 0 < trained.n_changed <= trained.n_weights
    assert trained.n_weights == sum(named[n].numel() for n in LOC)
    h = trained.history
    assert len(h) == 15 and h[-1]["forget"] < h[0]["forget"], "masking did not lower the forget loss"
    assert h[0]["changed"] == 0.0 and h[-1]["changed"] > 0
    assert not any(n.endswith("original") for n, _ in tiny.hf.named_parameters())  # parametrizations gone


def test_a_stronger_l1_changes_fewer_weights(tiny, task, text, trained):
    strong = train_mask(tiny, LOC, task, text, MaskConfig(steps=15, lr=0.05, l1_coef=3e-3, batch_size=4,
                                                          lm_context=8), progress=False)
    assert strong.n_changed < trained.n_changed


def test_train_mask_bad_input(tiny, task, text):
    with pytest.raises(MaskError, match="steps"):
        train_mask(tiny, LOC, task, text, MaskConfig(steps=0), progress=False)
    with pytest.raises(MaskError, match="optimizer"):
        train_mask(tiny, LOC, task, text, MaskConfig(optimizer="rmsprop"), progress=False)
    with pytest.raises(MaskError, match="no parameters"):
        train_mask(tiny, [], task, text, progress=False)


def test_top_changed_and_binary_masks():
    scores = {"a": torch.tensor([[0.0, 0.9], [0.2, 0.0]]), "b": torch.tensor([0.5, 0.0, 0.95])}
    ranked = top_changed(scores, 10)
    assert ranked == [("b", 2), ("a", 1), ("b", 0), ("a", 2)]  # only the 4 weights that changed
    m = binary_masks(scores, ranked, 2)
    assert torch.equal(m["a"], torch.tensor([[1.0, 0.0], [1.0, 1.0]])) and torch.equal(m["b"], torch.tensor([1.0, 1.0, 0.0]))
    assert set(binary_masks(scores, ranked, 1)) == {"b"}
    with pytest.raises(MaskError, match="positive"):
        top_changed(scores, 0)
    with pytest.raises(MaskError, match="positive"):
        binary_masks(scores, ranked, 0)
    with pytest.raises(MaskError, match="only 4"):
        binary_masks(scores, ranked, 5)
    with pytest.raises(MaskError, match="changed no weight"):
        top_changed({"a": torch.zeros(3)}, 2)
    with pytest.raises(MaskError, match="empty"):
        top_changed({}, 2)


def test_sweep_masks_n_weights_and_restores(tiny, task, trained):
    named = dict(tiny.hf.named_parameters())
    before = {n: named[n].detach().clone() for n in LOC}
    base = edit_measures(tiny, task, formats=("normal", "question"))
    curve = sweep_n(tiny, task, trained, n_grid=[1, 10, 100, 10 ** 9], progress=False)
    assert curve.N.tolist() == [1, 10, 100, trained.n_changed]  # the grid stops at the changed count
    assert curve["forget.normal.p_true"].between(0, 1).all()
    big = curve.iloc[-1]
    assert abs(big["forget.normal.p_true"] - base["forget.normal.p_true"]) > 1e-4, "masking changed nothing"
    assert all(torch.equal(dict(tiny.hf.named_parameters())[n], v) for n, v in before.items())
    with pytest.raises(MaskError, match="positive"):
        sweep_n(tiny, task, trained, n_grid=[0, 10], progress=False)
    ranked = top_changed(trained.scores, 5)
    r = mask_eval(tiny, task, binary_masks(trained.scores, ranked, 5))
    assert set(r) >= {"forget.normal.p_true", "maintain.normal.p_true", "forget.question.p_true"}
    fig = plot_mask_sweep(curve.assign(method="x"), base, "question", title="tiny")
    assert len(fig.axes) == 3
    ui = mask_widget(tiny, task, {"x": trained})
    (_, n, button), out = ui.children[0].children, ui.children[1]
    opened = out.value  # before any click: the default N's result
    default = min(n.value, trained.n_changed)
    assert f"N={n.value}" in opened and f"N={default}" in opened and "forget.normal.p_true" in opened
    n.value = 5
    button.click()
    assert "N=5" in out.value and f"{r['forget.normal.p_true']:.3f}" in out.value  # the 5 most-changed weights
    n.value = 0
    button.click()
    assert "must be positive" in out.value


def test_edit_measures_equal_evaluate_task(tiny, task):
    fast = edit_measures(tiny, task, formats=("normal", "mcq"), maintain_formats=("normal", "mcq"))
    full = evaluate_task(tiny, task, formats=("normal", "mcq"))
    assert set(fast) == {k for k in full if "acc" not in k}
    assert all(fast[k] == pytest.approx(full[k], abs=1e-6) for k in fast)
    cf = make_task("athletes_to_sport", athletes=load_athletes().head(12), n=2)
    cf.kind = "counterfact"
    with pytest.raises(MaskError, match="sports"):
        edit_measures(tiny, cf)


def test_smallest_n():
    curve = pd.DataFrame({"N": [10, 100, 1000], "forget.normal.p_true": [0.9, 0.4, 0.2]})
    assert smallest_n(curve) == 100
    assert smallest_n(curve, threshold=0.1) is None


def test_mask_result_counts_changed_weights():
    r = MaskResult(["a"], {}, {"a": torch.tensor([0.0, 0.3, 1.0])}, n_weights=3)
    assert r.n_changed == 2
