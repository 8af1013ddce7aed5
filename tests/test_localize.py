"""Localization methods on the tiny random model: CT, AP, path patching, probes, localizations.

Every intervention is checked to change what it should; the TransformerLens and nnsight paths are
checked to agree (tolerance TL_NN_ATOL); bad input must raise a clear error.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn_utils import load_model
from mechunlearn_utils import localize as lz
from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.evaluate.probes import cv_probe_accuracy, fit_probes, probe_accuracy, residuals_at

TL_NN_ATOL = 1e-5  # TransformerLens vs nnsight: same kernels on CPU, so agreement is ~exact
ALL_SITES = [lz.Site("embed"), lz.Site("resid_pre", 1), lz.Site("q", 0), lz.Site("k", 1),
             lz.Site("v", 0), lz.Site("z", 1), lz.Site("mlp_in", 0), lz.Site("mlp_pre", 1),
             lz.Site("mlp_post", 0), lz.Site("mlp_out_prenorm", 1), lz.Site("attn_out", 0),
             lz.Site("resid_mid", 1), lz.Site("mlp_out", 0), lz.Site("resid_final")]
# gradients: the sites inside the blocks' sublayers (a residual-stream site that is also a norm's
# input, such as resid_mid, is hooked differently by the backends, so its gradient is not compared)
GRAD_SITES = [s for s in ALL_SITES if s.kind not in ("resid_mid", "attn_out", "mlp_out")]


@pytest.fixture(scope="module")
def all_facts(tiny):
    return lz.sports_facts(tiny, load_athletes())


@pytest.fixture(scope="module")
def facts(tiny, all_facts):
    """Eight athletes whose sport the random tiny model happens to rank first."""
    logits = lz.run_sites(tiny, all_facts.batch()).logits
    top = logits.gather(1, all_facts.cand_ids).argmax(1)
    known = [i for i in range(len(all_facts)) if top[i] == all_facts.correct[i]]
    assert len(known) >= 8
    return all_facts.subset(known[:8])


@pytest.fixture(scope="module")
def unknown_facts(tiny, all_facts):
    logits = lz.run_sites(tiny, all_facts.batch()).logits
    top = logits.gather(1, all_facts.cand_ids).argmax(1)
    return all_facts.subset([i for i in range(len(all_facts)) if top[i] != all_facts.correct[i]][:4])


# ----------------------------------------------------------------------------- facts

def test_sports_facts_are_balanced_and_locate_the_queried_subject(tiny):
    athletes = load_athletes()
    fs = lz.sports_facts(tiny, athletes, n=9, seed=1)
    assert len(fs) == 9 and sorted(pd.Series(fs.labels).value_counts().tolist()) == [3, 3, 3]
    for i in range(len(fs)):
        ids = tiny.encode(fs.prompts[i])
        words = tiny.tokenizer.decode([ids[p] for p in fs.subject_pos[i]])
        assert words.replace(" ", "") == fs.subjects[i].replace(" ", "")
        assert fs.subject_pos[i][0] > 8, "must be the queried athlete, not the one-shot example"


def test_a_fact_set_is_a_prompt_set_the_evaluator_scores(tiny, facts):
    from mechunlearn_utils.data.prompts import PromptSet
    from mechunlearn_utils.evaluate.suite import score_prompts

    assert isinstance(facts, PromptSet) and facts.meta["task"] == "sports"
    plain = PromptSet(list(facts.prompts), list(facts.candidates), list(facts.correct))
    got, want = score_prompts(tiny, facts), score_prompts(tiny, plain)
    np.testing.assert_allclose(got.p_correct, want.p_correct, atol=1e-6)
    sub = facts.subset([2, 0])  # a subset keeps every field aligned
    assert sub.prompts == [facts.prompts[2], facts.prompts[0]] and sub.task == facts.task
    assert sub.input_ids.shape[0] == 2 and sub.subject_pos[0] == facts.subject_pos[2]
    with pytest.raises(ValueError, match="same length"):
        PromptSet(["a", "b"], [[" x", " y"]], [0, 0])


def test_counterfact_facts_pair_true_and_new_objects(tiny):
    from mechunlearn_utils.data.datasets import load_counterfact

    df = load_counterfact()
    fs = lz.counterfact_facts(tiny, df, n=3)
    assert len(fs) == 3 and fs.correct == [0, 0, 0] and fs.task == "counterfact"
    assert fs.candidates[0] == [df.target_true[0], df.target_new[0]]
    assert fs.labels[0] == df.target_true[0].strip() and fs.cand_ids.shape == (3, 2)
    assert all(p for p in fs.subject_pos)


def test_empty_fact_sets_raise(tiny):
    with pytest.raises(lz.LocalizationError, match="empty"):
        lz.sports_facts(tiny, load_athletes().head(0))
    with pytest.raises(lz.LocalizationError, match="empty"):
        lz.counterfact_facts(tiny, pd.DataFrame(columns=["prompt", "subject"]))
    with pytest.raises(lz.LocalizationError, match="empty"):
        lz.make_facts(tiny, "x", [], [], [], [])


def test_unknown_facts_raise_in_every_method(tiny, unknown_facts):
    for run in (lambda: lz.causal_tracing(tiny, unknown_facts),
                lambda: lz.attribution_patching(tiny, unknown_facts),
                lambda: lz.flu_search(tiny, unknown_facts)):
        with pytest.raises(lz.UnknownFactError, match="not known by the model"):
            run()


# ----------------------------------------------------------------------------- sites / backends

@pytest.mark.parametrize("backend", ["nnsight", "hf"])
def test_every_site_reads_the_same_as_transformer_lens(tiny, facts, backend):
    b = facts.batch()
    tl = lz.run_sites(tiny, b, capture=ALL_SITES, backend="tl")
    other = lz.run_sites(tiny, b, capture=ALL_SITES, backend=backend)
    assert torch.allclose(tl.logits, other.logits, atol=TL_NN_ATOL)
    for s in ALL_SITES:
        assert tl.acts[s].shape == other.acts[s].shape, s
        assert torch.allclose(tl.acts[s], other.acts[s], atol=TL_NN_ATOL), s
    assert tl.acts[lz.Site("q", 0)].shape[2:] == (tiny.n_heads, lz.head_dim(tiny))


def test_gradients_agree_across_backends(tiny, facts):
    metric = lz._ld_metric(facts, torch.arange(len(facts)))
    runs = {b: lz.run_sites(tiny, facts.batch(), capture=GRAD_SITES[1:], backend=b, grad_metric=metric)
            for b in lz.BACKENDS}
    for s in GRAD_SITES[1:]:
        for b in ("nnsight", "hf"):
            assert torch.allclose(runs["tl"].grads[s], runs[b].grads[s], atol=TL_NN_ATOL), (b, s)
    assert runs["tl"].grads[lz.Site("z", 1)].abs().max() > 0


@pytest.mark.parametrize("backend", lz.BACKENDS)
def test_every_site_edit_changes_the_output_and_identity_does_not(tiny, facts, backend):
    b = facts.batch()
    base = lz.run_sites(tiny, b, backend=backend).logits
    for s in ALL_SITES:
        same = lz.run_sites(tiny, b, {s: lambda a: a.clone()}, backend=backend).logits
        assert torch.allclose(same, base, atol=1e-6), f"identity edit at {s} changed the output"
        zero = lz.run_sites(tiny, b, {s: lambda a: a * 0.0}, backend=backend).logits
        assert (zero - base).abs().max() > 1e-4, f"zeroing {s} did nothing"


@pytest.mark.parametrize("backend", lz.BACKENDS)
def test_head_edit_touches_only_that_head(tiny, facts, backend):
    site = lz.Site("z", 0)

    def zero_head1(a):
        a = a.clone()
        a[:, :, 1] = 0
        return a
    clean = lz.run_sites(tiny, facts.batch(), capture=[site], backend=backend).acts[site]
    edited = lz.run_sites(tiny, facts.batch(), {site: zero_head1}, capture=[site], backend=backend).acts[site]
    assert edited[:, :, 1].abs().max() == 0 and clean[:, :, 1].abs().max() > 0
    keep = [h for h in range(tiny.n_heads) if h != 1]
    assert torch.equal(edited[:, :, keep], clean[:, :, keep])


@pytest.mark.parametrize("backend", lz.BACKENDS)
def test_gradients_match_a_finite_difference(tiny, facts, backend):
    site = lz.Site("mlp_out_prenorm", 0)
    idx = torch.arange(len(facts))
    metric = lz._ld_metric(facts, idx)
    run = lz.run_sites(tiny, facts.batch(), capture=[site], backend=backend, grad_metric=metric)
    direction = torch.randn(run.acts[site].shape, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    eps = 1e-3  # central difference; Gemma's post-MLP norm is very curved on random weights
    plus = lz.run_sites(tiny, facts.batch(), {site: lambda a: a + eps * direction}, backend=backend)
    minus = lz.run_sites(tiny, facts.batch(), {site: lambda a: a - eps * direction}, backend=backend)
    fd = (metric(plus.logits).sum() - metric(minus.logits).sum()) / (2 * eps)
    analytic = (run.grads[site] * direction).sum()
    assert abs(float(analytic)) > 1e-3
    assert abs(float(fd - analytic)) < 2e-2 * abs(float(analytic))


def test_unknown_backend_and_bad_site_raise(tiny, facts):
    with pytest.raises(ValueError, match="backend"):
        lz.run_sites(tiny, facts.batch(), backend="jax")

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.hf.modules())
    before = n_hooks()

    def boom(a):
        raise RuntimeError("edit failed")
    with pytest.raises(RuntimeError, match="edit failed"):
        lz.run_sites(tiny, facts.batch(), {lz.Site("z", 1): boom}, capture=ALL_SITES, backend="hf")
    assert n_hooks() == before, "the hf backend must remove its hooks, even after an error"
    with pytest.raises(ValueError, match="site kind"):
        lz.Site("attn_result", 0)
    with pytest.raises(ValueError, match="needs a layer"):
        lz.Site("z")


def test_nnsight_and_hf_paths_work_on_a_model_the_bridge_never_wrapped(tiny, facts):
    fresh = load_model("tiny-random", "cpu")  # same seed, same weights; no TransformerBridge built
    assert fresh._tl is None
    f = lz.make_facts(fresh, "sports", facts.prompts, facts.subjects, facts.candidates, facts.correct)
    a = lz.attribution_patching(fresh, f, backend="nnsight")
    h = lz.attribution_patching(fresh, f, backend="hf")
    res = residuals_at(fresh, f.prompts, [p[-1] for p in f.subject_pos])
    assert fresh._tl is None, "the nnsight / hf paths must not need TransformerLens"
    assert not any("_original_component" in n for n, _ in fresh.hf.named_parameters())
    b = lz.attribution_patching(tiny, facts, backend="tl")
    for k in lz.AP_KINDS:
        np.testing.assert_allclose(a.scores[k], b.scores[k], atol=1e-4)
        np.testing.assert_allclose(h.scores[k], b.scores[k], atol=1e-4)
    np.testing.assert_allclose(res, residuals_at(tiny, facts.prompts, [p[-1] for p in facts.subject_pos],
                                                 backend="tl"), atol=1e-5)


# ----------------------------------------------------------------------------- corruptions

def test_noise_only_on_subject_tokens_and_scaled(tiny, facts):
    noise = lz.gaussian_subject_noise(tiny, facts, 3, 3.0, seed=0, std=0.5)
    mask = facts.subject_mask()
    assert noise[~mask[:, None, :, None].expand_as(noise)].abs().max() == 0
    assert abs(float(noise[mask[:, None, :, None].expand_as(noise)].std()) - 1.5) < 0.1
    assert not torch.equal(noise[:, 0], noise[:, 1]), "noise samples must differ"


def test_corruptions_of_a_fact_do_not_depend_on_the_other_facts(tiny, facts):
    sub = facts.subset([3, 1])
    assert torch.equal(lz.corrupt_subject_tokens(tiny, sub, 5)[0], lz.corrupt_subject_tokens(tiny, facts, 5)[3])
    a = lz.gaussian_subject_noise(tiny, sub, 2, 3.0, seed=5, std=1.0)
    b = lz.gaussian_subject_noise(tiny, facts, 2, 3.0, seed=5, std=1.0)
    assert torch.equal(a[0], b[3][:, : a.shape[2]])


def test_ap_of_a_subset_reuses_the_per_fact_attributions(tiny, facts):
    full = lz.attribution_patching(tiny, facts, batch_size=3)
    gap = full.per_item["ld_clean"] - full.per_item["ld_corrupt"]
    idx = [int(i) for i in np.argsort(-gap)[:3]]  # the random model: pick facts the corruption hurts
    direct = lz.attribution_patching(tiny, facts.subset(idx))
    sub = full.subset(idx)
    for k in lz.AP_KINDS:
        np.testing.assert_allclose(sub.scores[k], direct.scores[k], rtol=1e-4, atol=1e-5)
    assert sub.passes.forward == 0 and sub.info["n_facts"] == 3


def test_random_token_corruption_replaces_only_subject_tokens(tiny, facts):
    ids = lz.corrupt_subject_tokens(tiny, facts, seed=0)
    mask = facts.subject_mask()
    assert torch.equal(ids[~mask], facts.input_ids[~mask])
    assert (ids[mask] != facts.input_ids[mask]).float().mean() > 0.9
    assert not set(ids[mask].tolist()) & lz.special_token_ids(tiny.tokenizer)
    assert torch.equal(ids, lz.corrupt_subject_tokens(tiny, facts, seed=0))


# ----------------------------------------------------------------------------- causal tracing

def test_causal_tracing_tl_and_nnsight_agree(tiny, facts):
    a = lz.causal_tracing(tiny, facts, n_samples=2, backend="tl", min_gap=None)
    b = lz.causal_tracing(tiny, facts, n_samples=2, backend="nnsight", min_gap=None)
    np.testing.assert_allclose(a.per_item["nie"], b.per_item["nie"], atol=TL_NN_ATOL, rtol=1e-4)
    assert a.scores["head"].shape == (tiny.n_layers, tiny.n_heads) and a.scores["mlp"].shape == (2,)


def test_causal_tracing_batching_does_not_change_scores(tiny, facts):
    a = lz.causal_tracing(tiny, facts.subset(range(3)), batch_size=7, min_gap=None)
    b = lz.causal_tracing(tiny, facts.subset(range(3)), batch_size=500, min_gap=None)
    np.testing.assert_allclose(a.per_item["nie"], b.per_item["nie"], rtol=1e-3, atol=1e-4)
    n_rows = 3 * (1 + tiny.n_layers * (tiny.n_heads + 1))  # the noised run + one row per restored component
    assert b.passes.forward_sequences == 3 + n_rows and b.passes.forward == 3  # clean, noised, restored


@pytest.mark.parametrize("start_layers", [True, False])
def test_causal_tracing_of_prompts_of_different_lengths_equals_each_prompt_alone(tiny, facts, start_layers):
    """A batch of restored runs is cut to its longest prompt (`FactSet.batch(trim=True)`): every
    fact's scores in a mixed-length set equal those of that fact traced alone (no padding at all)."""
    # the eight facts with 0-2 extra "Fact :" in front: three prompt lengths in one set
    prompts = ["Fact : " * (i % 3) + p for i, p in enumerate(facts.prompts)]
    mixed = lz.make_facts(tiny, "sports", prompts, facts.subjects, facts.candidates, facts.correct)
    top = lz.run_sites(tiny, mixed.batch()).logits.gather(1, mixed.cand_ids).argmax(1).tolist()
    facts = lz.make_facts(tiny, "sports", prompts, facts.subjects, facts.candidates, top)  # what it "knows"
    lengths = facts.last_index.tolist()
    assert len(set(lengths)) == 3, lengths  # the trimming is exercised
    kw = dict(n_samples=2, min_gap=None, batch_size=9, start_layers=start_layers,
              noise_rule="paper_sqrt")  # each fact's own noise level (scale_std pools it over the set)
    both = lz.causal_tracing(tiny, facts, **kw)
    for i in range(len(facts)):
        alone = lz.causal_tracing(tiny, facts.subset([i]), **kw)
        np.testing.assert_allclose(both.per_item["nie"][i], alone.per_item["nie"][0], rtol=1e-4, atol=1e-5)
    assert facts.batch([int(np.argmin(lengths))], trim=True)["input_ids"].shape[1] == min(lengths) + 1


