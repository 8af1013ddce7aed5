"""Small helpers every notebook calls: seeding, result paths, the facts notebook 00 chose."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mechunlearn_utils.core.paths import REPO_ROOT, STEMS
from mechunlearn_utils.workbook.results import require_file

SETUP_STEM = STEMS["setup"]
KNOWN_ATHLETES_FILE = "known_athletes.csv"
KNOWN_FACTS_FILE = "known_facts.json"


def resolve_results_dir(results_dir: str | os.PathLike | None) -> Path:
    """'' or None -> <repo>/results; relative paths are taken from the repository root."""
    if not results_dir:
        return REPO_ROOT / "results"
    path = Path(results_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(seed: int = 0, results_dir=None, threads: int | None = None) -> Path:
    """Seed every RNG, use deterministic kernels where cheap, return the resolved RESULTS_DIR."""
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = resolve_results_dir(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def known_athletes(results_dir) -> pd.DataFrame:
    """The athletes notebook 00 found the model knows (athlete, sport, p_correct, p_norm)."""
    return pd.read_csv(require_file(results_dir, SETUP_STEM, KNOWN_ATHLETES_FILE))


def known_facts(results_dir) -> pd.DataFrame:
    """The CounterFact facts notebook 00 found the model knows (list columns as lists)."""
    return pd.read_json(require_file(results_dir, SETUP_STEM, KNOWN_FACTS_FILE), orient="records")
