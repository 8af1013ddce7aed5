"""Prompt formats."""

import pytest

from mechunlearn_utils.data.datasets import load_counterfact
from mechunlearn_utils.data.prompts import (MCQ_LETTERS, counterfact_prompts, shuffled_options, sport_prompt,
                                       sport_prompts)


def test_normal_format_is_the_papers_one_shot_prompt():
    assert sport_prompt("LeBron James") == (
        "Fact: Tiger Woods plays the sport of golf\nFact: LeBron James plays the sport of")


def test_mcq_marks_the_right_letter_and_is_reproducible():
    a = sport_prompts(["LeBron James", "Babe Ruth"], ["basketball", "baseball"], "mcq")
    b = sport_prompts(["LeBron James", "Babe Ruth"], ["basketball", "baseball"], "mcq")
    assert a.prompts == b.prompts and a.correct == b.correct
    for prompt, right, sport in zip(a.prompts, a.correct, ["basketball", "baseball"]):
        assert f"{MCQ_LETTERS[right]}. {sport}" in prompt.split("Question:")[-1]
    assert a.candidates[0] == [" A", " B", " C", " D"]


def test_options_order_depends_on_key():
    orders = {tuple(shuffled_options("x", ["a", "b", "c"], k)[0]) for k in map(str, range(20))}
    assert len(orders) > 3
    with pytest.raises(ValueError, match="3 distractors"):
        shuffled_options("x", ["a"], "k")


def test_bad_sport_inputs_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        sport_prompts([], [])
    with pytest.raises(ValueError, match="unknown sport"):
        sport_prompts(["X"], ["cricket"])
    with pytest.raises(ValueError, match="unknown sports format"):
        sport_prompt("X", "haiku")
    with pytest.raises(ValueError, match="{athlete}"):
        sport_prompt("X", template="no placeholder")


def test_counterfact_formats():
    facts = load_counterfact().head(3)
    para = counterfact_prompts(facts, "paraphrase")
    assert len(para) == sum(len(p) for p in facts.paraphrase_prompts)
    neigh = counterfact_prompts(facts, "neighborhood")
    assert all(c[1] in set(facts.target_new) for c in neigh.candidates)
    mcq = counterfact_prompts(facts, "mcq")
    new = counterfact_prompts(facts, "mcq", answer="target_new")
    assert len(mcq) == 3 and all(a != b for a, b in zip(mcq.correct, new.correct))
    with pytest.raises(ValueError, match="unknown CounterFact format"):
        counterfact_prompts(facts, "poem")


def test_mcq_prompt_is_the_same_whichever_answer_is_scored():
    true = sport_prompts(["LeBron James"], ["basketball"], "mcq")
    injected = sport_prompts(["LeBron James"], ["golf"], "mcq")
    assert true.prompts == injected.prompts and true.correct != injected.correct


def test_paper_counterfact_mcq_is_the_papers_text_after_answered_shots():
    from mechunlearn_utils.data.prompts import PAPER_CF_MCQ_FORMAT, PAPER_CF_MCQ_SHOTS

    facts = load_counterfact()
    asked, shots = facts.head(3), facts.iloc[3:3 + PAPER_CF_MCQ_SHOTS]
    ours, paper = counterfact_prompts(asked, "mcq"), counterfact_prompts(asked, "paper_mcq", shots=shots)
    assert paper.correct == ours.correct and paper.candidates == ours.candidates  # same options, same order
    for prompt, right, row in zip(paper.prompts, paper.correct, asked.itertuples()):
        assert prompt.count("Help me answer the following multiple choice question:") == PAPER_CF_MCQ_SHOTS + 1
        assert prompt.count("Answer: ") == PAPER_CF_MCQ_SHOTS and prompt.endswith("A, B, C, or D. Answer:")
        last = prompt.split("Help me answer")[-1]
        assert f"{MCQ_LETTERS[right]}. {row.target_true.strip()}\n" in last
    shot_text = paper.prompts[0].split("Help me answer")[1]  # the first shot carries its right letter
    first = shots.iloc[0]
    letter = shot_text.split("Answer: ")[1][0]
    assert f"{letter}. {first.target_true.strip()}\n" in shot_text
    assert PAPER_CF_MCQ_FORMAT.startswith("Help me answer the following multiple choice question:\n\n{question}")
    new = counterfact_prompts(asked, "paper_mcq", answer="target_new", shots=shots)
    assert new.prompts == paper.prompts and new.correct != paper.correct
    with pytest.raises(ValueError, match="shots="):
        counterfact_prompts(asked, "paper_mcq")
    with pytest.raises(ValueError, match="apart"):
        counterfact_prompts(asked, "paper_mcq", shots=facts.head(2))