@pytest.mark.parametrize("backend", ["tl", "hf"])
def test_causal_tracing_from_the_restored_layer_equals_full_runs(tiny, facts, backend):
    """Starting each restored run at its layer, from the noised run's residual stream, changes no score
    (beyond float rounding) and runs fewer layers."""
    a = lz.causal_tracing(tiny, facts, n_samples=2, backend=backend, min_gap=None, batch_size=5)
    b = lz.causal_tracing(tiny, facts, n_samples=2, backend=backend, min_gap=None, batch_size=5, start_layers=False)
    np.testing.assert_allclose(a.per_item["nie"], b.per_item["nie"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.per_item["p_corrupt"], b.per_item["p_corrupt"], rtol=1e-5, atol=1e-7)
    assert b.info["layer_fraction"] == 1.0 and a.info["layer_fraction"] < 0.8


def test_run_sites_from_a_layer_equals_the_full_run(tiny, facts):
    b = facts.batch()
    full = lz.run_sites(tiny, b, capture=[lz.Site("resid_pre", 1), lz.Site("z", 1)])
    part = lz.run_sites(tiny, b, capture=[lz.Site("z", 1)], start=1, hidden=full.acts[lz.Site("resid_pre", 1)])
    torch.testing.assert_close(part.logits, full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.acts[lz.Site("z", 1)], full.acts[lz.Site("z", 1)], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="never fires"):
        lz.run_sites(tiny, b, capture=[lz.Site("z", 0)], start=1, hidden=full.acts[lz.Site("resid_pre", 1)])
    with pytest.raises(ValueError, match="not nnsight"):
        lz.run_sites(tiny, b, backend="nnsight", start=1, hidden=full.acts[lz.Site("resid_pre", 1)])


def test_causal_tracing_matches_one_unbatched_restoration(tiny, facts):
    """Row for (fact 0, head 1 of layer 1) recomputed by hand with TransformerLens hooks."""
    f = facts.subset([0, 1])
    ct = lz.causal_tracing(tiny, f, n_samples=1, seed=3, min_gap=None)
    noise = lz.gaussian_subject_noise(tiny, f, 1, 3.0, seed=3)[0, 0]
    ids = f.input_ids[:1]
    clean = {}
    with torch.no_grad():
        tiny.tl.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", lambda a, hook: clean.update(z=a.clone()))])

        def restore(a, hook):
            a = a.clone()
            a[:, :, 1] = clean["z"][:, :, 1]
            return a
        hooks = [("hook_embed", lambda a, hook: a + noise), ("blocks.1.attn.hook_z", restore)]
        last = int(f.last_index[0])
        p_rest = torch.softmax(tiny.tl.run_with_hooks(ids, fwd_hooks=hooks)[0, last], -1)
        p_corr = torch.softmax(tiny.tl.run_with_hooks(ids, fwd_hooks=hooks[:1])[0, last], -1)
        p_clean = torch.softmax(tiny.tl(ids)[0, last], -1)
    right = f.correct_ids[0]
    expected = (p_rest[right] - p_corr[right]) / (p_clean[right] - p_corr[right])
    col = tiny.n_layers + 1 * tiny.n_heads + 1  # mlps first, then heads layer-major
    assert abs(ct.per_item["nie"][0, 0, col] - float(expected)) < 1e-3 * max(1, abs(float(expected)))
    assert abs(ct.per_item["p_corrupt"][0, 0] - float(p_corr[right])) < 1e-6


def test_zero_noise_or_no_effect_raises(tiny, facts):
    with pytest.raises(lz.LocalizationError, match="must be positive"):
        lz.causal_tracing(tiny, facts.subset([0]), noise_scale=0.0)
    with pytest.raises(lz.LocalizationError, match="never lowered"):
        lz.causal_tracing(tiny, facts.subset([0]), min_gap=1.0)  # p can never drop by more than 1


# ----------------------------------------------------------------------------- attribution patching

def test_attribution_patching_tl_and_nnsight_agree(tiny, facts):
    a = lz.attribution_patching(tiny, facts, backend="tl")
    b = lz.attribution_patching(tiny, facts, backend="nnsight")
    for k in lz.AP_KINDS:
        np.testing.assert_allclose(a.scores[k], b.scores[k], atol=TL_NN_ATOL, rtol=1e-4)
    assert a.scores["z"].shape == (tiny.n_layers, tiny.n_heads) and a.scores["mlp_out_prenorm"].shape == (2,)


def test_attribution_patching_passes_do_not_grow_with_components(tiny, facts):
    few = lz.attribution_patching(tiny, facts, batch_size=4, kinds=("z",))
    many = lz.attribution_patching(tiny, facts, batch_size=4)
    assert few.passes == many.passes
    assert many.passes.forward == 4 and many.passes.backward == 2  # 2 batches x (2 fwd + 1 bwd)


def test_attribution_through_a_linear_map_is_conserved(tiny, facts):
    """down_proj is linear, so grad.delta at its input (mlp_post) equals that at its output."""
    ap = lz.attribution_patching(tiny, facts, kinds=("mlp_post", "mlp_out_prenorm"))
    np.testing.assert_allclose(ap.scores["mlp_post"], ap.scores["mlp_out_prenorm"], rtol=1e-3, atol=1e-5)
    assert np.abs(ap.scores["mlp_out_prenorm"]).max() > 1e-3


def test_attribution_patching_agrees_with_activation_patching(tiny, facts):
    ap = lz.attribution_patching(tiny, facts)
    agree = lz.ap_agreement(tiny, facts, ap, n_components=12)
    assert len(agree["components"]) == 12
    assert agree["pearson"] > 0.5, agree


def test_activation_patching_each_component_changes_the_metric(tiny, facts):
    comps = [lz.Component("mlp_out_prenorm", 0), lz.Component("z", 1, 2), lz.Component("v", 0, 1)]
    eff = lz.activation_patching(tiny, facts, components=comps, direction="noise")
    assert eff.shape == (3,) and np.all(np.abs(eff) > 1e-4)


# ----------------------------------------------------------------------------- path patching / FLU

def test_mlp_path_patching_into_the_next_block_equals_activation_patching(tiny, facts):
    """With no block between sender and receiver, path patching is plain activation patching."""
    pp = lz.mlp_path_patching(tiny, facts, receiver_layer=1, positions="all")
    ap = lz.activation_patching(tiny, facts, components=[lz.Component("mlp_out_prenorm", 0)], direction="noise")
    assert abs(pp["effect"][0] + ap[0]) < 1e-4 and abs(ap[0]) > 1e-3


def test_head_path_patching_equals_patching_with_the_mlp_frozen(tiny, facts):
    """Last block: a head reaches the output directly or via that block's MLP; freezing the MLP
    at its clean value leaves only the direct path, which is what head path patching measures."""
    L = tiny.n_layers - 1
    corrupt = lz.corrupt_subject_tokens(tiny, facts, 0)
    hpp = lz.head_path_patching(tiny, facts, corrupt_ids=corrupt)
    sites = [lz.Site("z", L), lz.Site("mlp_out_prenorm", L)]
    clean = lz.run_sites(tiny, facts.batch(), capture=sites)
    corr = lz.run_sites(tiny, facts.batch(input_ids=corrupt), capture=sites)
    metric = lz._ld_metric(facts, torch.arange(len(facts)))
    ld_clean, ld_corr = metric(clean.logits), metric(corr.logits)
    for h in range(tiny.n_heads):
        def patch(a, h=h):
            a = a.clone()
            a[:, :, h] = corr.acts[sites[0]][:, :, h]
            return a
        out = lz.run_sites(tiny, facts.batch(), {sites[0]: patch,
                                                 sites[1]: lambda a: clean.acts[sites[1]]})
        expected = float((ld_clean - metric(out.logits)).mean() / (ld_clean - ld_corr).mean())
        assert abs(hpp["effect"][L, h] - expected) < 1e-4


def test_flu_threshold_and_hand_given_layers(tiny, facts, monkeypatch):
    found = lz.flu_search(tiny, facts, threshold=-10.0, head_top_k=1, receiver_layer=1)
    assert found.layers == [0] and found.extraction_layer == 1 and found.passes.forward > 0
    assert found.mlp_effect.shape == (1,) and found.head_effect.shape == (2, tiny.n_heads)
    with pytest.raises(lz.LocalizationError, match="selects no MLP"):
        lz.flu_search(tiny, facts, threshold=10.0, head_top_k=1, receiver_layer=1)
    fake = {"effect": np.array([[0.9, 0, 0, 0], [0.2, 0, 0, 0]]), "ld_clean": 1.0, "ld_corrupt": 0.0}
    monkeypatch.setattr(lz.flu, "head_path_patching", lambda *a, **k: fake)
    with pytest.raises(lz.LocalizationError, match="layer 0"):
        lz.flu_search(tiny, facts, head_threshold=0.1)
    with pytest.raises(lz.LocalizationError, match="selects no MLP"):
        lz.select_flu_layers(np.array([0.01, 0.02]), threshold=0.5)
    assert lz.select_flu_layers(np.array([0.3, 0.01, 0.2]), 0.1) == [0, 2]
    hand = lz.flu_search(tiny, facts, layers=[1, 0, 1])
    assert hand.layers == [0, 1] and hand.hand_given
    with pytest.raises(lz.LocalizationError, match="must be in"):
        lz.flu_search(tiny, facts, layers=[5])


def test_extraction_heads_threshold_and_layer0_error(tiny, facts):
    eff = np.array([[0.0, 0.3], [0.2, 0.01]])
    assert lz.heads_by_effect(eff, 0.1) == [(0, 1), (1, 0)]
    assert lz.heads_by_effect(eff, 9, top_k=1) == [(0, 1)]
    with pytest.raises(ValueError, match="no head"):
        lz.heads_by_effect(eff, 0.5)


# ----------------------------------------------------------------------------- probes

def test_residuals_are_the_stream_after_each_block(tiny, facts):
    pos = [p[-1] for p in facts.subject_pos]
    res = residuals_at(tiny, facts.prompts, pos)
    assert res.shape == (tiny.n_layers, len(facts), tiny.d_model)
    run = lz.run_sites(tiny, facts.batch(), capture=[lz.Site("resid_final")])
    np.testing.assert_allclose(res[-1], run.acts[lz.Site("resid_final")][torch.arange(len(facts)), pos].numpy(),
                               atol=1e-5)
    for backend in ("nnsight", "tl"):
        np.testing.assert_allclose(residuals_at(tiny, facts.prompts, pos, backend=backend), res, atol=1e-5)


def test_probes_separate_separable_labels_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 20)
    signal = rng.normal(size=(60, 8))
    signal[:, 0] += 4 * (labels == "a")
    signal[:, 1] += 4 * (labels == "b")
    feats = np.stack([rng.normal(size=(60, 8)), signal])
    acc = cv_probe_accuracy(feats, labels)
    assert acc[1] > 0.9 and acc[0] < 0.6
    probes = fit_probes(feats, labels)
    assert probe_accuracy(probes, feats, labels)[1] > 0.9
    with pytest.raises(ValueError, match="two classes"):
        cv_probe_accuracy(feats, np.array(["a"] * 60))


