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


def choose_threads(threads: int | str | None) -> int | None:
    """torch CPU threads for a notebook: an int is used as given; ``"auto"`` -> 1 when the machine
    is busier than its cores (two OpenMP threads per process then spin-wait against each other
    and ran several times slower, measured), else None (torch's default: one per core)."""
    if threads == "auto":
        return 1 if os.getloadavg()[0] > (os.cpu_count() or 1) else None
    return int(threads) if threads else None


def start(seed: int = 0, results_dir=None, threads: int | str | None = None) -> Path:
    """Seed every RNG, use deterministic kernels where cheap, choose the CPU threads
    (`choose_threads`), return the resolved RESULTS_DIR."""
    seed_everything(seed)
    n = choose_threads(threads)
    if n:
        torch.set_num_threads(n)
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
