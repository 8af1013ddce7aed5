"""Loaders for the project's data and the paper's reference copies; known-fact filters."""

import pandas as pd
import pytest

from mechunlearn_utils.data.datasets import (PAPER_DATA_DIR, DataError, load_athletes, load_counterfact,
                                             load_general_text, parse_list_cell)
from mechunlearn_utils.evaluate.known import filter_known_athletes
from mechunlearn_utils.data.prompts import SPORTS


def test_project_athletes_are_balanced_and_clean():
    df = load_athletes()
    assert len(df) >= 300 and set(df.sport) == set(SPORTS)
    assert df.sport.value_counts().min() >= 100
    assert not df.athlete.duplicated().any()


def test_project_counterfact_facts_are_complete():
    df = load_counterfact()
    assert len(df) >= 150
    assert all(len(p) >= 2 for p in df.paraphrase_prompts)
    assert all(len(n) == len(a) >= 3 for n, a in zip(df.neighborhood_prompts, df.neighborhood_answers))
    assert all(len(d) == 3 for d in df.mc_distractors)
    assert all(s in p for s, p in zip(df.subject, df.prompt))
    assert (df.target_true != df.target_new).all()


def test_general_text_is_a_few_hundred_kb():
    paras = load_general_text()
    assert sum(map(len, paras)) > 150_000 and len(paras) > 100


def test_numpy_repr_list_cells_parse():
    cell = "['The mother tongue of L\\u00e9on Blum is' 'The native language of Montesquieu is'\n 'Fran\\u00e7ois Bayrou, a native']"
    assert parse_list_cell(cell) == ["The mother tongue of L\u00e9on Blum is",
                                     "The native language of Montesquieu is", "Fran\u00e7ois Bayrou, a native"]
    assert parse_list_cell('["a", "b"]') == ["a", "b"]
    assert parse_list_cell("[\"it's\" 'x']") == ["it's", "x"]


@pytest.mark.skipif(not PAPER_DATA_DIR.exists(), reason="../shared/data/paper not present")
def test_papers_files_load_as_they_are():
    athletes = load_athletes("paper")
    assert len(athletes) == 1559 and set(athletes.sport) == set(SPORTS)
    cf = load_counterfact("paper")
    assert len(cf) == 2189
    first = cf.iloc[0]
    assert first.subject == "Danielle Darrieux" and first.target_true == " French" and first.target_new == " English"
    assert len(first.neighborhood_prompts) == 10 and first.neighborhood_prompts[1] == "The native language of Montesquieu is"
    assert first.mc_question == "What is the mother tongue of Danielle Darrieux?"
    assert sorted(x.strip() for x in first.mc_distractors) == ["English", "Italian", "Spanish"]


def test_bad_athlete_files_get_clear_errors(tmp_path):
    missing = tmp_path / "a.csv"
    missing.write_text("name,sport\nX,basketball\n")
    with pytest.raises(DataError, match="lacks column"):
        load_athletes(missing)
    unknown = tmp_path / "b.csv"
    unknown.write_text("athlete,sport\nX,cricket\n")
    with pytest.raises(DataError, match="unknown sport"):
        load_athletes(unknown)
    empty = tmp_path / "c.csv"
    empty.write_text("athlete,sport\n")
    with pytest.raises(DataError, match="no rows"):
        load_athletes(empty)
    with pytest.raises(DataError, match="not found"):
        load_athletes(tmp_path / "nope.csv")


def test_filter_known_athletes_applies_the_threshold(tiny):
    athletes = load_athletes().head(12)
    everyone = filter_known_athletes(tiny, athletes, min_prob=0.0)
    strict = filter_known_athletes(tiny, athletes, min_prob=0.99)
    assert len(strict) <= len(everyone) <= len(athletes)
    assert (everyone.p_correct >= 0).all() and strict.attrs["threshold"] == 0.99
    with pytest.raises(DataError, match="empty"):
        filter_known_athletes(tiny, athletes.head(0))


def test_known_fact_cache_is_keyed_by_the_weights(tiny, tmp_path, monkeypatch):
    """An edited model must not be served the base model's cached scores: editing one weight
    changes the cache key, so the scores are computed again (and a repeat of the same weights hits)."""
    import torch

    from mechunlearn_utils.evaluate import known

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path))
    monkeypatch.setattr(known, "UNCACHED_MODELS", set())
    calls = []
    real = known.score_prompts
    monkeypatch.setattr(known, "score_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    athletes = load_athletes().head(6)
    first = filter_known_athletes(tiny, athletes, min_prob=0.0)
    again = filter_known_athletes(tiny, athletes, min_prob=0.0)
    assert len(calls) == 1, "the same weights must hit the cache"
    assert again.attrs["cache"] == first.attrs["cache"]
    pd.testing.assert_frame_equal(first, again)  # the cache returns the numbers exactly
    weight = tiny.hf.model.layers[1].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] += 1.0
        edited = filter_known_athletes(tiny, athletes, min_prob=0.0)
        assert len(calls) == 2, "an edited model was served the base model's cached scores"
        assert edited.attrs["cache"] != first.attrs["cache"]
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    filter_known_athletes(tiny, athletes, min_prob=0.0)
    assert len(calls) == 2, "restoring the weights must find the base model's scores again"