# ----------------------------------------------------------------------------- localizations

def _mlp_size(model):
    return sum(m.numel for m in lz.weight_matrices(model) if m.block == "mlp" and m.layer == 0)


def test_parameter_names_survive_the_bridge():
    fresh = load_model("tiny-random", "cpu")
    before = [n for n, _ in fresh.hf.named_parameters()]
    fresh.tl  # builds the bridge; the HF modules are put back as they were (core/models.py)
    assert list(lz.named_parameters(fresh)) == before
    assert [n for n, _ in fresh.hf.named_parameters()] == before


def test_mlp_localization_and_trainable_parameters(tiny):
    loc = lz.mlp_layers_localization(tiny, [1], task="sports")
    assert loc.mlp_layers == [1] and loc.attn_layers == []
    assert loc.n_params == _mlp_size(tiny) == 3 * tiny.d_model * tiny.hf.config.intermediate_size
    try:
        params = loc.trainable_parameters(tiny)
        assert {id(p) for p in params} == {id(p) for p in tiny.hf.parameters() if p.requires_grad}
        ids = torch.tensor([tiny.encode("Fact : Michael Jordan plays the sport of")])
        tiny.hf(ids).logits[0, -1].sum().backward()
        for name, p in lz.named_parameters(tiny).items():
            assert (p.grad is not None) == (name in loc.params), name
    finally:
        for p in tiny.hf.parameters():
            p.requires_grad_(False)
            p.grad = None


