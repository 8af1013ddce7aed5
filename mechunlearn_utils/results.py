"""Where notebooks write what they found, and how later notebooks read it.

Every notebook writes ``RESULTS_DIR/<notebook stem>/metrics.json``: a flat dict of documented keys
(str -> number, string, bool or list of numbers). Writes are atomic (temp file + rename), so a crash
never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

# Which notebook produces which results directory: used to tell the user what to run.
NOTEBOOK_OF = {
    "00_setup": "notebooks/00_setup.py",
    "01_factual_recall_circuits": "notebooks/01_factual_recall_circuits.py",
    "02_localization": "notebooks/02_localization.py",
}


class MissingResultsError(FileNotFoundError):
    """An earlier notebook's results are missing; the message says which notebook to run."""


def notebook_dir(results_dir, stem: str) -> Path:
    path = Path(results_dir) / stem
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plain(value):
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric value {value} is not finite")
    if not isinstance(value, (str, int, float, bool, list, type(None))):
        raise TypeError(f"metric values must be numbers, strings, bools or lists, got {type(value)}")
    return value


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_metrics(results_dir, stem: str, metrics: dict) -> Path:
    """Write a flat metrics dict to RESULTS_DIR/<stem>/metrics.json atomically; returns the path."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            raise TypeError(f"metrics must be flat: {key!r} holds a dict (flatten it: '{key}.sub')")
        flat[str(key)] = _plain(value)
    path = notebook_dir(results_dir, stem) / "metrics.json"
    atomic_write_text(path, json.dumps(flat, indent=1, sort_keys=True))
    return path


def read_metrics(results_dir, stem: str) -> dict:
    """Read an earlier notebook's metrics, or say which notebook to run first."""
    path = Path(results_dir) / stem / "metrics.json"
    if not path.exists():
        source = NOTEBOOK_OF.get(stem, f"notebooks/{stem}.py")
        raise MissingResultsError(
            f"{path} is missing: run {source} first (same RESULTS_DIR), e.g. "
            f"`python -m mechunlearn_utils.runner --only {stem}`")
    return json.loads(path.read_text())


def require_file(results_dir, stem: str, name: str) -> Path:
    """Path of a file an earlier notebook saved, or a clear error naming that notebook."""
    path = Path(results_dir) / stem / name
    if not path.exists():
        source = NOTEBOOK_OF.get(stem, f"notebooks/{stem}.py")
        raise MissingResultsError(f"{path} is missing: run {source} first (same RESULTS_DIR)")
    return path


def save_figure(fig, results_dir, stem: str, name: str) -> Path:
    """Save a matplotlib figure as PNG next to the notebook's metrics."""
    path = notebook_dir(results_dir, stem) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
