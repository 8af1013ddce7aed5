"""Unit tests of mechunlearn_utils.interp (lens, patching, heads) and its plots on the tiny random Gemma-3 (fast)."""

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn_utils import interp as C
from mechunlearn_utils.interp import common as Ccommon, patching as P
from mechunlearn_utils.viz import circuits_plots as V
from mechunlearn_utils.core.logits import final_logits
from mechunlearn_utils.core.sites import Site
from mechunlearn_utils.data.prompts import sport_prompt

CLEAN, CORRUPT = "Michael Jordan", "Tom Brady"  # two words each: equal token counts


@pytest.fixture(scope="module")
def setup(tiny):
    ids = {s: tiny.answer_token_id(" " + s) for s in ("basketball", "baseball", "football")}
    clean, corrupt = sport_prompt(CLEAN), sport_prompt(CORRUPT)
    return tiny, ids, clean, corrupt


@pytest.fixture(scope="module")
def patched(setup):
    tiny, ids, clean, corrupt = setup
    res = C.activation_patching(tiny, clean, corrupt, ids["basketball"], [ids["baseball"], ids["football"]],
                                components=("resid_pre", "resid_post", "mlp_out", "attn_out"), progress=False)
    return res


@pytest.fixture
def random_norms(tiny):
    """Give every RMSNorm of the tiny model a random gain (a fresh model has w = 0, i.e. gain 1,
    which would hide a mistake in how DLA folds Gemma's (1 + w) gains); restored afterwards."""
    norms = [p for n, p in tiny.hf.named_parameters() if "norm" in n and p.dim() == 1]
    saved = [p.detach().clone() for p in norms]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in norms:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    yield tiny
    with torch.no_grad():
        for p, old in zip(norms, saved):
            p.copy_(old)


def _ld(model, prompt, a, others):
    b = model.tokenize([prompt])
    with torch.no_grad():
        lg = final_logits(model, **b)[0]
    return float(lg[a] - lg[others].mean())


def test_logit_lens_last_layer_is_the_model_output(setup, random_norms):
    tiny, ids, clean, corrupt = setup
    cands = list(ids.values())
    lens = C.logit_lens(tiny, [clean, corrupt], [ids["basketball"], ids["football"]], cands, progress=False)
    assert len(lens) == 2 * tiny.n_layers and set(lens.layer) == set(range(tiny.n_layers))
    b = tiny.tokenize([clean, corrupt])
    with torch.no_grad():
        p = torch.softmax(final_logits(tiny, **b), -1)
    last = lens[lens.layer == tiny.n_layers - 1].sort_values("prompt")
    np.testing.assert_allclose(last.p_correct, [p[0, ids["basketball"]], p[1, ids["football"]]], rtol=1e-4)
    assert ((lens.p_norm > 0) & (lens.p_norm < 1)).all()
    cand_sum = lens[["p_basketball", "p_baseball", "p_football"]].sum(axis=1)
    assert ((cand_sum > 0) & (cand_sum <= 1 + 1e-6)).all()
    # rank 0 exactly when the answer is the top-1 token
    for row in lens.itertuples():
        assert (row.rank_correct == 0) == (row.top_token == tiny.tokenizer.decode(
            [ids["basketball"] if row.prompt == 0 else ids["football"]]))


def test_logit_lens_rejects_answer_outside_candidates(setup):
    tiny, ids, clean, _ = setup
    with pytest.raises(ValueError, match="not among"):
        C.logit_lens(tiny, [clean], ids["basketball"], [ids["baseball"]], progress=False)
    with pytest.raises(ValueError, match="empty"):
        C.logit_lens(tiny, [], 1, [1], progress=False)


def test_dla_components_sum_to_logit_diff(setup, random_norms):
    tiny, ids, clean, corrupt = setup
    others = [ids["baseball"], ids["football"]]
    dla = C.direct_logit_attribution(tiny, [clean, corrupt], ids["basketball"], others, progress=False)
    n_comp = 1 + tiny.n_layers * (tiny.n_heads + 1)
    assert len(dla) == 2 * n_comp
    sums = dla.groupby("prompt").dla.sum()
    totals = dla.groupby("prompt").logit_diff.first()
    np.testing.assert_allclose(sums, totals, rtol=1e-4, atol=1e-4)
    # and the total is the model's own logit difference (tiny Gemma has no soft-capping)
    np.testing.assert_allclose(totals, [_ld(tiny, p, ids["basketball"], others) for p in (clean, corrupt)],
                               rtol=1e-4, atol=1e-4)
    assert dla.dla.abs().max() > 0