def test_scores_rank_units_and_budget_is_reached(tiny):
    budget = _mlp_size(tiny) + 1  # one MLP is not enough: needs one more matrix
    scores = {"attn": np.array([0.0, 0.1]), "mlp": np.array([0.5, -0.9])}
    loc = lz.localization_from_scores(tiny, "ap", scores, budget)
    assert loc.n_params >= budget
    assert loc.mlp_layers == [0, 1] and loc.attn_layers == []  # |-0.9| first, then 0.5
    assert loc.n_params == 2 * _mlp_size(tiny), "the unit that crosses the budget is taken whole"
    assert loc.matrices()[-1] == "mlp0.down" and loc.meta["whole_units"]
    cut = lz.localization_from_scores(tiny, "ap", scores, budget, whole_units=False)
    assert cut.matrices()[-1] == "mlp0.gate", "earlier rule: stops after the first matrix that reaches it"
    assert loc.meta["unit_ranking"][:2] == ["mlp1", "mlp0"]
    only = lz.localization_from_scores(tiny, "ct_mlp", {"attn": [9.0, 9.0], "mlp": [0.1, 0.2]},
                                       budget, mlp_only=True)
    assert only.attn_layers == []
    mixed = lz.localization_from_scores(tiny, "ct", {"attn": [9.0, 0.0], "mlp": [0.1, 0.2]}, budget)
    assert mixed.attn_layers == [0]


