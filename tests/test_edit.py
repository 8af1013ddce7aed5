"""Localized editing on the tiny model: only the named matrices change, the edit takes, it saves."""

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn_utils.data.datasets import load_athletes, load_general_text
from mechunlearn_utils.edit.loop import EditError, first_trainable_layer, forget_loss
from mechunlearn_utils.edit.storage import edited, load_edited, restore, save_edit, snapshot
from mechunlearn_utils.edit.train import EditConfig, train_edit
from mechunlearn_utils.evaluate.suite import evaluate_task, sports_measure
from mechunlearn_utils.core.forward import hidden_from, prefix_hidden
from mechunlearn_utils.data.tasks import make_task

LATE = ["model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]


@pytest.fixture(scope="module")
def athletes():
    return load_athletes().groupby("sport").head(10).reset_index(drop=True)


def test_only_localized_weights_change_and_the_edit_takes(tiny, athletes, text):
    task = make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters().items()}
    p0 = sports_measure(tiny, task.eval_forget, "target", "normal", ("basketball", "baseball", "football"))["p"]
    saved = snapshot(tiny, LATE)
    try:
        res = train_edit(tiny, LATE, task, text, EditConfig(steps=40, lr=3e-2, batch_size=4, lm_context=8),
                         progress=False)
        changed = {n for n, p in tiny.named_parameters().items() if not torch.equal(p, before[n])}
        assert changed == set(LATE)
        p1 = sports_measure(tiny, task.eval_forget, "target", "normal", ("basketball", "baseball", "football"))["p"]
        # a random 2-layer model mixes little of the athlete into the last token: modest but real
        assert p1 > p0 + 0.05, f"injected answer probability {p0:.3f} -> {p1:.3f}: the edit did not take"
        assert res.history[-1]["forget"] < 0.95 * res.history[0]["forget"]
        assert res.start_layer == 1 and res.n_params == sum(before[n].numel() for n in LATE)
    finally:
        restore(tiny, saved)
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters().items())


def test_frozen_prefix_gives_the_same_hidden_states(tiny):
    batch = tiny.tokenize(["Fact : Michael Jordan plays the sport of", "Fact : Babe Ruth plays"])
    with torch.no_grad():
        full = hidden_from(tiny.hf, batch["input_ids"], batch["attention_mask"], 0, None)
        pre = prefix_hidden(tiny.hf, batch["input_ids"], batch["attention_mask"], 1)
        part = hidden_from(tiny.hf, batch["input_ids"], batch["attention_mask"], 1, pre)
    assert torch.allclose(full, part, atol=1e-5)
    assert len(tiny.hf.model.layers) == 2  # the layer list is restored


def test_first_trainable_layer():
    assert first_trainable_layer(["model.layers.3.mlp.up_proj.weight", "model.layers.7.self_attn.o_proj.weight"]) == 3
    assert first_trainable_layer(["model.embed_tokens.weight", "model.layers.7.mlp.up_proj.weight"]) == 0
    assert first_trainable_layer(["model.norm.weight", "model.layers.5.mlp.up_proj.weight"]) == 5


def test_unlearning_loss_ignores_forgotten_items():
    logp = torch.log(torch.tensor([0.5, 1e-4]))
    assert torch.isclose(forget_loss(logp, "unlearn"), -torch.log1p(torch.tensor(-0.5)))
    assert forget_loss(torch.log(torch.tensor([1e-4])), "unlearn").item() == 0.0  # masked out: exactly 0 by construction


def test_save_and_load_edit_roundtrip(tiny, athletes, text, tmp_path):
    task = make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)
    saved = snapshot(tiny, LATE)
    train_edit(tiny, LATE, task, text, EditConfig(steps=3, lr=1e-2, batch_size=4, lm_context=8), progress=False)
    edited_weights = snapshot(tiny, LATE)
    path = save_edit(tiny, LATE, tmp_path / "e", {"method": "test"})
    restore(tiny, saved)
    with edited(tiny, path):
        assert all(torch.equal(p, edited_weights[n]) for n, p in snapshot(tiny, LATE).items())
    assert all(torch.equal(p, saved[n]) for n, p in snapshot(tiny, LATE).items())
    with pytest.raises(FileNotFoundError, match="03_editing"):
        load_edited(tiny, tmp_path / "missing")


