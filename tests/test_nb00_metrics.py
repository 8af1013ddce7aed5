"""Notebook 00 (SMOKE run): model loads, lenses agree, facts are filtered and saved."""

import pandas as pd
import pytest

from mechunlearn_utils.workbook.notebook import known_athletes, known_facts

pytestmark = pytest.mark.notebook


def test_setup_metrics(smoke_metrics):
    m = smoke_metrics("00_setup")
    assert m["lens_max_logit_gap"] < 1e-3
    for fmt in ("normal", "question", "mcq"):
        assert 0 <= m[f"recall.{fmt}.accuracy"] <= 1
        assert 0 < m[f"recall.{fmt}.mean_p_norm"] < 1
    # the smoke subset is famous athletes: a model that recalls them well above chance (1/3)
    assert m["recall.normal.accuracy"] > 0.6
    assert 0 < m["athletes.n_known"] <= m["athletes.n_total"]
    assert 0 < m["facts.n_known"] <= m["facts.n_total"]
    assert isinstance(m["mcq_usable"], bool)
    for fmt, chance in (("question", 1 / 3), ("paper_question", 1 / 3), ("mcq", 0.25), ("paper_mcq", 0.25)):
        assert m[f"formats.{fmt}.n"] == m["athletes.n_known"] and m[f"formats.{fmt}.chance"] == chance
        assert 0 <= m[f"formats.{fmt}.accuracy"] <= 1 and 0 <= m[f"formats.{fmt}.p_value"] <= 1
        assert m[f"formats.{fmt}.above_chance"] == (m[f"formats.{fmt}.p_value"] < 0.05)
    for fmt, shots in (("mcq", 1), ("paper_mcq", 4)):  # the paper's CounterFact MCQ: 16 shots, 4 in SMOKE
        assert m[f"cf_formats.{fmt}.n_shots"] == shots and m[f"cf_formats.{fmt}.chance"] == 0.25
        assert 0 < m[f"cf_formats.{fmt}.n"] <= m["facts.n_known"] and 0 <= m[f"cf_formats.{fmt}.accuracy"] <= 1
        assert m[f"cf_formats.{fmt}.above_chance"] == (m[f"cf_formats.{fmt}.p_value"] < 0.05)


def test_setup_saves_known_facts_for_later_notebooks(smoke_metrics, smoke_results_dir):
    m = smoke_metrics("00_setup")
    athletes = known_athletes(smoke_results_dir)
    assert len(athletes) == m["athletes.n_known"]
    assert (athletes.p_correct >= m["athletes.min_p"]).all()
    assert m["athletes.min_p"] == 0.5, "the paper's filter: one-shot p(correct) >= 0.5"
    per_sport = {s: m[f"athletes.n_known.{s}"] for s in ("basketball", "baseball", "football")}
    assert sum(per_sport.values()) == m["athletes.n_known"]
    assert all(0 <= per_sport[s] <= m[f"athletes.n_total.{s}"] for s in per_sport)
    facts = known_facts(smoke_results_dir)
    assert len(facts) == m["facts.n_known"] and isinstance(facts.paraphrase_prompts[0], list)