def test_budgets_no_combination_reaches_raise(tiny):
    total_mlp = 2 * _mlp_size(tiny)
    with pytest.raises(lz.LocalizationError, match="no combination"):
        lz.localization_from_scores(tiny, "ap_mlp", {"attn": [1, 1], "mlp": [1, 1]}, total_mlp + 1,
                                    mlp_only=True)
    with pytest.raises(lz.LocalizationError, match="no combination"):
        lz.random_matrices(tiny, 10 ** 9)
    with pytest.raises(lz.LocalizationError, match="positive"):
        lz.random_matrices(tiny, 0)
    with pytest.raises(lz.LocalizationError):
        lz.random_mlp_layers(tiny, tiny.n_layers + 1)


def test_baselines(tiny):
    budget = _mlp_size(tiny)
    r1, r2 = lz.random_matrices(tiny, budget, seed=1), lz.random_matrices(tiny, budget, seed=1)
    assert r1.params == r2.params and r1.n_params >= budget
    assert len(lz.random_mlp_layers(tiny, 1, seed=0).mlp_layers) == 1
    every = lz.all_mlps(tiny)
    assert every.mlp_layers == [0, 1] and every.n_params == 2 * budget
    non = lz.nonlocalized(tiny)
    assert non.n_params == sum(m.numel for m in lz.weight_matrices(tiny))
    assert not any("embed" in p or "norm" in p for p in non.params)
    assert non.meta["tied_embeddings"] is True
    old = lz.nonlocalized(tiny, include_norms=True)
    total = sum(p.numel() for p in tiny.hf.parameters())
    assert old.n_params == total - tiny.hf.get_input_embeddings().weight.numel()
    assert any("norm" in p for p in old.params)