def test_bad_inputs_get_clear_errors(tiny, athletes, text):
    task = make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)
    with pytest.raises(EditError, match="names no parameters"):
        train_edit(tiny, [], task, text, progress=False)
    with pytest.raises(EditError, match="another model"):
        train_edit(tiny, ["model.layers.99.mlp.up_proj.weight"], task, text, progress=False)
    task.train_forget = task.train_forget.assign(target=task.train_forget.sport)
    with pytest.raises(EditError, match="equals the true one"):
        train_edit(tiny, LATE, task, text, EditConfig(steps=1, lm_context=8), progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("teleport", athletes=athletes)
    with pytest.raises(ValueError, match="non-empty"):
        make_task("sport_to_golf", athletes=athletes.head(0))


def test_diverging_loss_stops_and_keeps_last_good_weights(tiny, athletes, text):
    task = make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)
    saved = snapshot(tiny, LATE)
    try:
        with pytest.raises(EditError, match="loss became"):
            train_edit(tiny, LATE, task, text, EditConfig(steps=3, lr=float("inf"), lm_context=8,
                                                            batch_size=4), progress=False)
        # the step that produced non-finite weights was undone: the weights are the last good ones
        assert all(torch.isfinite(p).all() for p in snapshot(tiny, LATE).values())
    finally:
        restore(tiny, saved)


def test_the_papers_three_whole_sport_splits_are_tasks(athletes):
    """football_to_golf is sport_to_golf with the sport fixed by the name: same split, own name; its
    saved record (sport=...) rebuilds it; a contradicting sport is an error."""
    from mechunlearn_utils.data.tasks import WHOLE_SPORT_TASKS, size_kwargs

    assert set(WHOLE_SPORT_TASKS) == {"basketball_to_golf", "football_to_golf", "baseball_to_golf"}
    football = make_task("football_to_golf", athletes=athletes, seed=3, n_maintain=6)
    same = make_task("sport_to_golf", athletes=athletes, sport="football", seed=3, n_maintain=6)
    assert football.name == "football_to_golf" and same.name == "sport_to_golf"
    assert football.meta == same.meta and set(football.train_forget.sport) == {"football"}
    pd.testing.assert_frame_equal(football.eval_forget, same.eval_forget)
    from mechunlearn_utils.edit.storage import task_kwargs

    again = make_task("football_to_golf", athletes=athletes, n_maintain=6,
                      **task_kwargs({"task": "football_to_golf", "task_meta": football.meta}))  # as 04-06 rebuild it
    pd.testing.assert_frame_equal(again.train_forget, football.train_forget)
    with pytest.raises(ValueError, match="forgets football, not 'golf'"):
        make_task("football_to_golf", athletes=athletes, sport="golf")
    assert size_kwargs("football_to_golf", "basketball", 16) == {}
    assert size_kwargs("sport_to_golf", "baseball", 16) == {"sport": "baseball"}
    assert size_kwargs("athletes_to_sport", "baseball", 16) == {"n": 16}


def test_evaluate_task_reports_every_measure(tiny, athletes):
    task = make_task("sport_to_golf", athletes=athletes, sport="basketball", n_maintain=6)
    each = {}
    out = evaluate_task(tiny, task, formats=("normal", "question"), per_fact=each)
    for key in ("forget.normal.p_true", "forget.normal.p_target", "maintain.question.acc_true"):
        assert 0 <= out[key] <= 1
    assert sorted(each) == ["forget.normal.p_true", "forget.question.p_true", "maintain.normal.p_true",
                            "maintain.question.p_true"]
    for key, values in each.items():  # one value per evaluated fact; their mean is the reported measure
        split = task.eval_forget if key.startswith("forget") else task.eval_maintain
        assert len(values) == len(split) and sum(values) / len(values) == pytest.approx(out[key], abs=1e-9)
    assert len(task.eval_forget) + len(task.train_forget) == (athletes.sport == "basketball").sum()
    assert set(task.eval_forget.athlete).isdisjoint(task.train_forget.athlete)


def test_counterfact_is_scored_raw_as_the_paper_and_normalized(tiny):
    """The paper scores CounterFact by the raw first-token p of the object; ours renormalizes over the
    candidates. Raw is the full-vocabulary probability, so it can never exceed the normalized one."""
    import numpy as np

    from mechunlearn_utils.data.datasets import load_counterfact
    from mechunlearn_utils.data.prompts import counterfact_prompts
    from mechunlearn_utils.evaluate.suite import candidate_logprobs

    facts = load_counterfact()
    task = make_task("counterfact", facts=facts.head(60), n=6, n_maintain=6)
    out = evaluate_task(tiny, task)
    for split in ("forget", "maintain"):
        for fmt in ("prompt", "paraphrase", "mcq"):
            raw, norm = out[f"{split}.{fmt}.p_raw_true"], out[f"{split}.{fmt}.p_true"]
            assert 0 < raw <= norm + 1e-7, (split, fmt)
    pset = counterfact_prompts(task.eval_forget, "prompt", "target_true")
    lps = candidate_logprobs(tiny, pset)
    expect = np.mean([np.exp(lp[c]) for lp, c in zip(lps, pset.correct)])
    assert out["forget.prompt.p_raw_true"] == pytest.approx(expect, rel=1e-6)