def test_dla_heads_sum_to_attn_out_and_mlp_matches_projection(setup, random_norms):
    """Per-head slices of o_proj + frozen post-attn norm reproduce hook_attn_out's DLA."""
    tiny, ids, clean, _ = setup
    others = [ids["baseball"], ids["football"]]
    dla = C.direct_logit_attribution(tiny, [clean], ids["basketball"], others, progress=False)
    b = tiny.tokenize([clean])
    names = [f"blocks.{l}.hook_{c}" for l in range(tiny.n_layers) for c in ("attn_out", "mlp_out")]
    with torch.no_grad():
        acts, _ = Ccommon._capture(tiny, b, names + ["ln_final.hook_scale"])
        w = tiny.hf.lm_head.weight
        d = (w[ids["basketball"]] - w[others].mean(0)) * Ccommon._norm_gain(tiny.hf.model.norm)
        d = d / acts["ln_final.hook_scale"][0]
    mat = C.dla_matrix(dla)
    for l in range(tiny.n_layers):
        assert mat.loc[l, "attn"] == pytest.approx(float(acts[f"blocks.{l}.hook_attn_out"][0] @ d), abs=1e-4)
        assert mat.loc[l, "mlp"] == pytest.approx(float(acts[f"blocks.{l}.hook_mlp_out"][0] @ d), abs=1e-4)


def test_dla_rejects_overlap(setup):
    tiny, ids, clean, _ = setup
    with pytest.raises(ValueError, match="also among"):
        C.direct_logit_attribution(tiny, [clean], ids["basketball"], [ids["basketball"]], progress=False)


def test_patching_endpoints(setup, patched):
    tiny, ids, clean, corrupt = setup
    res = patched
    L, T = tiny.n_layers, len(tiny.encode(clean))
    for comp in ("resid_pre", "resid_post", "mlp_out", "attn_out"):
        assert res[comp].shape == (L, T) and np.isfinite(res[comp]).all()
    # clean / corrupt logit differences are the model's own
    others = [ids["baseball"], ids["football"]]
    assert res.clean_logit_diff == pytest.approx(_ld(tiny, clean, ids["basketball"], others), abs=1e-4)
    assert res.corrupt_logit_diff == pytest.approx(_ld(tiny, corrupt, ids["basketball"], others), abs=1e-4)
    # the whole residual at the last layer and final token: everything restored
    assert res["resid_post"][L - 1, T - 1] == pytest.approx(1.0, abs=1e-4)
    # positions before the subject are shared by both prompts: patching them is exactly nothing
    s0 = tiny.subject_positions(clean, CLEAN)[0]
    assert res.first_diff == s0
    assert (res["resid_pre"][:, :s0] == 0).all()
    # layer-0 resid_pre at a template token after the subject is the same embedding: a no-op
    assert abs(res["resid_pre"][0, T - 1]) < 1e-5
    # ... but at the subject it does something (an intervention that changes nothing is a bug)
    assert np.abs(res["resid_pre"][0, s0:s0 + 2]).max() > 1e-3
    # resid_post of layer l is resid_pre of layer l+1
    np.testing.assert_allclose(res["resid_post"][0], res["resid_pre"][1], atol=1e-4)


def test_patching_matches_plain_run_with_hooks(setup, patched):
    """The prefix-cached batched runner gives what a plain full-sequence run_with_hooks gives."""
    tiny, ids, clean, corrupt = setup
    others = [ids["baseball"], ids["football"]]
    c_ids = torch.tensor([tiny.encode(clean)])
    x_ids = torch.tensor([tiny.encode(corrupt)])
    _, cache = tiny.tl.run_with_cache(c_ids)
    T = c_ids.shape[1]
    for comp, l, p in [("mlp_out", 0, T - 3), ("attn_out", 1, T - 1), ("resid_pre", 1, T - 5)]:
        name = Site(comp, l).tl_name()

        def hook(t, hook, p=p, name=name):
            t[:, p] = cache[name][:, p]
            return t

        with torch.no_grad():
            lg = tiny.tl.run_with_hooks(x_ids, fwd_hooks=[(name, hook)])[0, -1]
        ld = float(lg[ids["basketball"]] - lg[others].mean())
        want = (ld - patched.corrupt_logit_diff) / (patched.clean_logit_diff - patched.corrupt_logit_diff)
        assert patched[comp][l, p] == pytest.approx(want, abs=1e-4)