def test_save_load_roundtrip_and_model_checks(tiny, tmp_path):
    loc = lz.mlp_layers_localization(tiny, [0], task="sports", scores={"x": np.arange(3)},
                                     meta={"threshold": 0.1, "passes": lz.PassCounter(2, 1, 8, 4)})
    path = loc.save(tmp_path)
    assert path == tmp_path / "02_localization" / "localizations" / "sports" / "flu.json"
    back = lz.Localization.load(tmp_path, "sports", "flu", tiny)
    assert back == lz.Localization.from_json(loc.to_json())
    assert back.params == loc.params and back.scores["x"] == [0, 1, 2]
    assert back.meta["passes"]["forward"] == 2
    assert set(lz.load_localizations(tmp_path, "sports")) == {"flu"}
    other = lz.Localization(**{**back.__dict__, "model_name": "gemma-3-270m"})
    with pytest.raises(lz.LocalizationError, match="made for 'gemma-3-270m'"):
        other.check(tiny)
    bogus = lz.Localization(**{**back.__dict__, "params": back.params + ["model.layers.9.mlp.up_proj.weight"]})
    with pytest.raises(lz.LocalizationError, match="lacks"):
        bogus.trainable_parameters(tiny)
    wrong = lz.Localization(**{**back.__dict__, "n_params": 5})
    with pytest.raises(lz.LocalizationError, match="records 5"):
        wrong.check(tiny)
    from mechunlearn_utils.workbook.results import MissingResultsError
    with pytest.raises(MissingResultsError, match="02_localization"):
        lz.Localization.load(tmp_path, "sports", "ap")
    with pytest.raises(lz.LocalizationError, match="not a localization"):
        lz.Localization.from_json('{"method": "x"}')


def test_overlap_and_summary(tiny):
    a = lz.mlp_layers_localization(tiny, [0], "a")
    b = lz.mlp_layers_localization(tiny, [1], "b")
    ab = lz.mlp_layers_localization(tiny, [0, 1], "ab")
    assert lz.jaccard(a, a, tiny) == 1 and lz.jaccard(a, b, tiny) == 0
    assert abs(lz.jaccard(a, ab, tiny) - 0.5) < 1e-9
    table = lz.overlap_matrix({"a": a, "b": b, "ab": ab}, tiny)
    assert table.loc["a", "ab"] == table.loc["ab", "a"]
    summ = lz.summary_table({"a": a, "ab": ab})
    assert summ.loc["ab", "MLP layers"] == "0-1" and summ.loc["ab", "attention layers"] == "-"
    assert summ.loc["ab", "matrices"] == 6
    assert lz._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    depth = lz.depth_table({"a": a, "b": b, "ab": ab}, tiny.n_layers)
    assert depth.loc["a", "mlp"] == 0 and depth.loc["b", "all"] == 1 and depth.loc["ab", "all"] == 0.5
    assert np.isnan(depth.loc["a", "attn"])
    grid = lz.localization_grid(ab, tiny.n_layers)
    assert grid.values.sum() == 6 and grid.loc["mlp.up", 1] == 1 and grid.loc["attn.q"].sum() == 0