def test_unrelated_facts_exclude_everything_the_task_touches():
    from mechunlearn_utils.data.datasets import load_counterfact
    from mechunlearn_utils.data.tasks import unrelated_facts

    facts = load_counterfact().head(60)
    task = make_task("counterfact", facts=facts, n=8, n_maintain=10)
    free = unrelated_facts(task, facts, 100)
    touched = set(task.train_forget.subject) | set(task.train_maintain.subject)
    assert len(free) == 60 - len(touched) and touched.isdisjoint(free.subject)


def test_lm_loss_on_sampled_positions_is_the_mean_over_those_positions(tiny):
    import numpy as np

    from mechunlearn_utils.edit.loop import lm_loss, sample_positions

    batch = tiny.tokenize(["Michael Jordan plays the sport of basketball and Babe Ruth plays baseball"] * 2)
    batch = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    n = batch["input_ids"].shape[1] - 1
    with torch.no_grad():
        every = lm_loss(tiny, batch, 0, None)
        all_positions = torch.arange(n).repeat(2, 1)
        assert lm_loss(tiny, batch, 0, None, all_positions).item() == pytest.approx(every.item(), rel=1e-5)
        pos = sample_positions(np.random.default_rng(0), 2, n, 3)
        assert pos.shape == (2, 3) and all(len(set(r.tolist())) == 3 for r in pos)
        per_token = [lm_loss(tiny, batch, 0, None, torch.tensor([[i], [i]])).item() for i in range(n)]
        assert lm_loss(tiny, {k: v[:1] for k, v in batch.items()}, 0, None, pos[:1]).item() == pytest.approx(
            float(np.mean([per_token[i] for i in pos[0].tolist()])), rel=1e-5)
    assert sample_positions(np.random.default_rng(0), 2, n, 0) is None
    assert sample_positions(np.random.default_rng(0), 2, n, n) is None


def test_rank_settings_prefers_edits_that_took_then_maintain():
    from mechunlearn_utils.edit.train import rank_settings

    rows = [dict(lr=1, forget_p_true=0.6, maintain_p_true=0.95),  # kept everything, edit did not take
            dict(lr=2, forget_p_true=0.05, maintain_p_true=0.70),
            dict(lr=3, forget_p_true=0.01, maintain_p_true=0.85),
            dict(lr=4, forget_p_true=0.4, maintain_p_true=0.9)]
    ranked = rank_settings(rows, forget_target=0.1)
    assert [r["lr"] for r in ranked] == [3, 2, 4, 1]
    assert [r["took"] for r in ranked] == [True, True, False, False]


def test_sweep_trains_each_setting_from_the_base_and_restores_it(tiny, athletes, text):
    from mechunlearn_utils.edit.train import sweep

    task = make_task("unlearn_sport", athletes=athletes, sport="basketball", n_maintain=8, seed=0)
    saved = snapshot(tiny, LATE)
    rows = sweep(tiny, LATE, task, text, [1e-5, 3e-2], [1.0],
                 EditConfig(steps=40, batch_size=4, lm_context=8), forget_target=0.2)
    assert all(torch.equal(p, saved[n]) for n, p in snapshot(tiny, LATE).items())
    assert {r["lr"] for r in rows} == {1e-5, 3e-2}
    by_lr = {r["lr"]: r for r in rows}
    assert by_lr[3e-2]["forget_p_true"] < by_lr[1e-5]["forget_p_true"] - 0.005  # the larger lr unlearned more
    assert rows == sorted(rows, key=lambda r: (not r["took"], -r["maintain_p_true"] if r["took"] else r["forget_p_true"]))


def test_train_loop_runs_a_loss_plug_in_and_stops_on_a_non_finite_loss():
    """The one loop: the plug-in's loss is minimised, the record holds its terms, `after_step`
    runs after each update, and a non-finite loss raises before any update."""
    from mechunlearn_utils.edit.loop import EditError, train_loop

    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.25)
    seen = []
    hist = train_loop([w], lambda step: ((w ** 2).sum(), {"w0": w[0].detach().clone()}), opt, 4, grad_clip=100.0,
                      after_step=lambda: seen.append(float(w[0].detach())), progress=False)
    assert [r["step"] for r in hist] == [0, 1, 2, 3] and seen == [1.5, 0.75, 0.375, 0.1875]
    assert hist[0] == {"step": 0, "loss": 13.0, "w0": 3.0} and hist[-1]["loss"] < hist[0]["loss"]
    with pytest.raises(EditError, match="loss became nan at step 0"):
        train_loop([w], lambda step: (w.sum() * float("nan"), {}), opt, 2, progress=False)
    assert float(w[0]) == 0.1875  # not updated by the failed step