def test_patching_without_shared_prefix(setup):
    """A pair that differs at position 0 (no BOS, subject first) runs without a prefix cache."""
    tiny, ids, _, _ = setup
    others = [ids["baseball"], ids["football"]]
    clean = tiny.encode("Michael Jordan plays the sport of")[1:]  # drop BOS: differs at position 0
    corrupt = tiny.encode("Tom Brady plays the sport of")[1:]
    pair = P._Pair(clean, corrupt, ids["basketball"], others, first_diff=0)
    name = Site("resid_pre", 1).tl_name()
    scores, cl, co = P._patch_engine(tiny, [pair], [name],
                                     lambda j, acts: [(p, [(name, p, None, acts[name][p])]) for p in (0, 3)])
    _, cache = tiny.tl.run_with_cache(torch.tensor([clean]))
    for p in (0, 3):
        def hook(t, hook, p=p):
            t[:, p] = cache[name][:, p]
            return t
        with torch.no_grad():
            lg = tiny.tl.run_with_hooks(torch.tensor([corrupt]), fwd_hooks=[(name, hook)])[0, -1]
        want = (float(lg[ids["basketball"]] - lg[others].mean()) - co[0]) / (cl[0] - co[0])
        assert scores[0][p] == pytest.approx(want, abs=1e-4)


def test_patching_positions_and_errors(setup):
    tiny, ids, clean, corrupt = setup
    others = [ids["baseball"], ids["football"]]
    res = C.activation_patching(tiny, clean, corrupt, ids["basketball"], others,
                                components=("mlp_out",), positions=[-1], progress=False)
    assert np.isnan(res["mlp_out"][:, :-1]).all() and np.isfinite(res["mlp_out"][:, -1]).all()
    with pytest.raises(ValueError, match="same number of tokens"):
        C.activation_patching(tiny, clean, sport_prompt("Kareem Abdul Jabbar"), ids["basketball"], others)
    with pytest.raises(ValueError, match="identically"):
        C.activation_patching(tiny, clean, clean, ids["basketball"], others)
    with pytest.raises(ValueError, match="unknown component"):
        C.activation_patching(tiny, clean, corrupt, ids["basketball"], others, components=("mlp",))
    with pytest.raises(ValueError, match="must not contain"):
        C.activation_patching(tiny, clean, corrupt, ids["basketball"], [ids["basketball"]])
    with pytest.raises(TypeError, match="token id"):
        C.activation_patching(tiny, clean, corrupt, " basketball", others)


def test_head_patching_all_heads_equals_attn_out(setup, patched):
    tiny, ids, clean, corrupt = setup
    others = [ids["baseball"], ids["football"]]
    heads = C.head_patching(tiny, clean, corrupt, ids["basketball"], others)
    assert heads.shape == (tiny.n_layers, tiny.n_heads) and np.isfinite(heads).all()
    assert np.abs(heads).max() > 1e-4
    # all heads of a layer at once == the layer's attention output (post-attn norm included)
    pair = P._prepare_pair(tiny, clean, corrupt, ids["basketball"], others)
    T, names = len(pair.clean_ids), [Site("z", l).tl_name() for l in range(tiny.n_layers)]

    def all_heads(j, acts):
        return [(l, [(names[l], T - 1, h, acts[names[l]][T - 1, h]) for h in range(tiny.n_heads)])
                for l in range(tiny.n_layers)]

    scores, _, _ = P._patch_engine(tiny, [pair], names, all_heads)
    for l in range(tiny.n_layers):
        assert scores[0][l] == pytest.approx(patched["attn_out"][l, T - 1], abs=1e-4)


