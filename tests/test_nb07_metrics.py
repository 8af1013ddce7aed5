"""Notebook 07 (SMOKE run): verdicts are computed from the numbers, and agree with them."""

import pytest

from mechunlearn_utils.workbook.results import claim_verdict

pytestmark = pytest.mark.notebook
VERDICTS = {"reproduced", "not reproduced", "mixed", "not measured"}


def test_verdicts_match_the_numbers(smoke_metrics):
    m = smoke_metrics("07_results")
    edits = smoke_metrics("03_editing_and_unlearning")
    setup = smoke_metrics("00_setup")
    verdicts = {k: v for k, v in m.items() if k.startswith("verdict.")}
    assert verdicts and set(verdicts.values()) <= VERDICTS
    fmt = "mcq" if setup["mcq_usable"] else "question"
    task = "athletes_to_sport"
    values = {k.split(".")[1]: v for k, v in edits.items()  # the mean, not 03's per-fact lists (`.per_fact.`)
              if k.startswith(task + ".") and k.split(".", 2)[2:] == [f"forget.{fmt}.p_true"] and ".base." not in k}
    assert values and all(isinstance(v, float) for v in values.values())
    assert m[f"verdict.generalizes.{task}"] == claim_verdict(values)[0]
    assert m["n_compared"] > 0


@pytest.mark.parametrize("claim,stem,measure", [
    ("relearning", "05_attacks", "relearn20.normal.p_true"),
    ("soft_prompt", "05_attacks", "soft_prompt.forget_p_true"),
    ("latent", "04_probing_latent_knowledge", "{pos}.true_acc.mid"),
    ("latent_paper", "04_probing_latent_knowledge", "paper.final.true_acc.mid"),
])
def test_attack_and_probe_verdicts_match_their_notebooks(smoke_metrics, claim, stem, measure):
    source = smoke_metrics(stem)  # run before 07 reads it
    m = smoke_metrics("07_results")
    measure = measure.format(pos=m["latent_position"])
    task = "athletes_to_sport"
    values = {k.split(".")[1]: v for k, v in source.items()
              if k.startswith(task + ".") and k.split(".", 2)[2:] == [measure] and ".base." not in k}
    assert values, f"{stem} wrote no {measure}"
    assert m[f"verdict.{claim}.{task}"] == claim_verdict(values)[0]


def test_the_paper_probe_verdict_carries_notebook_04_interval(smoke_metrics):
    probes, m = smoke_metrics("04_probing_latent_knowledge"), smoke_metrics("07_results")
    key = "verdict_ci.latent_paper.athletes_to_sport"
    assert probes[key] in VERDICTS | {"inconclusive"} and m[key] == probes[key]


def test_side_effect_and_soft_prompt_verdicts_carry_intervals(smoke_metrics):
    """03's LM loss per held-out paragraph and 05's held-out athletes under the soft prompt give those
    claims a bootstrap verdict too."""
    m = smoke_metrics("07_results")
    for claim in ("side_effects_lm", "soft_prompt"):
        assert m[f"verdict_ci.{claim}.athletes_to_sport"] in VERDICTS | {"inconclusive"}, claim
    # the soft-prompt interval is the one pooled over 05's splits (SMOKE: 2)
    attacks = smoke_metrics("05_attacks")
    assert m["verdict_ci.soft_prompt.athletes_to_sport"] == attacks["verdict_ci.soft_prompt_splits.athletes_to_sport"]


def test_editing_intervals_pool_the_seeds_notebook_03_edited(smoke_metrics):
    """03's SMOKE run edits athletes_to_sport with FLU and AP at a second seed: the generalization and
    side-effect intervals pool both seeds, and 07 says so."""
    edits, m = smoke_metrics("03_editing_and_unlearning"), smoke_metrics("07_results")
    assert edits["seeds"] == 2 and any(".per_fact_seed1." in k for k in edits)
    for claim in ("generalizes", "side_effects_maintain", "side_effects_lm"):
        assert m[f"ci_seeds.{claim}.athletes_to_sport"] == 2, claim
        assert m[f"verdict_ci.{claim}.athletes_to_sport"] in VERDICTS | {"inconclusive"}, claim