def test_tracing_result_layer_scores(tiny, facts):
    ct = lz.causal_tracing(tiny, facts.subset([0]), min_gap=None)
    np.testing.assert_allclose(ct.layer_scores()["attn"], np.abs(ct.scores["head"].sum(1)))
    np.testing.assert_allclose(ct.layer_scores("abs")["attn"], np.abs(ct.scores["head"]).sum(1))
    ap = lz.attribution_patching(tiny, facts)
    np.testing.assert_allclose(ap.layer_scores()["mlp"], np.abs(ap.scores["mlp_in"] + ap.scores["mlp_out_prenorm"]))
    expected = sum(np.abs(ap.scores[k]) for k in ("mlp_in", "mlp_pre", "mlp_out_prenorm"))
    np.testing.assert_allclose(ap.layer_scores("abs")["mlp"], expected)


# ----------------------------------------------------------------------------- the paper's formulas

def test_ap_layer_score_is_abs_of_the_signed_sum_not_the_sum_of_abs():
    """cb_utils/mask_utils.py: attention = |sum over heads of q+k+v+result|, MLP = |mlp_in + mlp_out|."""
    heads = np.array([[0.5, -0.5], [0.2, 0.1]])  # [layer, head]
    scores = {"q": heads, "k": np.zeros((2, 2)), "v": np.zeros((2, 2)), "z": np.array([[0.1, 0.0], [0.0, -0.6]]),
              "mlp_in": np.array([0.4, -0.3]), "mlp_pre": np.array([5.0, 5.0]), "mlp_out_prenorm": np.array([-0.4, -0.2])}
    paper = lz.aggregate_layer_scores(scores)
    np.testing.assert_allclose(paper["attn"], [0.1, 0.3])  # |0.5-0.5+0.1|, |0.2+0.1-0.6|
    np.testing.assert_allclose(paper["mlp"], [0.0, 0.5])  # mlp_pre is not a paper site
    old = lz.aggregate_layer_scores(scores, "abs")
    np.testing.assert_allclose(old["attn"], [1.1, 0.9])
    np.testing.assert_allclose(old["mlp"], [5.8, 5.5])
    ct = lz.aggregate_layer_scores({"head": np.array([[0.3, -0.2]]), "mlp": np.array([-0.4])})
    np.testing.assert_allclose(ct["attn"], [0.1]) and np.testing.assert_allclose(ct["mlp"], [0.4])
    with pytest.raises(ValueError, match="aggregation"):
        lz.aggregate_layer_scores(scores, "max")


def test_units_rank_by_absolute_layer_score_and_whole_units_fill_the_budget():
    ranked = lz.rank_units({"attn": [0.0, -0.7], "mlp": [0.2, -0.9]})
    assert [(b, l) for b, l, _ in ranked] == [("mlp", 1), ("attn", 1), ("mlp", 0), ("attn", 0)]
    sizes = {"a": 10, "b": 4, "c": 4}
    assert lz.take_whole_units(["a", "b", "c"], sizes, 10) == ["a"]  # reached exactly: stop
    assert lz.take_whole_units(["a", "b", "c"], sizes, 11) == ["a", "b"]  # crossed: b taken whole
    assert lz.take_whole_units(["b", "a", "c"], sizes, 5) == ["b", "a"]  # no partial last unit


def test_ot_localization_takes_whole_attention_and_mlp_units(tiny):
    budget = _mlp_size(tiny) + 1
    loc = lz.localization_from_scores(tiny, "ap", {"attn": [0.0, 0.8], "mlp": [0.1, 0.9]}, budget)
    assert sorted(loc.matrices()) == sorted(["mlp1.gate", "mlp1.up", "mlp1.down", "attn1.q", "attn1.k",
                                             "attn1.v", "attn1.o"])
    assert loc.meta["unit_ranking"][:2] == ["mlp1", "attn1"]


def test_random_draws_exclude_gate_and_reach_the_budget(tiny):
    budget = 2 * _mlp_size(tiny)  # all up + down matrices and more: forces many draws
    for seed in range(3):
        loc = lz.random_matrices(tiny, budget, seed=seed)
        assert loc.n_params >= budget and not any(m.endswith(".gate") for m in loc.matrices())
    with_gate = lz.random_matrices(tiny, budget, seed=0, kinds=lz.ATTN_MATRICES + lz.MLP_MATRICES)
    assert with_gate.meta["kinds"] == list(lz.ATTN_MATRICES + lz.MLP_MATRICES)
    with pytest.raises(lz.LocalizationError, match="unknown matrix kinds"):
        lz.random_matrices(tiny, budget, kinds=("gate", "wq"))


def test_probe_saturation_and_flu_range_from_a_probe_curve():
    acc = [0.34, 0.40, 0.55, 0.71, 0.86, 0.90, 0.91, 0.92, 0.90, 0.89]
    assert lz.probe_saturation_layer(acc, tol=0.03, rule="max") == 5  # first layer >= 0.92 - 0.03
    assert lz.probe_saturation_layer(acc, tol=0.0, rule="max") == 7
    assert lz.flu_range(acc, start=2, tol=0.03, rule="max") == [2, 3, 4, 5]
    assert lz.flu_range(acc, start=1, tol=0.1, rule="max") == [1, 2, 3, 4]
    # plateau: from 0.86 the next 2 layers gain 0.05; from 0.90 they gain 0.02
    assert lz.probe_saturation_layer(acc, tol=0.03) == 5 and lz.probe_saturation_layer(acc, tol=0.06) == 4
    two_rises = [0.59, 0.68, 0.82, 0.85, 0.85, 0.84, 0.90, 0.91, 0.88, 0.87, 0.89, 0.94, 0.99, 0.99]
    assert lz.probe_saturation_layer(two_rises, 0.02) == 3, "the early rise stops at layer 3"
    assert lz.probe_saturation_layer(two_rises, 0.03, rule="max") == 12
    assert lz.probe_saturation_layer([0.33, 0.33, 0.34, 0.8, 0.9, 0.9], 0.02) == 4, "chance-level flat start ignored"
    assert lz.flu_range([0.9, 0.9, 0.9, 0.9], start=2) == [2], "saturated before the start: one MLP"
    with pytest.raises(ValueError, match="rule"):
        lz.probe_saturation_layer(acc, rule="knee")
    with pytest.raises(lz.LocalizationError, match="outside"):
        lz.flu_range(acc, start=10)
    with pytest.raises(lz.LocalizationError, match="finite"):
        lz.probe_saturation_layer([0.1, float("nan")])


