"""Every exercise check accepts its solution and rejects a wrong answer (tiny random model)."""

import numpy as np
import pytest
import torch

from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.data.prompts import SPORTS, sport_prompt
from mechunlearn_utils.workbook import exercises as E


@pytest.fixture(scope="module")
def athletes():
    return load_athletes().groupby("sport").head(16).reset_index(drop=True)


@pytest.fixture(scope="module")
def pair(tiny, athletes):
    """Two athletes of different sports whose prompts have equal token length."""
    rows = list(athletes.itertuples())
    for a in rows:
        for b in rows:
            pa, pb = sport_prompt(a.athlete), sport_prompt(b.athlete)
            if a.sport != b.sport and len(tiny.encode(pa)) == len(tiny.encode(pb)):
                answer = tiny.answer_token_id(" " + a.sport)
                others = [tiny.answer_token_id(" " + s) for s in SPORTS if s != a.sport]
                return pa, pb, answer, others, tiny.subject_positions(pa, a.athlete)[-1]
    pytest.skip("no pair of equal token length")


def rejects(check, *args, match=None):
    with pytest.raises(AssertionError, match=match):
        check(*args)


def test_compare_names_the_difference():
    E.compare("x", [1.0, 2.0], [1.0, 2.0])
    with pytest.raises(AssertionError, match="index \\(1,\\): got 3, expected 2"):
        E.compare("x", [1.0, 3.0], [1.0, 2.0])
    with pytest.raises(AssertionError, match="shape"):
        E.compare("x", [1.0], [1.0, 2.0])
    with pytest.raises(AssertionError, match="fill in the stub"):
        E.compare("x", None, [1.0])


def test_p_norm(tiny, athletes, capsys):
    prompts = [sport_prompt(a) for a in athletes.athlete[:4]]
    cands, answers = [" " + s for s in SPORTS], [" " + s for s in athletes.sport[:4]]
    E.check_p_norm(E.solution_p_norm, tiny, prompts, cands, answers)
    assert "correct" in capsys.readouterr().out
    raw = lambda m, p, c, a: float(torch.softmax(m.hf(torch.tensor([m.encode(p)])).logits[0, -1], -1)  # noqa: E731
                                   [m.answer_token_id(a)])
    rejects(E.check_p_norm, raw, tiny, prompts, cands, answers, match="p_norm")


def test_logit_lens(tiny):
    prompt, answer = sport_prompt("Michael Jordan"), tiny.answer_token_id(" basketball")
    E.check_logit_lens(E.solution_logit_lens, tiny, prompt, answer)
    no_norm = lambda m, p, a: torch.softmax(  # noqa: E731 - forgets the final norm
        m.hf.lm_head(torch.stack([m.tl.run_with_cache(torch.tensor([m.encode(p)]))[1]
                                  [f"blocks.{l}.hook_resid_post"][0, -1] for l in range(m.n_layers)])), -1)[:, a]
    rejects(E.check_logit_lens, no_norm, tiny, prompt, answer, match="by layer")


def test_patch_hook(tiny, pair):
    clean, corrupt, answer, others, pos = pair
    E.check_patch_hook(E.solution_patch_hook, tiny, clean, corrupt, answer, others, pos)

    def wrong(value, position):  # patches the wrong position
        return E.solution_patch_hook(value, position - 1)
    rejects(E.check_patch_hook, wrong, tiny, clean, corrupt, answer, others, pos, match="restore")


def test_attribution(tiny):
    from mechunlearn_utils import localize as lz

    all_facts = lz.sports_facts(tiny, load_athletes())
    top = lz.run_sites(tiny, all_facts.batch()).logits.gather(1, all_facts.cand_ids).argmax(1)
    facts = all_facts.subset([i for i in range(len(all_facts)) if top[i] == all_facts.correct[i]][:8])
    E.check_attribution(E.solution_attribution, tiny, facts, layer=1)
    flipped = lambda g, clean, corrupt: E.solution_attribution(g, corrupt, clean)  # noqa: E731
    rejects(E.check_attribution, flipped, tiny, facts, 1, match="AP estimate")


def test_losses():
    E.check_edit_loss(E.solution_edit_loss)
    E.check_unlearn_loss(E.solution_unlearn_loss)
    rejects(E.check_edit_loss, lambda lp: -lp.sum(), match="edit loss")
    rejects(E.check_unlearn_loss, lambda lp: -torch.log1p(-lp.exp().clamp(max=1 - 1e-6)).mean(),
            match="unlearn loss")  # no e^-5 floor
    rejects(E.check_unlearn_loss, lambda lp: None, match="scalar tensor")


def test_probe_curve(tiny, athletes):
    E.check_probe_curve(E.solution_probe_curve, tiny, athletes, n=24)
    train_acc = lambda tx, ty, vx, vy: E.solution_probe_curve(tx, ty, tx, ty)  # noqa: E731
    rejects(E.check_probe_curve, train_acc, tiny, athletes, 24, match="probe accuracy")


def test_fake_quantize(tiny):
    w = tiny.hf.model.layers[0].mlp.down_proj.weight
    E.check_fake_quantize(E.solution_fake_quantize, w)
    per_tensor = lambda w, b: torch.round(w / (w.abs().max() / (2 ** (b - 1) - 1))) * (  # noqa: E731
        w.abs().max() / (2 ** (b - 1) - 1))
    rejects(E.check_fake_quantize, per_tensor, w, match="round trip")


def test_masks(tiny):
    w = tiny.hf.model.layers[0].mlp.up_proj.weight
    E.check_masked_weight(E.solution_masked_weight, w)
    rejects(E.check_masked_weight, lambda m, w: torch.sigmoid(m) * w, w, match="masked weight")
    E.check_binary_mask(E.solution_binary_mask, w)
    lowest = lambda s, n: E.solution_binary_mask(-s, n)  # noqa: E731
    rejects(E.check_binary_mask, lowest, w, match="binary mask")


def test_verdict():
    E.check_verdict(E.solution_verdict)
    rejects(E.check_verdict, lambda v, m, lower: "reproduced" if v["flu"] < min(v["ap"], v.get("ct", 1)) else "no",
            match="verdict")


def test_every_exercise_has_a_solution_and_a_check():
    names = {n[len("solution_"):] for n in dir(E) if n.startswith("solution_")}
    assert names == {n[len("check_"):] for n in dir(E) if n.startswith("check_")}
    assert len(names) == 11 and np.all([callable(getattr(E, f"check_{n}")) for n in names])
