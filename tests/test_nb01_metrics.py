"""Notebook 01 (SMOKE run): the recall-circuit analysis ran, and its numbers make sense."""

import math

import pytest

pytestmark = pytest.mark.notebook

STEM = "01_factual_recall_circuits"
BY_LAYER = ("logit_lens_p_norm_by_layer", "logit_lens_p_correct_by_layer", "logit_lens_top1_frac_by_layer",
            "logit_lens_candidate_acc_by_layer", "dla_attn_by_layer", "dla_mlp_by_layer",
            "mlp_subject_last_restore_by_layer", "resid_subject_last_restore_by_layer",
            "attn_final_token_restore_by_layer", "resid_final_token_restore_by_layer")
RESTORE = [k for k in BY_LAYER if "restore" in k]


@pytest.fixture(scope="module")
def m(smoke_metrics):
    return smoke_metrics(STEM)


def _head(name, m):
    layer, head = (int(x) for x in name.split("."))
    assert 0 <= layer < m["n_layers"] and 0 <= head < m["n_heads"], name
    return layer, head


def test_structure(m):
    L = m["n_layers"]
    assert L > 0 and m["n_heads"] > 0
    for key in BY_LAYER:
        assert len(m[key]) == L, key
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m[key]), key
    assert 2 <= m["n_pairs"] <= m["n_athletes"]
    assert 1 <= m["n_grid_athletes"] <= m["n_pairs"]
    assert m["seconds_total"] > 0


def test_logit_lens(m):
    L = m["n_layers"]
    assert all(0 <= v <= 1 for k in BY_LAYER[:4] for v in m[k])
    # the athletes are ones the model knows (right sport ranked first among the three), and the
    # last lens layer IS the model's output: a lens that disagrees with the model is broken
    assert m["logit_lens_candidate_acc_by_layer"][-1] == pytest.approx(1.0)
    assert m["logit_lens_final_p_norm"] == pytest.approx(m["logit_lens_p_norm_by_layer"][-1])
    assert m["logit_lens_final_p_norm"] > 0.5
    assert -1 <= m["logit_lens_first_layer_top1"] < L
    first = m["logit_lens_first_layer_top1"]
    assert first == -1 or m["logit_lens_top1_frac_by_layer"][first] >= 0.5


def test_dla_decomposition_is_exact(m):
    assert m["dla_decomposition_max_error"] < 1e-2 * max(1.0, abs(m["dla_logit_diff_mean"]))
    total = m["dla_embed_mean"] + sum(m["dla_attn_by_layer"]) + sum(m["dla_mlp_by_layer"])
    assert total == pytest.approx(m["dla_logit_diff_mean"], abs=1e-2)
    assert m["dla_logit_diff_mean"] > 0  # known athletes: the right sport wins
    assert len(m["dla_top_components"]) == 5


def test_patching_restores_within_bounds_and_interventions_bite(m):
    L = m["n_layers"]
    for key in RESTORE:
        assert all(-0.5 <= v <= 1.5 for v in m[key]), key
    # the corruption changes the answer: clean and corrupt logit differences are far apart
    assert m["clean_logit_diff_mean"] - m["corrupt_logit_diff_mean"] > 1.0
    # layer-0 residual at the final token is the embedding of the same template token in both
    # prompts: patching it must do (almost exactly) nothing
    assert abs(m["resid_final_token_restore_by_layer"][0]) < 0.02
    # ... while the final-token residual entering the last layer carries (nearly) everything
    assert m["resid_final_token_restore_by_layer"][-1] > 0.8
    # patching the subject's residual restores a lot somewhere (the intervention does something)
    assert max(m["resid_subject_last_restore_by_layer"]) > 0.3
    assert max(m["mlp_subject_last_restore_by_layer"]) > 0.1
    assert len(m["top_mlp_layers_subject_last"]) == 3
    assert all(0 <= l < L for l in m["top_mlp_layers_subject_last"])
    assert 0 <= m["resid_handoff_layer"] < L


def test_two_stage_story(m):
    """The paper's qualitative claim, as far as a smoke run can test it: the fact is looked up by
    MLPs at the subject before it moves to the final token (early lookup, later extraction)."""
    L = m["n_layers"]
    best_mlp = m["top_mlp_layers_subject_last"][0]
    assert best_mlp < L // 2
    assert best_mlp < m["resid_handoff_layer"]
    # the answer is not readable at the final token before the handoff's attention layer
    assert m["logit_lens_first_layer_top1"] == -1 or m["logit_lens_first_layer_top1"] >= best_mlp


def test_attention_and_extraction_heads(m):
    assert 0 < m["attention_to_subject_max"] <= 1 + 1e-6
    _head(m["attention_to_subject_argmax"], m)
    heads = m["top_extraction_heads"]
    assert 1 <= len(heads) <= 3 and len(set(heads)) == len(heads)
    for h in heads:
        _head(h, m)
    assert m["top_extraction_head_dla"] > 0
    assert 0.1 <= m["top_extraction_head_attention"] <= 1 + 1e-6
    assert -0.5 <= m["top_extraction_head_patch_restore"] <= 1.5
    assert m["head_patch_restore_max"] > 0.05  # some single head matters when patched