def test_many_pairs_batched_equals_one_by_one(tiny):
    sid = {s: tiny.answer_token_id(" " + s) for s in ("basketball", "baseball", "football")}
    tuples = [(sport_prompt(a), sport_prompt(b), sid[s], [i for k, i in sid.items() if k != s])
              for a, b, s in [("Michael Jordan", "Tom Brady", "basketball"),
                              ("Kareem Abdul Jabbar", "Tom Brady Jeter", "basketball"),  # 3-token names
                              ("Derek Jeter", "Kobe Bryant", "baseball")]]
    many = C.activation_patching_many(tiny, tuples, ("mlp_out", "resid_pre"), progress=False)
    assert [r["mlp_out"].shape[1] for r in many] == [len(tiny.encode(t[0])) for t in tuples]
    for t, res in zip(tuples, many):
        one = C.activation_patching(tiny, *t, ("mlp_out", "resid_pre"), progress=False)
        for c in ("mlp_out", "resid_pre"):
            np.testing.assert_allclose(res[c], one[c], atol=1e-4)
        assert res.clean_logit_diff == pytest.approx(one.clean_logit_diff, abs=1e-5)
    athletes = pd.DataFrame(dict(athlete=["Michael Jordan", "Tom Brady", "Derek Jeter", "Kobe Bryant"],
                                 sport=["basketball", "football", "baseball", "basketball"]))
    pairs = C.corruption_pairs(tiny, athletes, seed=1)
    heads = C.head_patching_many(tiny, pairs, progress=False)
    assert heads.shape == (len(pairs), tiny.n_layers, tiny.n_heads)
    p = pairs.iloc[1]
    np.testing.assert_allclose(heads[1], C.head_patching(tiny, p.clean_prompt, p.corrupt_prompt, p.answer_id,
                                                         p.other_ids), atol=1e-4)
    # sites reuse full sweeps when given, and agree with fresh patching
    fresh = C.patch_sites(tiny, pairs, progress=False)
    reused = C.patch_sites(tiny, pairs, progress=False,
                           precomputed={a: r for a, r in zip(pairs.athlete, C.activation_patching_many(
                               tiny, pairs, ("mlp_out", "resid_pre", "attn_out"), progress=False))})
    np.testing.assert_allclose(fresh.restore, reused.restore, atol=1e-4)


def test_corruption_pairs_and_sites(tiny):
    athletes = pd.DataFrame(dict(athlete=["Michael Jordan", "Tom Brady", "Derek Jeter", "Kobe Bryant"],
                                 sport=["basketball", "football", "baseball", "basketball"]))
    pairs = C.corruption_pairs(tiny, athletes, seed=0)
    assert len(pairs) == 4 and pairs.attrs["n_unpaired"] == 0
    assert (pairs.sport != pairs.corrupt_sport).all()
    for p in pairs.itertuples():
        assert len(tiny.encode(p.clean_prompt)) == len(tiny.encode(p.corrupt_prompt)) == p.n_tokens
        assert p.answer_id == tiny.answer_token_id(" " + p.sport) and p.answer_id not in p.other_ids
    sites = C.patch_sites(tiny, pairs.head(2), progress=False)
    assert len(sites) == 2 * len(C.DEFAULT_SITES) * tiny.n_layers
    assert np.isfinite(sites.restore).all()
    curve = C.restore_by_layer(sites, "mlp_out", "subject_last")
    assert curve.shape == (tiny.n_layers,)
    # the final-token residual at the last layer carries everything the final token will read
    with pytest.raises(ValueError, match="no rows"):
        C.restore_by_layer(sites, "mlp_out", "final")
    lonely = pd.DataFrame(dict(athlete=["Michael Jordan"], sport=["basketball"]))
    assert C.corruption_pairs(tiny, lonely).attrs["n_unpaired"] == 1


def test_position_roles_and_alignment():
    toks = ["<bos>", "Fact", ":", "A", "B", "C", "plays", "of"]
    roles = C.position_roles(toks, [3, 4, 5])
    assert roles[3:6] == ["subj first", "subj mid", "subj last"] and roles[-1] == "+2:of"
    roles2 = C.position_roles(toks[:3] + ["A", "B", "plays", "of"], [3, 4])
    a1, a2 = np.arange(16.).reshape(2, 8), np.zeros((2, 7))
    table = C.align_by_role([a1, a2], [roles, roles2])
    assert list(table.columns[3:6]) == ["subj first", "subj mid", "subj last"]
    assert table["subj mid"].tolist() == [4.0, 12.0]  # only the first prompt has a middle token
    assert table["+2:of"].tolist() == [3.5, 7.5]
    with pytest.raises(ValueError):
        C.align_by_role([a1], [roles2])


