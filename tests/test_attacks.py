"""Attacks library on the tiny random model: relearning (LoRA removed
exactly), soft prompts, quantization, other languages, bad input."""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn_utils import attacks as A
from mechunlearn_utils.evaluate.suite import score_prompts
from mechunlearn_utils.data.prompts import sport_prompts
from mechunlearn_utils.workbook.results import MissingResultsError

ATHLETES = pd.DataFrame({
    "athlete": ["Michael Jordan", "LeBron James", "Babe Ruth", "Derek Jeter", "Tom Brady", "Peyton Manning",
                "Kobe Bryant", "Joe Montana"],
    "sport": ["basketball", "basketball", "baseball", "baseball", "football", "football", "basketball",
              "football"],
})


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.hf.state_dict().items()}


def _same_state(model, before: dict) -> bool:
    after = model.hf.state_dict()
    return set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


@pytest.fixture(scope="module")
def words(tiny):
    vocab = tiny.tokenizer.get_vocab()
    missing = [w for a in ATHLETES.athlete for w in a.split() if w not in vocab]
    assert not missing, f"tiny tokenizer lacks {missing}"
    return vocab


def test_candidate_scores_match_evals(tiny, words):
    pset = sport_prompts(list(ATHLETES.athlete), list(ATHLETES.sport), candidates=A.EDIT_CANDIDATES)
    ref = score_prompts(tiny, pset)
    got = A.sports_p_true(tiny, ATHLETES)
    assert got["p"] == pytest.approx(ref.p_norm.mean(), abs=1e-5)
    assert got["acc"] == pytest.approx(ref.hit.mean())
    assert got["n"] == len(ATHLETES)


# --------------------------------------------------------------------------- relearning