def test_attack_split_is_the_half_split_of_tasks():
    from mechunlearn_utils import attacks as A
    from mechunlearn_utils.data.tasks import split_half

    athletes = load_athletes().head(9)
    a, b = A.split_forget(athletes, seed=4)
    c, d = split_half(athletes, np.random.default_rng(4))
    pd.testing.assert_frame_equal(a, c)
    pd.testing.assert_frame_equal(b, d)
    assert len(a) == 4 and len(b) == 5


def test_retain_text_pool_draws_fresh_paragraphs_from_all_of_them(tiny, text):
    """The paper draws fresh general text every step; `lm_pool=-1` draws from every paragraph given,
    0 keeps the scaled default of 4 x lm_batch fixed paragraphs."""
    from mechunlearn_utils.edit.loop import RetainText

    paragraphs = load_general_text()[:40]
    fixed = RetainText.build(tiny, paragraphs, batch=2, context=8, start=0)
    every = RetainText.build(tiny, paragraphs, batch=2, context=8, start=0, pool=-1)
    assert len(fixed.text["input_ids"]) == 8 and len(every.text["input_ids"]) == 40
    assert len(RetainText.build(tiny, paragraphs, batch=2, context=8, start=0, pool=12).text["input_ids"]) == 12
    rng, seen = np.random.default_rng(0), set()
    from mechunlearn_utils.edit.loop import draw
    for _ in range(30):
        seen |= set(draw(rng, len(every.text["input_ids"]), every.batch).tolist())
    assert len(seen) > 8  # over 30 steps more than the fixed pool's 8 paragraphs are used


def test_paper_edit_config_and_the_protocol_table():
    from mechunlearn_utils.edit.train import PAPER_SWEEP, protocol_table

    p = EditConfig.paper()
    assert (p.steps, p.batch_size, p.lm_batch, p.lm_context, p.lm_positions, p.lm_pool) == (50, 64, 64, 100, 0, -1)
    assert p.grad_clip == 1.0 and p.warmup_steps == 0 and EditConfig.paper(lr=3e-5).lr == 3e-5
    assert PAPER_SWEEP == dict(lrs=(1e-5, 3e-5, 1e-4), coefs=(0.1, 1.0, 5.0))
    t = protocol_table(EditConfig(steps=20), [1e-4, 3e-4], [1.0], 10, 1, 4)
    assert t.loc["steps", "paper / this run"] == 2.5 and t.loc["forget prompts per step", "paper / this run"] == 4.0
    assert t.loc["general-text pool (paragraphs)", "this run"] == 8 and t.loc["tasks swept", "paper"] == 4
    assert t.loc["sweep lrs", "paper"] == "1e-05, 3e-05, 0.0001"
    same = protocol_table(p, PAPER_SWEEP["lrs"], PAPER_SWEEP["coefs"], 50, 4, 4)
    assert (same.loc[["steps", "forget prompts per step", "tokens per general-text sequence"], "paper / this run"] == 1.0).all()


def test_an_edit_with_the_whole_text_pool_trains_on_other_text(tiny, athletes, text):
    task = make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)
    saved = snapshot(tiny, LATE)
    lm = {}
    try:
        for pool in (0, -1):
            res = train_edit(tiny, LATE, task, load_general_text()[:40], EditConfig(steps=4, lr=1e-3, batch_size=4, lm_context=8,
                                                                    lm_pool=pool), progress=False)
            lm[pool] = [h["lm"] for h in res.history]
            restore(tiny, saved)
    finally:
        restore(tiny, saved)
    assert lm[0] != lm[-1]  # the same seed draws other paragraphs once the pool is the whole text


