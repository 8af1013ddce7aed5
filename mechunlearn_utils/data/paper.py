"""The paper's public data files: where they come from, fetching them, finding them.

* `PAPER_FILES`           file name -> (URL, sha256) of the paper's public files (never copied into
                          this repository; `fetch_paper_data` downloads them)
* `fetch_paper_data()`    download them into the cache (`paper_cache_dir()`), checking each sha256
                          (`python -m mechunlearn_utils fetch-paper-data`)
* `paper_file(name)`      where a file is: ``$MECHUNLEARN_PAPER_DATA``, then the cache, then the CI
                          copy (`core.paths.PAPER_DATA_DIR`); otherwise a PaperDataError naming the command

The files: the paper's Sports Facts (magikarp01/tasks, Nanda et al. 2023), its CounterFact facts
filtered for Gemma-7B (magikarp01/mechanistic-unlearning; CounterFact from kmeng01/rome, MIT) and the
multiple-choice questions for them (magikarp01/tasks).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from mechunlearn_utils.core.paths import PAPER_DATA_DIR, cache_root

ENV_VAR = "MECHUNLEARN_PAPER_DATA"
FETCH_COMMAND = "python -m mechunlearn_utils fetch-paper-data"

# Each path and sha256 was checked against git snapshots of the two repositories at these commits
# (`git show <commit>:<path> | sha256sum`, 2026-11-30); the download itself was never run from the
# development machine (no GitHub access there).
_TASKS = "https://raw.githubusercontent.com/magikarp01/tasks/7c1e4a9be15eb8e2847d475e9d56759fec80aa5f/facts/data"
_MU = ("https://raw.githubusercontent.com/magikarp01/mechanistic-unlearning/"
       "efbd355f8f699a353d6744e83a268c62a220156a/experiments/counterfact_manual")
PAPER_FILES = {
    "sports.csv": (f"{_TASKS}/sports.csv",
                   "926857c13eb4c5ecdc646c0358818d731edd21c34b20f4ed76e9d8c7d96db8c1"),
    "counterfact_gemma-7b.csv": (f"{_MU}/counterfact_google_gemma-7b.csv",
                                 "e5b242c2677ad1a2ac6601022e934be2c0b5acf4eeae49a558ed471273ccc17d"),
    "counterfact_mc_questions.parquet": (f"{_TASKS}/counterfact_mc_questions.parquet",
                                         "165fbd013132b9f5c6b354b6627ddd91b8d3b6896d29f29318913fe684a98b5a"),
}


class PaperDataError(ValueError):
    """A paper file is missing, could not be fetched or failed its sha256 check; the message says what
    to do (`data.datasets` turns it into its DataError)."""


def paper_cache_dir() -> Path:
    return cache_root() / "paper"


def _search_dirs() -> list[Path]:
    env = os.environ.get(ENV_VAR)
    return ([Path(env)] if env else []) + [paper_cache_dir(), PAPER_DATA_DIR]


def _no_file_message(name: str) -> str:
    return (f"the paper's {name} was not found: run `{FETCH_COMMAND}` to download the paper's files "
            f"(into {paper_cache_dir()}), or set {ENV_VAR}=/path/to/a/folder holding {name}")


def paper_file(name: str) -> Path:
    """Path of the paper's file `name`: $MECHUNLEARN_PAPER_DATA, the cache, then the CI copy."""
    for folder in _search_dirs():
        if (folder / name).exists():
            return folder / name
    raise PaperDataError(_no_file_message(name))


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_paper_data(dest: Path | None = None, files: dict | None = None, urlopen=urllib.request.urlopen,
                     log=print) -> list[Path]:
    """Download each of `files` (default `PAPER_FILES`) into `dest` (default the cache), checking its
    sha256; a file already there with the right sha256 is kept. Returns the paths."""
    dest = Path(dest) if dest else paper_cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (url, sha) in (files or PAPER_FILES).items():
        path = dest / name
        if path.exists() and sha256_of(path.read_bytes()) == sha:
            log(f"{name}: already there ({path})")
            paths.append(path)
            continue
        try:
            with urlopen(url, timeout=60) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise PaperDataError(
                f"could not download {name} from {url} ({reason}): no internet here? Download the files "
                f"on another machine (`{FETCH_COMMAND}` there, or the URLs in mechunlearn_utils/data/paper.py) "
                f"and set {ENV_VAR}=/path/to/that/folder, or copy them into {dest}") from None
        got = sha256_of(data)
        if got != sha:
            raise PaperDataError(f"{name} from {url} has sha256 {got}, expected {sha}: not saved")
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        log(f"{name}: {len(data):,} bytes, sha256 ok -> {path}")
        paths.append(path)
    return paths
