"""Where things live: the one place that knows the repository layout and the cache folder.

* `REPO_ROOT`        the checkout (notebooks/, data/, results/ below it)
* `DATA_DIR`         the project's own data files (data/)
* `PAPER_DATA_DIR`   the paper's reference datasets (../shared/data/paper, CI only; never copied in)
* `NOTEBOOK_DIR`     the jupytext sources of the workbook
* `cache_root()`     converted models and known-fact caches (``$MECHUNLEARN_CACHE`` or ~/.cache/mechunlearn)
* `STEMS`            each notebook's stem (= its folder under RESULTS_DIR), by what it does
* `MissingResultsError`, `atomic_write_text`   reading and writing what notebooks leave in RESULTS_DIR
* `environment(values)`  environment variables set inside a block, put back as they were after it
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"
PAPER_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "paper"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
DEFAULT_RESULTS_DIR = REPO_ROOT / "results"


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set `values` in os.environ inside the block (processes started there inherit them); each
    variable is put back, or removed, on exit."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cache_root() -> Path:
    return Path(os.environ.get("MECHUNLEARN_CACHE", Path.home() / ".cache" / "mechunlearn"))


# The workbook's notebooks by what they do: the stem names notebooks/<stem>.py and RESULTS_DIR/<stem>/.
STEMS = {
    "setup": "00_setup",
    "circuits": "01_factual_recall_circuits",
    "localization": "02_localization",
    "depth": "02b_depth_sweep",
    "edits": "03_editing_and_unlearning",
    "latent": "04_probing_latent_knowledge",
    "attacks": "05_attacks",
    "masking": "06_weight_masking",
    "results": "07_results",
}


class MissingResultsError(FileNotFoundError):
    """An earlier notebook's results are missing; the message says which notebook to run."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename (never half-written)."""
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


def git_commit(root: Path = REPO_ROOT) -> str:
    """The checkout's commit (12 hex digits, "+dirty" when tracked files changed), "unknown" outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
