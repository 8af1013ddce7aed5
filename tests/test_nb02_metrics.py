"""Notebook 02 (localization), SMOKE run: metrics.json and the saved localization files."""

import pytest

from mechunlearn_utils.localize import METHODS, VARIANTS, load_localizations

pytestmark = pytest.mark.notebook

TASKS = ("sports", "counterfact")
OT = ("ct", "ap", "ct_mlp", "ap_mlp", "random")


@pytest.fixture(scope="module")
def m(smoke_metrics):
    return smoke_metrics("02_localization")


def test_every_method_has_a_localization(m):
    L = m["n_layers"]
    for t in TASKS:
        for meth in METHODS:
            k = f"{t}.{meth}"
            assert m[f"{k}.n_params"] > 0, k
            layers = m[f"{k}.mlp_layers"] + m[f"{k}.attn_layers"]
            assert layers and all(0 <= l < L for l in layers), k
        assert m[f"{t}.all_mlps.mlp_layers"] == list(range(L)) and m[f"{t}.all_mlps.attn_layers"] == []
        assert m[f"{t}.nonlocalized.n_params"] > m[f"{t}.all_mlps.n_params"]


def test_parameter_budgets_match_flu(m):
    L = m["n_layers"]
    for t in TASKS:
        budget = m[f"{t}.flu.n_params"]
        assert m[f"{t}.budget"] == budget
        one_mlp = m[f"{t}.all_mlps.n_params"] // L  # no single matrix is larger than a whole MLP
        for meth in OT:
            n = m[f"{t}.{meth}.n_params"]
            assert budget <= n < budget + one_mlp, (t, meth, n, budget)
        assert m[f"{t}.ct_mlp.attn_layers"] == [] and m[f"{t}.ap_mlp.attn_layers"] == []
        assert len(m[f"{t}.random_mlps.mlp_layers"]) == len(m[f"{t}.flu.mlp_layers"])
        assert m[f"{t}.random_mlps.n_params"] == budget
        assert m[f"{t}.extraction.n_params"] == budget, "the control is matched to FLU in whole layers"
        assert m[f"{t}.extraction.mlp_layers"][0] <= m[f"{t}.extraction_heads.min_layer"]


def test_flu_pp_layers_are_exactly_those_passing_the_threshold(m):
    for t in TASKS:
        if m[f"{t}.flu.hand_given"]:
            continue
        thr, eff = m[f"{t}.flu.threshold"], m[f"{t}.flu.mlp_effect"]
        assert m[f"{t}.flu_pp.mlp_layers"] == [i for i, e in enumerate(eff) if e >= thr]
        assert len(eff) == m[f"{t}.flu.extraction_layer"] > max(m[f"{t}.flu_pp.mlp_layers"])
        assert m[f"{t}.flu.extraction_heads"] and m[f"{t}.flu.attn_layers"] == []
        assert m[f"{t}.flu.seconds"] > 0 and m[f"{t}.flu.forward_passes"] > 0
        assert m[f"{t}.extraction_heads.min_layer"] == min(int(h.split(".")[0]) for h in m[f"{t}.flu.extraction_heads"])


def test_sports_flu_is_the_probe_range(m):
    acc, tol, start = m["sports.probe.name_only"], m["sports.probe.saturation_tol"], m["sports.flu.start"]
    sat = m["sports.probe.saturation_layer"]
    from mechunlearn_utils.localize import probe_saturation_layer

    assert isinstance(sat, int) and sat == probe_saturation_layer(acc, tol, m["sports.probe.saturation_rule"])
    assert m["sports.probe.saturation_layer_max_rule"] == probe_saturation_layer(acc, tol, "max")
    assert m["sports.flu.mlp_layers"] == list(range(start, max(sat, start) + 1))
    assert 0 < m["sports.flu.decoder_fraction"] < 1
    assert isinstance(m["sports.extraction_heads.min_layer"], int)
    for choice in ("AP_aggregation", "CT_facts", "FLU_selection"):
        assert 0 <= m[f"sports.design.{choice}.jaccard"] <= 1


def test_costs_ap_is_constant_passes_ct_is_per_component(m):
    L = m["n_layers"]
    for t in TASKS:
        fwd, bwd = m[f"{t}.ap.forward_passes"], m[f"{t}.ap.backward_passes"]
        assert bwd >= 1 and fwd == 2 * bwd, "AP: 2 forward + 1 backward per batch"
        assert m[f"{t}.ap.forward_sequences"] == 2 * m[f"{t}.ap.n_facts"]
        nf, ns, seq = m[f"{t}.ct.n_facts"], m[f"{t}.ct.noise_samples"], m[f"{t}.ct.forward_sequences"]
        rows = (seq - nf) / (nf * ns)  # clean pass, then (1 + components) rows per item
        components = rows - 1
        assert components == int(components) and components % L == 0 and components // L >= 2
        assert m[f"ratio_ct_over_ap.{t}.forward_sequences"] > 1
        assert m[f"ratio_ct_over_ap.{t}.forward_sequences_per_fact"] > 10  # CT: a row per component
        assert m[f"{t}.ct.seconds"] > 0 and m[f"{t}.ap.seconds"] > 0
        assert m[f"{t}.random.forward_passes"] == 0  # baselines cost nothing


def test_tracing_sanity(m):
    for t in TASKS:
        assert m[f"{t}.ct.p_clean"] > m[f"{t}.ct.p_corrupt"], "the noise must destroy the fact"
        assert m[f"{t}.ap.ld_clean"] > m[f"{t}.ap.ld_corrupt"], "the corruption must lower the logit diff"
        assert len(m[f"{t}.ct.layer_mlp"]) == len(m[f"{t}.ap.layer_attn"]) == m["n_layers"]
        r = m[f"{t}.ap.agreement.pearson"]
        assert -1 <= r <= 1 and m[f"{t}.ap.agreement.n_components"] >= 4
    assert m["tl_vs_nnsight.ap_max_abs_diff"] < 1e-4


def test_probe_curves(m):
    for key in ("sports.probe.full_prompt", "sports.probe.name_only"):
        acc = m[key]
        assert len(acc) == m["n_layers"] and all(0 <= a <= 1 for a in acc)
        assert max(acc) >= 0.6, f"{key}: the sport of known athletes must be decodable somewhere"
    assert m["sports.probe.forward_sequences"] == 2 * m["sports.probe.n_athletes"]


def test_saved_localizations_load_back_and_match(smoke_results_dir, m):
    for t in TASKS:
        locs = load_localizations(smoke_results_dir, t)
        assert set(locs) == set(METHODS) | set(VARIANTS)
        for meth, loc in locs.items():
            assert loc.model_name == m["model"] and loc.task == t
            assert loc.n_params == m[f"{t}.{meth}.n_params"]
            assert loc.mlp_layers == m[f"{t}.{meth}.mlp_layers"]
            assert not any("_original_component" in p for p in loc.params), "names must be canonical HF"
            assert len(set(loc.params)) == len(loc.params)
        assert locs["flu"].meta["threshold"] == m[f"{t}.flu.threshold"]
        for meth in OT:
            assert locs[meth].n_params >= locs["flu"].n_params