def test_range_support_shares_the_path_patching_effect():
    sup = lz.range_support([0.0, 0.1, 0.5, 0.3, -0.1, 0.1], [2, 3])
    assert abs(sup["share_of_positive"] - 0.8) < 1e-9
    assert abs(sup["effect_inside"] - 0.8) < 1e-9 and abs(sup["effect_outside"] - 0.1) < 1e-9


def test_extraction_control_is_matched_to_flu_in_whole_layers(tiny):
    flu = lz.mlp_layers_localization(tiny, [0], task="sports")
    ext = lz.extraction_localization(tiny, 1, len(flu.mlp_layers), "sports")
    assert ext.mlp_layers == [1] and ext.n_params == flu.n_params and ext.method == "extraction"
    shifted = lz.extraction_localization(tiny, 1, 2)
    assert shifted.mlp_layers == [0, 1] and shifted.meta["shifted"]
    locs = lz.all_localizations(tiny, "sports", flu, extraction_layer=1)
    assert locs["extraction"].mlp_layers == [1] and "extraction" in lz.METHODS
    assert abs(lz.decoder_fraction(tiny, flu) - 0.5 * _mlp_size(tiny) * 2 / sum(
        m.numel for m in lz.weight_matrices(tiny))) < 1e-12


def test_ct_subset_reuses_the_per_fact_effects(tiny, facts):
    full = lz.causal_tracing(tiny, facts.subset(range(3)), n_samples=2, min_gap=None)
    sub = full.subset([0, 2])
    mean = full.per_item["nie"][[0, 2]].mean((0, 1))  # same noise draws as the full run
    L = tiny.n_layers
    np.testing.assert_allclose(sub.scores["mlp"], mean[:L], atol=1e-6)
    np.testing.assert_allclose(sub.scores["head"], mean[L:].reshape(L, -1), atol=1e-6)
    assert sub.info["n_facts"] == 2 and sub.info["n_items_used"] == 4 and sub.passes.forward == 0
    np.testing.assert_allclose(full.subset(range(3)).scores["head"], full.scores["head"], atol=1e-6)


def test_random_token_corruption_keeps_the_tokenized_length(tiny, facts):
    stats = {}
    ids = lz.corrupt_subject_tokens(tiny, facts, seed=1, stats=stats)
    pool = set(lz.ascii_token_ids(tiny.tokenizer).tolist())
    mask = facts.subject_mask()
    assert set(ids[mask].tolist()) <= pool, "draws come from the ASCII tokens, as the paper's"
    tok = tiny.tokenizer
    for i in range(len(facts)):
        real = facts.attention_mask[i].bool()
        n = lambda row: len(tok.encode(tok.decode(row), add_special_tokens=False))  # noqa: E731
        if n(facts.input_ids[i][real].tolist()) != n(ids[i][real].tolist()):
            stats["n_length_mismatch"] -= 1
    assert stats["n_length_mismatch"] == 0, "every fact either matches or is counted"
    anyway = lz.corrupt_subject_tokens(tiny, facts, seed=1, pool="any", same_length=False)
    assert torch.equal(anyway[~mask], facts.input_ids[~mask])


def test_paper_noise_rule_is_sqrt_of_scale_times_each_facts_std(tiny, facts):
    f = facts.subset([0])
    stds = lz.subject_embedding_stds(tiny, f)
    noise = lz.gaussian_subject_noise(tiny, f, 4, 3.0, seed=0, rule="paper_sqrt")
    got = float(noise[0][:, f.subject_pos[0]].std())
    assert abs(got - float(torch.sqrt(3.0 * stds[0]))) < 0.15 * got
    with pytest.raises(ValueError, match="noise rule"):
        lz.gaussian_subject_noise(tiny, f, 1, 3.0, 0, rule="rome")


# ----------------------------------------------------------------------------- the Site vocabulary

def test_pre_and_post_norm_mlp_sites_read_different_tensors(tiny, facts):
    """Gemma-3 norms the MLP's output before adding it: ``mlp_out_prenorm`` is the MLP module's
    output (TL mlp.hook_out), ``mlp_out`` the normed one (TL hook_mlp_out); likewise ``z`` / ``attn_out``."""
    from mechunlearn_utils.localize.flu import _mlp_output

    sites = [lz.Site("mlp_out_prenorm", 0), lz.Site("mlp_out", 0), lz.Site("resid_pre", 0),
             lz.Site("resid_mid", 0), lz.Site("attn_out", 0), lz.Site("resid_post", 0), lz.Site("resid_pre", 1)]
    assert lz.Site("mlp_out", 0).tl_name() == "blocks.0.hook_mlp_out"
    assert lz.Site("mlp_out_prenorm", 0).tl_name() == "blocks.0.mlp.hook_out"
    for backend in ("tl", "hf"):
        acts = lz.run_sites(tiny, facts.batch(), capture=sites, backend=backend).acts
        pre, post = acts[lz.Site("mlp_out_prenorm", 0)], acts[lz.Site("mlp_out", 0)]
        assert (pre - post).abs().max() > 1e-2  # different tensors
        torch.testing.assert_close(post, _mlp_output(tiny, 0, pre), atol=1e-5, rtol=1e-5)  # post = norm(pre)
        mid = acts[lz.Site("resid_mid", 0)]
        torch.testing.assert_close(mid, acts[lz.Site("resid_pre", 0)] + acts[lz.Site("attn_out", 0)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts[lz.Site("resid_post", 0)], mid + post, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts[lz.Site("resid_post", 0)], acts[lz.Site("resid_pre", 1)])