def test_lora_adapter_is_removed_exactly(tiny, words):
    before = _state(tiny)
    types_before = {n: type(m) for n, m in tiny.hf.named_modules()}
    n_linear = len(A.decoder_linear_names(tiny))
    b = tiny.tokenize(sport_prompts(["Michael Jordan"], ["basketball"]).prompts)
    with torch.no_grad():
        ref = tiny.hf.model(input_ids=b["input_ids"]).last_hidden_state
    with A.lora_adapter(tiny, rank=4, alpha=8) as params:
        assert params and all(p.requires_grad for p in params)
        n_lora = sum(1 for n, _ in tiny.hf.named_parameters() if "lora_" in n)
        assert n_lora == 2 * n_linear  # A and B on every linear layer
        opt = torch.optim.SGD(params, lr=1.0)
        tiny.hf.model(input_ids=b["input_ids"]).last_hidden_state.sum().backward()
        opt.step()
        with torch.no_grad():
            moved = tiny.hf.model(input_ids=b["input_ids"]).last_hidden_state
        assert not torch.allclose(moved, ref)  # the adapter is live
    assert _same_state(tiny, before)
    assert {n: type(m) for n, m in tiny.hf.named_modules()} == types_before
    assert not any(p.requires_grad for p in tiny.hf.parameters())
    assert not hasattr(tiny.hf, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(tiny.hf.model(input_ids=b["input_ids"]).last_hidden_state, ref, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_relearn_curve_and_restores_weights(tiny, words, mode):
    train, heldout = A.split_forget(ATHLETES, seed=0)
    before = _state(tiny)
    p0 = A.sports_p_true(tiny, heldout)["p"]
    cfg = A.RelearnConfig(mode=mode, steps=4, lr=5e-2 if mode == "lora" else 1e-2, lora_rank=4, lora_alpha=8,
                          lm_context=8, maintain_batch=2)
    res = A.relearn(tiny, train, heldout, ATHLETES.tail(3), ["Fact : plays the sport of golf . " * 8], cfg,
                    progress=False)
    assert res.steps == [0, 2, 4]
    assert res.forget_p_true[0] == pytest.approx(p0, abs=1e-6)  # step 0 is the edited model itself
    assert res.train_p_true[-1] > res.train_p_true[0]  # it learned the trained athletes
    assert abs(res.forget_p_true[-1] - res.forget_p_true[0]) > 1e-4  # and the held-out curve moved
    assert len(res.losses) == 4 and res.n_trainable > 0
    assert _same_state(tiny, before)


def test_relearn_two_athlete_variant_and_frozen_layers(tiny, words):
    train, heldout = A.split_forget(ATHLETES, seed=1)
    before = _state(tiny)
    cfg = A.RelearnConfig(mode="lora", steps=2, eval_steps=(0, 2), n_train=2, layers=[1], lm_coef=0.0,
                          lora_rank=2, lr=5e-2)
    res = A.relearn(tiny, train, heldout, ATHLETES.tail(2), [], cfg, progress=False)
    assert res.steps == [0, 2] and res.config["n_train"] == 2
    # LoRA only on layer 1: the frozen-prefix path; adapter size = 2 x rank x (in + out) per linear
    assert res.n_trainable == sum(2 * (m.in_features + m.out_features)
                                  for n, m in tiny.layers[1].named_modules() if isinstance(m, torch.nn.Linear))
    assert _same_state(tiny, before)
    full = A.RelearnConfig(mode="full", steps=1, eval_steps=(0, 1), layers=[1], lm_coef=0.0)
    r2 = A.relearn(tiny, train, heldout, ATHLETES.tail(2), [], full, progress=False)
    assert r2.n_trainable == sum(p.numel() for p in tiny.layers[1].parameters())
    assert _same_state(tiny, before)


def test_zero_step_budgets_are_refused(tiny, words):
    train, heldout = A.split_forget(ATHLETES)
    with pytest.raises(A.AttackError, match="budget of 0 steps"):
        A.relearn(tiny, train, heldout, ATHLETES, [], A.RelearnConfig(steps=0), progress=False)
    with pytest.raises(A.AttackError, match="budget of 0 steps"):
        A.train_soft_prompt(tiny, train, A.SoftPromptConfig(steps=0), progress=False)
    with pytest.raises(A.AttackError, match="outside"):
        A.relearn(tiny, train, heldout, ATHLETES, [], A.RelearnConfig(steps=2, eval_steps=(0, 5)), progress=False)
    with pytest.raises(A.AttackError, match="mode"):
        A.relearn(tiny, train, heldout, ATHLETES, [], A.RelearnConfig(mode="qlora"), progress=False)


def test_split_forget_is_disjoint_and_fixed():
    a, b = A.split_forget(ATHLETES, seed=3)
    assert len(a) == 4 and len(b) == 4 and not set(a.athlete) & set(b.athlete)
    assert list(A.split_forget(ATHLETES, seed=3)[0].athlete) == list(a.athlete)
    with pytest.raises(A.AttackError, match="at least 2"):
        A.split_forget(ATHLETES.head(1))


# --------------------------------------------------------------------------- soft prompt

def test_project_norm():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    A.project_norm_(v, 1.0)
    torch.testing.assert_close(v.norm(dim=-1), torch.tensor([1.0, 0.5]))


def test_soft_prompt_training_respects_bound_and_lowers_loss(tiny, words):
    train, _ = A.split_forget(ATHLETES)
    before = _state(tiny)
    cfg = A.SoftPromptConfig(n_tokens=3, norm_bound=2.0, lr=0.1, steps=6, restarts=2)
    sp = A.train_soft_prompt(tiny, train, cfg, progress=False)
    assert sp.vectors.shape == (3, tiny.d_model)
    assert (sp.vectors.norm(dim=-1) <= 2.0 + 1e-5).all()
    assert len(sp.restart_losses) == 2 and sp.train_loss == min(sp.restart_losses)
    assert sp.losses[-1] < sp.losses[0]
    with_soft = A.sports_p_true(tiny, train, soft=sp.vectors)["p"]
    assert with_soft > A.sports_p_true(tiny, train)["p"]  # it elicits the trained answers
    assert _same_state(tiny, before)  # the model never trains


# --------------------------------------------------------------------------- formats

def test_alternative_formats(tiny, words):
    assert set(A.ALT_FORMATS) == {"question", "mcq", "para1", "para2", "para3"}
    for name in ["normal", *A.ALT_FORMATS]:
        r = A.format_p_true(tiny, ATHLETES, name)
        assert 0 <= r["p"] <= 1 and r["n"] == len(ATHLETES)
        each = A.format_athlete_p_true(tiny, ATHLETES, name)  # the same scores, per athlete
        assert list(each.index) == list(ATHLETES.athlete) and each.mean() == pytest.approx(r["p"], abs=1e-9)
    with pytest.raises(A.AttackError, match="unknown format"):
        A.format_p_true(tiny, ATHLETES, "haiku")
    with pytest.raises(A.AttackError, match="unknown format"):
        A.format_athlete_p_true(tiny, ATHLETES, "haiku")


# --------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 16)])
def test_quantization_error_bound_and_idempotence(bits, group):
    torch.manual_seed(0)
    w = torch.randn(12, 64) * torch.linspace(0.01, 3, 12)[:, None]  # rows of very different scale
    codes, scales = A.quantize_codes(w, bits, group)
    q = A.fake_quantize(w, bits, group)
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= qmax
    err = (q - w).abs().reshape(codes.shape)
    assert (err <= scales / 2 + 1e-6).all()  # round to nearest: at most half a step
    # the largest |w| of each row/group is represented exactly (symmetric, per row)
    torch.testing.assert_close(q.abs().reshape(codes.shape).amax(-1), w.abs().reshape(codes.shape).amax(-1))
    c2, _ = A.quantize_codes(q, bits, group)
    assert torch.equal(c2, codes)  # idempotent: quantizing again changes nothing
    torch.testing.assert_close(A.fake_quantize(q, bits, group), q, atol=1e-6, rtol=1e-6)


def test_int4_is_coarser_than_int8_and_zero_rows():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    e8 = (A.fake_quantize(w, 8) - w).abs().mean()
    e4 = (A.fake_quantize(w, 4) - w).abs().mean()
    assert e4 > 5 * e8 > 0
    assert len(torch.unique(A.fake_quantize(w, 4)[0])) <= 15
    w[3] = 0
    assert torch.equal(A.fake_quantize(w, 4)[3], torch.zeros(32))
    with pytest.raises(A.AttackError, match="bits"):
        A.quantize_codes(w, 5)
    with pytest.raises(A.AttackError, match="group_size"):
        A.quantize_codes(w, 4, group_size=5)
    with pytest.raises(A.AttackError, match="2-D"):
        A.quantize_codes(w[0], 8)


def test_quantized_context_restores_and_edit_survival(tiny):
    before = _state(tiny)
    names = A.quant_param_names(tiny, "all")
    assert names and all(n.endswith(".weight") and ".layers." in n for n in names)
    named = dict(tiny.hf.named_parameters())
    with A.quantized(tiny, names, 4):
        assert not torch.equal(named[names[0]], before[names[0]])
        c, _ = A.quantize_codes(named[names[0]], 4)
        assert c.abs().max() <= 7
    assert _same_state(tiny, before)
    w0 = {"w": torch.randn(8, 32)}
    step = A.quantize_codes(w0["w"], 8)[1]
    tiny_edit = {"w": w0["w"] + 1e-3 * step * torch.sign(torch.randn(8, 32))}  # far below one step
    big_edit = {"w": w0["w"] + 3 * step * torch.ones(8, 32)}  # three steps (clamping may trim a few)
    assert A.edit_survival(w0, tiny_edit, 8)["erased_frac"] > 0.95
    s = A.edit_survival(w0, big_edit, 8)
    assert s["erased_frac"] < 0.05 and s["edit_in_steps"] == pytest.approx(3, rel=1e-3)
    with pytest.raises(A.AttackError, match="scope"):
        A.quant_param_names(tiny, "embeddings")


# --------------------------------------------------------------------------- languages

def _write_templates(tmp_path, rows):
    df = pd.DataFrame(rows, columns=["language", "template", *A.EDIT_CANDIDATES])
    path = tmp_path / "templates.csv"
    df.to_csv(path, index=False)
    return path


def test_language_prompts_and_bad_input(tiny, words, tmp_path):
    path = _write_templates(tmp_path, [
        ("xx", "Fact : Tiger Woods plays golf\\nFact : {athlete} plays", "basketball", "baseball",
         "football tennis", "golf"),
        ("yy", "Question : {athlete} plays", "basketball", "baseball", "golf hockey", "golf"),
    ])
    t = A.load_language_templates(path)
    assert "\n" in t.loc["xx", "template"]  # the CSV's \n becomes a newline
    r = A.language_p_true(tiny, t, "xx", ATHLETES)  # 'football tennis' is scored by 'football'
    assert 0 <= r["p"] <= 1 and r["n"] == len(ATHLETES)
    with pytest.raises(A.AttackError, match="2 tokens"):
        A.language_p_true(tiny, t, "xx", ATHLETES, multi_token="reject")
    with pytest.raises(A.AttackError, match="same token"):
        A.language_p_true(tiny, t, "yy", ATHLETES)
    with pytest.raises(A.AttackError, match="no template for language 'it'.*available: xx, yy"):
        A.language_p_true(tiny, t, "it", ATHLETES)
    bad = _write_templates(tmp_path, [("zz", "no placeholder", "a", "b", "c", "d")])
    with pytest.raises(A.AttackError, match="athlete"):
        A.load_language_templates(bad)


def test_project_language_file():
    t = A.load_language_templates()
    assert {"fr", "de", "es"} <= set(t.index)
    assert all(s.count("{athlete}") == 1 and "Tiger Woods" in s for s in t.template)  # one-shot


def test_project_language_answers_with_gemma_tokenizer():
    """Every answer word of the CSV has a distinct first token for gemma-3-270m (the rule the
    scorer enforces), and the single-token ones really are single tokens."""
    from tokenizers import Tokenizer

    from mechunlearn_utils.core.models import converted_dir

    path = converted_dir("gemma-3-270m") / "tokenizer.json"
    if not path.exists():
        pytest.skip("gemma-3-270m has not been converted on this machine (run notebook 00)")
    raw = Tokenizer.from_file(str(path))  # the file the HF tokenizer wraps; loads in a second

    def encode(text, add_special_tokens=False):
        return types.SimpleNamespace(input_ids=raw.encode(text, add_special_tokens=add_special_tokens).ids)

    encode.decode = raw.decode
    fake = types.SimpleNamespace(name="gemma-3-270m", tokenizer=encode)
    t = A.load_language_templates()
    n_tokens = {}
    for lang, row in t.iterrows():
        words = [row[s] for s in A.EDIT_CANDIDATES]
        assert len(set(A.answer_token_ids(fake, words))) == 4, lang
        n_tokens.update({(lang, w): len(raw.encode(" " + w, add_special_tokens=False).ids) for w in words})
    multi = sorted(k for k, n in n_tokens.items() if n > 1)
    assert multi == [("es", "fútbol americano"), ("fr", "football américain")], multi  # documented in the CSV


# --------------------------------------------------------------------------- edited models, summary

def test_missing_edit_names_notebook_03(tmp_path):
    with pytest.raises(MissingResultsError, match="run notebooks/03_editing_and_unlearning.py"):
        A.edit_path(tmp_path, "athletes_to_sport", "flu")
    with pytest.raises(MissingResultsError, match="03_editing_and_unlearning"):
        A.find_edits(tmp_path, ["athletes_to_sport"])
    with pytest.raises(A.AttackError, match="sports tasks"):
        A.find_edits(tmp_path, ["counterfact"])
    d = A.edits_dir(tmp_path, "athletes_to_sport")
    d.mkdir(parents=True)
    for m in ("ap", "flu"):
        (d / f"{m}.safetensors").write_bytes(b"")
        (d / f"{m}.json").write_text(json.dumps({"task": "athletes_to_sport", "task_meta": {"n": 8, "seed": 0}}))
    assert A.available_methods(tmp_path, "athletes_to_sport") == ["ap", "flu"]
    assert set(A.find_edits(tmp_path, ["athletes_to_sport"])) == {("athletes_to_sport", "ap"),
                                                                   ("athletes_to_sport", "flu")}
    with pytest.raises(MissingResultsError, match="saved for this task: ap, flu"):
        A.find_edits(tmp_path, ["athletes_to_sport"], ["ct"])
    assert A.task_kwargs(A.edit_info(tmp_path, "athletes_to_sport", "flu")) == {"seed": 0, "n": 8}
    assert A.task_kwargs({"task_meta": {"sport": "basketball", "target": "golf", "seed": 2}}) == \
        {"seed": 2, "sport": "basketball"}


def test_recovery_table_and_plots():
    rec = pd.DataFrame([
        dict(task="t", method="flu", attack="soft_prompt", p_attack=0.3, p_edit=0.1),
        dict(task="t", method="flu", attack="quant_int8", p_attack=0.1, p_edit=0.1),
        dict(task="t", method="ap", attack="soft_prompt", p_attack=0.9, p_edit=0.0),
        dict(task="t", method="ap", attack="quant_int8", p_attack=0.0, p_edit=0.0),
    ])
    table = A.recovery_table(rec)
    assert table.loc[("t", "flu"), "soft_prompt"] == pytest.approx(0.2)
    assert table.loc[("t", "ap"), "soft_prompt"] == pytest.approx(0.9)
    assert list(table.index.get_level_values("method")) == ["flu", "ap"]
    fig = A.plot_recovery(table, "recovered")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_array().reshape(table.shape), table.to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == list(table.columns)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t / flu", "t / ap"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in table.to_numpy().ravel())
    assert ax.get_title() == "recovered" and ax.get_xlabel() == "attack"
    v = A.attack_verdicts(rec).set_index("attack")
    assert v.loc["soft_prompt", "verdict"] == "reproduced"  # FLU .3 vs AP .9
    assert v.loc["quant_int8", "verdict"] == "not reproduced"  # FLU .1 vs AP .0
    assert "FLU 0.300 vs ap 0.900" in v.loc["soft_prompt", "numbers"]
    missing = A.attack_verdicts(rec[rec.method != "ap"])
    assert set(missing.verdict) == {"not measured"}
    res = {("t", "flu", "lora"): A.RelearnResult([0, 1], [0.1, 0.2], [0.1, 0.5], {})}
    curves = A.relearn_curve_frame(res)
    assert list(curves.forget_p_true) == [0.1, 0.2] and list(curves.train_p_true) == [0.1, 0.5]
    fig = A.plot_relearn_curves(curves)
    lines = [ln for ax in fig.axes for ln in ax.lines if len(ln.get_xdata()) == 2]
    assert {tuple(ln.get_ydata()) for ln in lines} >= {(0.1, 0.2), (0.1, 0.5)}  # held-out and trained halves


def test_control_check_says_whether_the_attack_can_bring_an_edit_back():
    def run(p_ctrl, p_flu):
        res = {("t", "extraction", "relearn_lora"): A.RelearnResult([0, 10, 20], p_ctrl, [0.0, 0.5, 0.9], {}),
               ("t", "flu", "relearn_lora"): A.RelearnResult([0, 10, 20], p_flu, [0.0, 0.5, 0.9], {}),
               ("u", "flu", "relearn_lora"): A.RelearnResult([0, 20], [0.0, 0.1], [0.0, 0.9], {})}
        return A.control_check(A.relearn_curve_frame(res), min_gain=0.2)
    strong = run([0.05, 0.5, 0.9], [0.0, 0.02, 0.05])
    assert strong["t"]["attack_has_power"] is True and strong["t"]["gain"] == pytest.approx(0.85)
    assert "0.050 to 0.900" in strong["t"]["line"]
    weak = run([0.05, 0.1, 0.15], [0.0, 0.02, 0.05])
    assert weak["t"]["attack_has_power"] is False and "too weak" in weak["t"]["line"]
    assert weak["u"]["attack_has_power"] is None and "no 'extraction' edit" in weak["u"]["line"]


def test_relearn_step_zero_is_the_held_out_score_bit_for_bit_in_bf16(words):
    """The held-out half is scored in its own pass: step 0 equals scoring it alone, whatever the train
    half is (bf16 scores depend on a row's batch; the 2-athlete variant used to move step 0)."""
    from mechunlearn_utils import load_model

    model = load_model("tiny-random", "cpu", dtype="bfloat16")
    heldout = ATHLETES.head(4)
    # a longer name in the train half pads a merged batch further
    train = pd.concat([ATHLETES.tail(4), pd.DataFrame({"athlete": ["Metta World Peace"], "sport": ["basketball"]})])
    alone = A.athlete_p_true(model, heldout)
    for n_train in (None, 1):
        cfg = A.RelearnConfig(mode="lora", steps=1, eval_steps=(0, 1), n_train=n_train, lora_rank=2, lm_coef=0.0)
        res = A.relearn(model, train, heldout, ATHLETES.tail(2), [], cfg, progress=False)
        assert res.heldout_by_athlete[0] == alone.tolist() and res.forget_p_true[0] == float(alone.mean())
