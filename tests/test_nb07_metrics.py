"""Notebook 07 (SMOKE run): verdicts are computed from the numbers, and agree with them."""

import pytest

from mechunlearn_utils.results import claim_verdict

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
    values = {k.split(".")[1]: v for k, v in edits.items()
              if k.startswith(task + ".") and k.endswith(f".forget.{fmt}.p_true") and ".base." not in k}
    assert m[f"verdict.generalizes.{task}"] == claim_verdict(values)[0]
    assert m["n_compared"] > 0
