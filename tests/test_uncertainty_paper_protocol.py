"""Issue 15, the parts that add measurements: the paired bootstrap and the verdict with intervals,
the paper's relearning preset, the paper's soft-prompt adversary, the paper's prompt formats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn_utils import attacks as A
from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.data.prompts import PAPER_MCQ_ORDER, PAPER_SYSTEM_PROMPT, sport_prompts
from mechunlearn_utils.evaluate.verdicts import bootstrap_ci, ci_columns, ci_metrics, ci_verdict, diff_ci

ATHLETES = pd.DataFrame({
    "athlete": ["Michael Jordan", "LeBron James", "Babe Ruth", "Derek Jeter", "Tom Brady", "Peyton Manning",
                "Kobe Bryant", "Joe Montana"],
    "sport": ["basketball", "basketball", "baseball", "baseball", "football", "football", "basketball",
              "football"],
})


# --------------------------------------------------------------------------- bootstrap and verdicts

def test_bootstrap_ci_brackets_the_mean_and_is_fixed_by_seed():
    v = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and 0.1 <= lo and hi <= 0.8
    assert bootstrap_ci(v, seed=0) == (lo, hi)
    assert bootstrap_ci(v, level=0.5)[1] - bootstrap_ci(v, level=0.5)[0] < hi - lo  # narrower at 50%
    assert bootstrap_ci([0.3] * 5) == (0.3, 0.3)  # no spread, no width
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_diff_ci_is_paired():
    a = np.array([0.9, 0.5, 0.7, 0.3, 0.8])
    b = a - 0.1  # the same facts, each 0.1 lower: a paired CI has no width, an unpaired one would
    lo, hi = diff_ci(a, b)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shape"):
        diff_ci(a, b[:3])


def test_ci_verdict_rules():
    flu = np.array([0.1, 0.2, 0.1, 0.15, 0.2, 0.1])
    high = flu + np.array([0.5, 0.6, 0.4, 0.5, 0.7, 0.6])
    noisy = flu + np.array([0.3, -0.3, 0.2, -0.2, 0.1, -0.1])
    assert ci_verdict({"flu": flu, "ap": high, "ct": high})[0] == "reproduced"
    assert ci_verdict({"flu": high, "ap": flu, "ct": flu})[0] == "not reproduced"
    assert ci_verdict({"flu": flu, "ap": high, "ct": noisy})[0] == "inconclusive"
    assert ci_verdict({"flu": flu, "ap": high, "ct": flu - 0.05})[0] == "mixed"
    verdict, cis = ci_verdict({"flu": high, "ap": flu}, lower_is_better=False)
    assert verdict == "reproduced" and cis["ap"][0] > 0  # higher is better: FLU above AP
    assert ci_verdict({"ap": flu})[0] == "not measured"


def test_ci_columns_and_metrics_carry_each_rivals_interval():
    cis = {"ap": (0.12, 0.4), "ct": (-0.05, 0.2)}
    cols = ci_columns(cis)
    assert cols["ap-flu CI"] == "[+0.120, +0.400]" and cols["ct-flu CI"] == "[-0.050, +0.200]"
    assert cols["cis"] == cis and cols["cis"] is not cis  # kept whole, not aliased
    m = ci_metrics("athletes_to_sport", "relearn_lora", "inconclusive", cis)
    assert m == {"verdict_ci.relearn_lora.athletes_to_sport": "inconclusive",
                 "athletes_to_sport.relearn_lora.ci.ap_minus_flu_low": 0.12,
                 "athletes_to_sport.relearn_lora.ci.ap_minus_flu_high": 0.4,
                 "athletes_to_sport.relearn_lora.ci.ct_minus_flu_low": -0.05,
                 "athletes_to_sport.relearn_lora.ci.ct_minus_flu_high": 0.2}


# --------------------------------------------------------------------------- paper formats

def test_paper_formats_are_the_papers_texts():
    q = sport_prompts(["Michael Jordan"], ["basketball"], "paper_question")
    assert q.prompts[0].startswith(PAPER_SYSTEM_PROMPT + " Question: What sport does Tiger Woods play? Answer: golf\n")
    assert q.prompts[0].endswith("Question: What sport does Michael Jordan play? Answer:")
    m = sport_prompts(["Michael Jordan", "Tom Brady"], ["basketball", "football"], "paper_mcq")
    assert m.candidates[0] == [" A", " B", " C", " D"] and m.correct == [2, 0]
    assert PAPER_MCQ_ORDER == ("football", "baseball", "basketball", "golf")
    opts = "A: Football\nB: Baseball\nC: Basketball\nD: Golf\n\nAnswer:"
    assert m.prompts[1] == f"Fact: Tiger Woods plays the sport of\n{opts} D\n\nFact: Tom Brady plays the sport of\n{opts}"


# --------------------------------------------------------------------------- relearning preset

def test_paper_relearn_preset():
    cfg = A.RelearnConfig.paper(seed=3)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lr, cfg.schedule, cfg.grad_clip) == \
        (512, 32.0, 0.05, 2e-4, "cosine", None)
    assert (cfg.batch_size, cfg.maintain_batch, cfg.lm_batch, cfg.steps, cfg.seed) == (32, 32, 16, 20, 3)
    assert A.RelearnConfig().lora_dropout == 0.0 and A.RelearnConfig().schedule == "constant"  # the default kept


def test_paper_style_relearn_runs_and_keeps_per_athlete_values(tiny):
    train, heldout = A.split_forget(ATHLETES, seed=0)
    before = {n: p.detach().clone() for n, p in tiny.hf.state_dict().items()}
    cfg = A.RelearnConfig.paper(steps=3, lora_rank=4, lr=5e-2, lm_coef=0.0, batch_size=4, maintain_batch=2)
    res = A.relearn(tiny, train, heldout, ATHLETES.tail(3), [], cfg, progress=False)
    assert res.steps == [0, 1, 3] and len(res.heldout_by_athlete) == 3
    assert all(len(p) == len(heldout) for p in res.heldout_by_athlete)
    assert np.mean(res.heldout_by_athlete[-1]) == pytest.approx(res.forget_p_true[-1])
    assert res.train_p_true[-1] > res.train_p_true[0]
    assert all(torch.equal(tiny.hf.state_dict()[n], p) for n, p in before.items())
    with pytest.raises(A.AttackError, match="schedule"):
        A.relearn(tiny, train, heldout, ATHLETES, [], A.RelearnConfig(schedule="linear"), progress=False)


# --------------------------------------------------------------------------- the paper's soft prompt

def test_paper_soft_prompt_trains_and_respects_the_bound(tiny):
    train, heldout = A.split_forget(ATHLETES)
    before = {n: p.detach().clone() for n, p in tiny.hf.state_dict().items()}
    cfg = A.PaperSoftPromptConfig(n_vectors=4, norm_bound=0.5, lr=1e-2, steps=8, batch_size=4, runs=2)
    sp = A.train_paper_soft_prompt(tiny, train, cfg, progress=False)
    assert len(sp.adversaries) == 2 and len(sp.losses) == 2
    for adv, losses in zip(sp.adversaries, sp.losses):
        assert adv.keys.shape == (4, tiny.d_model)
        assert (adv.keys.norm(dim=-1) <= 0.5 + 1e-5).all() and (adv.values.norm(dim=-1) <= 0.5 + 1e-5).all()
        assert losses[-1] < losses[0]  # it trains
    p = A.paper_soft_prompt_p_true(tiny, train, sp)
    assert list(p.index) == list(train.athlete)
    assert p.mean() > A.sports_p_true(tiny, train)["p"]  # it elicits the trained answers
    assert A.athlete_p_true(tiny, heldout).equals(A.athlete_p_true(tiny, heldout))  # the hook is gone
    assert all(torch.equal(tiny.hf.state_dict()[n], p) for n, p in before.items())  # the model never trains


# --------------------------------------------------------------------------- 05's CI table, verdicts, plot

def _fake_results():
    import types

    def r(per):
        return types.SimpleNamespace(heldout_by_athlete=[[0.9] * len(per), per])
    low, high = [0.1, 0.15, 0.1, 0.2, 0.1, 0.12], [0.8, 0.85, 0.9, 0.7, 0.8, 0.75]
    return {("t", "flu", "relearn_lora"): r(low), ("t", "ap", "relearn_lora"): r(high),
            ("t", "ct", "relearn_lora"): r(high)}


def test_relearn_ci_frame_verdicts_and_plot():
    res = _fake_results()
    frame = A.relearn_ci_frame(res)
    flu = frame.set_index("method").loc["flu"]
    assert flu.ci_low <= flu.p_true <= flu.ci_high and flu.n == 6
    assert flu.p_true == pytest.approx(np.mean([0.1, 0.15, 0.1, 0.2, 0.1, 0.12]))
    v = A.relearn_ci_verdicts(res)
    assert v.verdict.tolist() == ["reproduced"] and v.cis[0]["ap"][0] > 0
    fig = A.plot_ci_bars(frame)
    assert len(fig.axes) == 1


def test_per_athlete_ci_verdicts_by_task_and_attack():
    """Any attack's per-athlete values give a verdict per (task, attack): FLU lowest under one attack
    (reproduced), highest under the other (not reproduced); a rival missing is left out."""
    low, high = [0.1, 0.15, 0.1, 0.2, 0.1, 0.12], [0.8, 0.7, 0.9, 0.85, 0.75, 0.8]
    each = {("t", "flu", "soft_prompt"): low, ("t", "ap", "soft_prompt"): high, ("t", "ct", "soft_prompt"): high,
            ("t", "flu", "other"): high, ("t", "ap", "other"): low}
    v = A.per_athlete_ci_verdicts(each).set_index("variant")
    assert v.loc["soft_prompt", "verdict"] == "reproduced" and v.loc["other", "verdict"] == "not reproduced"
    assert set(v.loc["other", "cis"]) == {"ap"} and v.loc["soft_prompt", "cis"]["ct"][0] > 0
    assert v.loc["soft_prompt", "ap-flu CI"].startswith("[+")


def test_attach_cis_only_where_05_has_intervals():
    from mechunlearn_utils.workbook.results import attach_cis

    verdicts = [dict(id="relearning", task="t", verdict="mixed"), dict(id="relearning", task="u", verdict="mixed"),
                dict(id="latent", task="t", verdict="reproduced")]
    attacks = {"verdict_ci.relearn_lora.t": "inconclusive", "t.relearn_lora.ci.ap_minus_flu_low": -0.1,
               "t.relearn_lora.ci.ap_minus_flu_high": 0.2}
    assert attach_cis(verdicts, attacks) == ["relearning"]
    assert verdicts[0]["verdict_ci"] == "inconclusive" and verdicts[0]["ci (rival - flu)"] == "ap [-0.100, +0.200]"
    assert "verdict_ci" not in verdicts[1] and "verdict_ci" not in verdicts[2]
    assert verdicts[0]["ci source"] == "relearn_lora"
    pooled = {**attacks, "verdict_ci.relearn_lora_splits.t": "reproduced", "t.relearn_lora_splits.ci.ap_minus_flu_low": 0.1,
              "t.relearn_lora_splits.ci.ap_minus_flu_high": 0.3}
    again = [dict(id="relearning", task="t", verdict="mixed")]
    assert attach_cis(again, pooled) == ["relearning"]  # several splits, when there, come first
    assert again[0]["verdict_ci"] == "reproduced" and again[0]["ci source"] == "relearn_lora_splits"


def test_per_fact_cis_give_03s_claims_intervals_on_the_papers_side():
    from mechunlearn_utils.workbook.results import attach_cis, per_fact_cis

    lo, hi = [0.01, 0.02, 0.0, 0.03, 0.01, 0.02], [0.5, 0.6, 0.4, 0.7, 0.5, 0.6]
    edits = {"t.flu.per_fact.forget.question.p_true": lo, "t.ap.per_fact.forget.question.p_true": hi,
             "t.ct.per_fact.forget.question.p_true": hi,
             "t.flu.per_fact.maintain.normal.p_true": lo, "t.ap.per_fact.maintain.normal.p_true": hi,
             "t.ct.per_fact.maintain.normal.p_true": hi}
    verdicts = [dict(id="generalizes", task="t", measure="forget.question.p_true", verdict="reproduced"),
                dict(id="side_effects_maintain", task="t", measure="maintain.normal.p_true", verdict="x"),
                dict(id="side_effects_lm", task="t", measure="side.lm_loss - base", verdict="x")]
    cis = per_fact_cis(verdicts, edits)
    assert cis["verdict_ci.generalizes.t"] == "reproduced"  # FLU forgets more in the unseen format
    assert cis["verdict_ci.side_effects_maintain.t"] == "not reproduced"  # and keeps less (higher is better)
    assert cis["t.generalizes.ci.ap_minus_flu_low"] > 0.3 and cis["t.side_effects_maintain.ci.ct_minus_flu_high"] < -0.3
    assert attach_cis(verdicts, cis) == ["generalizes", "side_effects_maintain"]
    assert "verdict_ci" not in verdicts[2]  # no per-paragraph LM losses: no interval
    assert per_fact_cis(verdicts, {}) == {}  # an older 03 run without per-fact values
    # with them (notebook 03 keeps side.lm_loss per held-out paragraph): the change from base pairs the same way
    lm = {"t.flu.per_fact.side.lm_loss": [3.0, 3.1, 2.9, 3.2], "t.ap.per_fact.side.lm_loss": [3.5, 3.7, 3.4, 3.6],
          "t.ct.per_fact.side.lm_loss": [3.4, 3.6, 3.3, 3.5]}
    cis = per_fact_cis(verdicts, {**edits, **lm})
    assert cis["verdict_ci.side_effects_lm.t"] == "reproduced" and cis["t.side_effects_lm.ci.ap_minus_flu_low"] > 0.3
    assert attach_cis(verdicts, cis) == ["generalizes", "side_effects_lm", "side_effects_maintain"]


def test_per_fact_cis_pool_the_seeds_every_compared_method_has():
    from mechunlearn_utils.workbook.results import attach_cis, per_fact_by_seed, per_fact_cis, per_fact_values

    # seed 0: FLU barely better (inconclusive on 3 facts); seeds 1 and 2 repeat it: 9 paired facts
    flu, ap = [0.10, 0.30, 0.20], [0.12, 0.31, 0.24]
    edits = {f"t.{m}.{head}.forget.question.p_true": v for m, v in (("flu", flu), ("ap", ap), ("ct", ap))
             for head in ("per_fact", "per_fact_seed1", "per_fact_seed2")}
    edits["t.ct.per_fact_seed3.forget.question.p_true"] = ap  # a seed FLU lacks: not pooled
    edits["t.flu.per_fact_seedx.forget.question.p_true"] = ap  # not a seed key
    assert sorted(per_fact_by_seed(edits)["t", "ct"]["forget.question.p_true"]) == [0, 1, 2, 3]
    assert per_fact_values(edits)["t", "flu"] == {"forget.question.p_true": flu}  # seed 0 only
    verdicts = [dict(id="generalizes", task="t", measure="forget.question.p_true", verdict="mixed")]
    one = per_fact_cis(verdicts, {k: v for k, v in edits.items() if ".per_fact." in k})
    assert "verdict_ci.generalizes.t" in one and one["ci_seeds.generalizes.t"] == 1
    cis = per_fact_cis(verdicts, edits)
    assert cis["ci_seeds.generalizes.t"] == 3 and "verdict_ci.generalizes.t" not in cis
    w1 = one["t.generalizes.ci.ap_minus_flu_high"] - one["t.generalizes.ci.ap_minus_flu_low"]
    w3 = cis["t.generalizes_seeds.ci.ap_minus_flu_high"] - cis["t.generalizes_seeds.ci.ap_minus_flu_low"]
    assert w3 < w1  # three times the facts: a narrower interval
    assert attach_cis(verdicts, cis) == ["generalizes"] and verdicts[0]["ci source"] == "generalizes_seeds"


def test_lm_loss_per_paragraph_averages_to_the_loss(tiny):
    from mechunlearn_utils.evaluate.suite import lm_loss_on_text

    text = [" ".join(load_athletes().athlete.iloc[i * 40:(i + 1) * 40]) for i in range(5)]
    each = []
    total = lm_loss_on_text(tiny, text, context=16, batch_size=2, each=each)
    assert len(each) == 5 and total == pytest.approx(np.mean(each), rel=1e-5)
    assert lm_loss_on_text(tiny, text, context=16, batch_size=2) == total  # unchanged without `each`


def test_split_pooled_relearning_verdict_averages_each_athlete_over_its_held_out_splits():
    from mechunlearn_utils.attacks import pooled_heldout, split_ci_verdicts

    assert pooled_heldout([(["a", "b"], [0.2, 0.4]), (["a", "c"], [0.4, 0.9])]) == pytest.approx(
        {"a": 0.3, "b": 0.4, "c": 0.9})
    with pytest.raises(ValueError, match="values"):
        pooled_heldout([(["a"], [0.1, 0.2])])
    names = [f"x{i}" for i in range(12)]
    splits = [names[:6], names[6:], names[3:9]]
    runs = {("t", "flu"): [(s, [0.01] * 6) for s in splits],
            ("t", "ap"): [(s, [0.8] * 6) for s in splits],
            ("t", "ct"): [(s, [0.5 + 0.01 * i for i in range(6)]) for s in splits]}
    v = split_ci_verdicts(runs).iloc[0]
    assert v.verdict == "reproduced" and v.n_splits == 3 and v.n_athletes == 12
    assert v["flu.mean"] == pytest.approx(0.01) and v["cis"]["ap"][0] > 0.7
    runs[("t", "ap")] = [(s, [0.0] * 6) for s in splits]  # AP now holds better than FLU
    assert split_ci_verdicts(runs).iloc[0].verdict == "mixed"


def test_above_chance_binomial():
    from mechunlearn_utils.evaluate.verdicts import above_chance

    assert above_chance(60, 100, 0.25)["above"] is True
    r = above_chance(27, 100, 0.25)
    assert r["above"] is False and 0.2 < r["p_value"] < 0.5 and r["accuracy"] == 0.27
    assert above_chance(4, 4, 0.25)["p_value"] == pytest.approx(0.25 ** 4)  # all right by luck
    with pytest.raises(ValueError):
        above_chance(5, 4, 0.25)


def test_relearn_over_splits_runs_each_seed_split_and_reuses_the_first(monkeypatch):
    from types import SimpleNamespace

    import mechunlearn_utils.attacks.relearning as R
    from mechunlearn_utils.data.datasets import load_athletes
    from mechunlearn_utils.data.tasks import make_task

    task = make_task("athletes_to_sport", athletes=load_athletes().groupby("sport").head(8).reset_index(drop=True),
                     n=8, n_maintain=4)
    calls = []

    def fake_relearn(model, train, heldout, maintain, text, cfg, progress=True):
        calls.append(tuple(heldout.athlete))
        return SimpleNamespace(heldout_by_athlete=[[0.5] * len(heldout)])

    monkeypatch.setattr(R, "relearn", fake_relearn)
    edits = {("t", "flu"): None}  # no edit file: the model as it is
    done = {("t", "flu"): [0.1] * 4}
    runs = R.relearn_over_splits(None, edits, {"t": task}, [0, 1, 2], [], R.RelearnConfig(), done=done, progress=False)
    assert len(runs["t", "flu"]) == 3 and len(calls) == 2  # seed 0 reused, seeds 1 and 2 run
    names = [tuple(n) for n, _ in runs["t", "flu"]]
    assert len(set(names)) > 1 and runs["t", "flu"][0][1] == [0.1] * 4 and names[1:] == calls
    assert all(len(n) == 4 and set(n) <= set(task.eval_forget.athlete) for n in names)


def test_seed_means_per_task_method_and_seed_and_empty_with_one_seed():
    from mechunlearn_utils.evaluate.verdicts import seed_means

    each = {("t", "flu"): {"m": [0.0, 0.2]}, ("t", "ap"): {"m": [0.5, 0.7]}, ("u", "flu"): {"m": [1.0]}}
    per_seed = {("t", "flu", 1): {"m": [0.4, 0.6]}, ("t", "flu", 2): {"m": [0.3]}}
    table = seed_means(each, per_seed)
    assert table.index.names == ["task", "method", "seed"]
    assert table["m"].to_dict() == pytest.approx({("t", "flu", 0): 0.1, ("t", "flu", 1): 0.5, ("t", "flu", 2): 0.3})
    empty = seed_means(each, {})  # SEEDS = 1: nothing to show, and no error
    assert empty.empty and empty.index.names == ["task", "method", "seed"]