def test_attention_and_extraction_heads(setup):
    tiny, ids, clean, corrupt = setup
    att = C.attention_to_subject(tiny, [clean, corrupt], [CLEAN, CORRUPT], progress=False)
    assert att.shape == (2, tiny.n_layers, tiny.n_heads)
    assert (att >= 0).all() and (att <= 1 + 1e-5).all() and att.max() > 0
    # against the full pattern from run_with_cache
    _, cache = tiny.tl.run_with_cache(torch.tensor([tiny.encode(clean)]))
    pos = tiny.subject_positions(clean, CLEAN)
    np.testing.assert_allclose(att[0, 1], cache["blocks.1.attn.hook_pattern"][0, :, -1, pos].sum(-1), atol=1e-5)
    with pytest.raises(ValueError, match="does not occur"):
        C.attention_to_subject(tiny, [clean], ["Larry Bird"], progress=False)
    dla = C.direct_logit_attribution(tiny, [clean, corrupt], ids["basketball"],
                                     [ids["baseball"], ids["football"]], progress=False)
    table = C.extraction_heads(dla, att)
    assert len(table) == tiny.n_layers * tiny.n_heads
    cand = table[table.candidate]
    min_dla = 0.05 * dla.groupby("prompt").logit_diff.first().mean()
    assert (cand.mean_dla >= min_dla).all() and (cand.attention_to_subject >= 0.1).all()
    if len(cand):
        assert table.candidate.iloc[0] and table.score.iloc[0] == cand.score.max()
    # a planted head wins
    fake = dla.copy()
    fake.loc[(fake.kind == "head") & (fake.layer == 1) & (fake.head == 2), "dla"] = 100.0
    fake["logit_diff"] = 10.0
    att2 = att.copy()
    att2[:, 1, 2] = 0.9
    assert C.extraction_heads(fake, att2).head_name.iloc[0] == "1.2"
    with pytest.raises(ValueError, match="covers"):
        C.extraction_heads(dla, att[:1])


def test_select_athletes_balanced():
    known = pd.DataFrame(dict(athlete=[f"a{i}" for i in range(12)] + ["Michael Jordan"],
                              sport=["basketball", "baseball", "football"] * 4 + ["basketball"]))
    sel = C.select_athletes(known, 7, seed=1)
    assert sel.athlete.iloc[0] == "Michael Jordan" and len(sel) == 7 and sel.athlete.is_unique
    assert sel.sport.value_counts().max() - sel.sport.value_counts().min() <= 1
    with pytest.raises(ValueError):
        C.select_athletes(known.head(0), 3)


def test_plots_and_widget(setup, patched):
    import matplotlib.pyplot as plt

    tiny, ids, clean, corrupt = setup
    fig = V.plot_patching_heatmaps({c: patched[c] for c in ("resid_pre", "mlp_out")}, patched.tokens)
    assert len(fig.axes) >= 2
    plt.close("all")
    athletes = pd.DataFrame(dict(athlete=["Michael Jordan", "Tom Brady"], sport=["basketball", "football"]))
    pairs = C.corruption_pairs(tiny, athletes)
    box = V.athlete_heatmap_widget(tiny, pairs, components=("mlp_out",), precomputed={"Michael Jordan": patched})
    dropdown, image = box.children[0].children[0], box.children[1]
    assert dropdown.options == ("Michael Jordan", "Tom Brady")
    first = image.value
    assert first[:4] == b"\x89PNG"
    dropdown.value = "Tom Brady"  # computes and draws the other athlete
    assert image.value[:4] == b"\x89PNG" and image.value != first
    assert not plt.get_fignums()  # figures are closed after rendering


def test_patching_direction_denoise_and_noise(setup):
    """denoise (clean into corrupt): 0 at the shared prefix, 1 when the whole final residual is
    patched; noise (corrupt into clean): 0 at the prefix, -1 for the whole final residual."""
    tiny, ids, clean, corrupt = setup
    others = [ids["baseball"], ids["football"]]
    L = tiny.n_layers
    res = {d: C.activation_patching(tiny, clean, corrupt, ids["basketball"], others, ("resid_pre", "resid_post"),
                                    progress=False, direction=d) for d in C.DIRECTIONS}
    assert res["denoise"].direction == "denoise" and res["noise"].direction == "noise"
    assert res["denoise"]["resid_post"][L - 1, -1] == pytest.approx(1.0, abs=1e-4)
    assert res["noise"]["resid_post"][L - 1, -1] == pytest.approx(-1.0, abs=1e-4)
    for d in C.DIRECTIONS:
        assert res[d].clean_logit_diff == pytest.approx(res["denoise"].clean_logit_diff, abs=1e-5)
        assert (res[d]["resid_pre"][:, :res[d].first_diff] == 0).all()
    heads = {d: C.head_patching(tiny, clean, corrupt, ids["basketball"], others, direction=d) for d in C.DIRECTIONS}
    assert heads["denoise"].shape == heads["noise"].shape == (L, tiny.n_heads)
    with pytest.raises(ValueError, match="direction"):
        C.activation_patching(tiny, clean, corrupt, ids["basketball"], others, progress=False, direction="up")
    assert C.patching_score(3.0, 5.0, 1.0, "denoise") == pytest.approx(0.5)
    assert C.patching_score(3.0, 5.0, 1.0, "noise") == pytest.approx(-0.5)
