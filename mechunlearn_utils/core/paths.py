"""Where things live: the one place that knows the repository layout and the cache folder.

* `REPO_ROOT`        the checkout (notebooks/, data/, results/ below it)
* `DATA_DIR`         the project's own data files (data/)
* `PAPER_DATA_DIR`   the paper's reference datasets (../shared/data/paper, CI only; never copied in)
* `NOTEBOOK_DIR`     the jupytext sources of the workbook
* `cache_root()`     converted models and known-fact caches (``$MECHUNLEARN_CACHE`` or ~/.cache/mechunlearn)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"
PAPER_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "paper"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
DEFAULT_RESULTS_DIR = REPO_ROOT / "results"


def cache_root() -> Path:
    return Path(os.environ.get("MECHUNLEARN_CACHE", Path.home() / ".cache" / "mechunlearn"))
