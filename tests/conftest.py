"""Shared fixtures: the tiny random model (unit tests) and one SMOKE run of the notebooks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Unit tests run in exact fp32 (their tolerances are fp32's). The SMOKE runs of the notebooks run
# what a user gets: each notebook's own DTYPE ("auto" in 02b-06: bf16 where the CPU runs it natively
# and measured faster, fp32 elsewhere; "float32" in 00-02), so CI covers the bf16 path on such hosts.
# MECHUNLEARN_SMOKE_DTYPE=float32 (or bfloat16) before pytest forces one dtype on the smoke runs.
os.environ.setdefault("MECHUNLEARN_DTYPE", "float32")
SMOKE_DTYPE = os.environ.get("MECHUNLEARN_SMOKE_DTYPE", "auto")

from mechunlearn_utils.core.paths import environment
from mechunlearn_utils.workbook.runner import notebook_stems, prerequisites, run_notebook


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random Gemma-3 with a word-level tokenizer (loads in about a second).

    One per test module: building the TransformerLens bridge wraps HF modules in place, which
    peft (LoRA) cannot target, so a module that never touches `.tl` gets an unwrapped model."""
    from mechunlearn_utils import load_model

    return load_model("tiny-random", "cpu")


@pytest.fixture(scope="module")
def task():
    """A small athletes_to_sport task (4 edited athletes, 8 maintained) from the athlete table."""
    from mechunlearn_utils.data.datasets import load_athletes
    from mechunlearn_utils.data.tasks import make_task

    athletes = load_athletes().groupby("sport").head(10).reset_index(drop=True)
    return make_task("athletes_to_sport", athletes=athletes, n=4, n_maintain=8)


@pytest.fixture(scope="module")
def text():
    """General text the tiny word-level tokenizer knows: athlete names, ten 600-character pieces."""
    from mechunlearn_utils.data.datasets import load_athletes

    names = " ".join(load_athletes().athlete)
    return [names[i:i + 600] for i in range(0, 6000, 600)]


@pytest.fixture(scope="session")
def smoke_results_dir(tmp_path_factory) -> Path:
    """RESULTS_DIR shared by the smoke runs (SMOKE_RESULTS_DIR reuses an earlier run's)."""
    given = os.environ.get("SMOKE_RESULTS_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("smoke_results")


@pytest.fixture(scope="session")
def smoke_metrics(smoke_results_dir):
    """`smoke_metrics(stem)` runs `stem` and the notebooks it depends on, each once (SMOKE=True),
    and returns its metrics."""
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def get(stem: str) -> dict:
        stems = notebook_stems()
        assert stem in stems, f"no notebook {stem}; have {stems}"
        for s in prerequisites(stem):
            if s in failed:
                pytest.fail(f"an earlier smoke run failed: {failed[s]}")
            if s not in done:
                reuse = smoke_results_dir / s / "metrics.json"
                if not (os.environ.get("SMOKE_RESULTS_DIR") and reuse.exists()):
                    try:
                        with environment({"MECHUNLEARN_DTYPE": SMOKE_DTYPE}):  # the kernels inherit it
                            run_notebook(s, smoke_results_dir, {"SMOKE": True})
                    except Exception as err:  # noqa: BLE001 - recorded, then reported
                        failed[s] = f"{s}: {err}"
                        pytest.fail(failed[s])
                done[s] = json.loads(reuse.read_text())
        return done[stem]

    return get