def test_forget_and_maintain_rows_in_one_forward_equal_two_forwards(tiny, athletes, text):
    """`EditData.both` (one batch per step for both terms): each row's log p(answer) is the one its
    own set gives, with the frozen prefix and the shared one-shot prefix (fp32, rounding only)."""
    from mechunlearn_utils.edit.loop import Examples, answer_logprobs
    from mechunlearn_utils.edit.train import edit_data

    task = make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)
    names = [n for n, _ in tiny.hf.named_parameters() if "layers.1.mlp" in n]
    data = edit_data(tiny, names, task, text, EditConfig(lm_context=16))
    assert data.start == 1 and data.both.prefix is not None
    assert len(data.both) == len(data.forget) + len(data.maintain)
    f, m = torch.tensor([2, 0, 3]), torch.tensor([5, 1, 7])
    with torch.no_grad():
        apart = torch.cat([answer_logprobs(tiny, data.forget.rows(f), data.start)[0],
                           answer_logprobs(tiny, data.maintain.rows(m), data.start)[0]])
        joined = answer_logprobs(tiny, data.both.rows(torch.cat([f, len(data.forget) + m])), data.start)[0]
    torch.testing.assert_close(joined, apart, rtol=0, atol=1e-5)
    # rows of different widths are right-padded with masked zeros
    short = Examples(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.tensor([1]),
                     torch.tensor([7]))
    both = Examples.concat(short, data.forget)
    assert both.input_ids.shape[1] == data.forget.input_ids.shape[1] and both.prefix is None
    assert both.attention_mask[0].tolist() == [1, 1] + [0] * (both.input_ids.shape[1] - 2)


def test_answers_and_retain_in_one_unembedding_equal_the_terms_apart(tiny, athletes, text):
    """A step's answer rows and retain-text positions go through one unembedding: the same log
    p(answer), LM loss and gradients as `answer_logprobs` + `lm_loss` (fp32, rounding only),
    drawing the same text batch from the generator."""
    import numpy as np

    from mechunlearn_utils.edit.loop import answer_logprobs, answers_and_retain, draw, lm_loss, sample_positions
    from mechunlearn_utils.edit.train import edit_data

    task = make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)
    names = [n for n, _ in tiny.hf.named_parameters() if "layers.1.mlp" in n]
    data = edit_data(tiny, names, task, text, EditConfig(lm_context=16, lm_positions=5, lm_batch=2))
    assert data.text is not None and data.start == 1
    rows = data.both.rows(torch.tensor([0, 2, len(data.forget) + 1]))
    w = dict(tiny.hf.named_parameters())[names[0]]
    w.requires_grad_(True)
    try:
        out = {}
        for how in ("apart", "joined"):
            rng = np.random.default_rng(5)
            if how == "apart":
                t = data.text  # its batch drawn as `RetainText.hidden` draws it, scored by `lm_loss`
                t_idx = draw(rng, len(t.text["input_ids"]), t.batch)
                pos = sample_positions(rng, len(t_idx), t.text["input_ids"].shape[1] - 1, t.positions)
                ll = lm_loss(tiny, {k: v[t_idx] for k, v in t.text.items()}, t.start, t.prefix[t_idx], pos)
                lp = answer_logprobs(tiny, rows, data.start)[0]
            else:
                lp, ll = answers_and_retain(tiny, rows, data.start, data.text, rng)
            (lp.sum() + ll).backward()
            out[how] = (lp.detach(), ll.detach(), w.grad.clone(), rng.integers(1 << 30))
            w.grad = None
    finally:
        w.requires_grad_(False)
    (lp_a, ll_a, g_a, next_a), (lp_j, ll_j, g_j, next_j) = out["apart"], out["joined"]
    torch.testing.assert_close(lp_j, lp_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(ll_j, ll_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_j, g_a, rtol=1e-4, atol=1e-6)
    assert g_a.abs().sum() > 0 and ll_a > 0 and next_a == next_j  # the generator drew the same
    lp0, ll0 = answers_and_retain(tiny, rows, data.start, None, np.random.default_rng(5))
    torch.testing.assert_close(lp0, lp_a, rtol=0, atol=1e-5)
    assert ll0.item() == 0.0


def test_adamw_is_fused_where_torch_has_the_kernel_and_updates_as_the_plain_one():
    from mechunlearn_utils.edit.loop import adam

    torch.manual_seed(0)
    plain = [torch.randn(64, 32, requires_grad=True), torch.randn(7, requires_grad=True)]
    fused = [p.detach().clone().requires_grad_(True) for p in plain]
    opts = torch.optim.AdamW(plain, lr=1e-3, weight_decay=0.0), adam(fused, 1e-3)
    assert opts[1].defaults["fused"] is True and opts[1].defaults["weight_decay"] == 0.0
    for step in range(5):
        for ps, opt in zip((plain, fused), opts):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 1e-3 * (step + 1)) * (i + 1) + torch.sin(p.detach())
            opt.step()
    for a, b in zip(plain, fused):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
