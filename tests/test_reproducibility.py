"""Same SEED, same inputs: the same metrics (a notebook run twice on the tiny model)."""

import json

import pytest

from mechunlearn_utils.runner import run_notebook

pytestmark = pytest.mark.notebook
TIMING_KEYS = ("seconds", "load_seconds")


def test_setup_notebook_is_reproducible(tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        run_notebook("00_setup", out, {"SMOKE": True, "MODEL": "tiny-random", "MIN_P_ATHLETE": 0.0,
                                       "MIN_P_FACT": 0.0})
        metrics = json.loads((out / "00_setup" / "metrics.json").read_text())
        runs.append({k: v for k, v in metrics.items() if not any(t in k for t in TIMING_KEYS)})
    assert runs[0] == runs[1]
    assert runs[0]["athletes.n_total"] > 0
