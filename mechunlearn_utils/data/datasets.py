"""Data: the project's own files in data/ and the paper's files (`data.paper`: fetched into the cache).

* `load_athletes(path)`       athlete,sport table (``"paper"``: the paper's sports.csv, see `data.paper`)
* `load_counterfact(path)`    CounterFact-style facts with list columns parsed
                              (``"paper"`` reads the paper's CSV, numpy-repr lists, + its MC parquet)
* `load_general_text(path)`   paragraphs of general English for the LM retain loss / side effects

Which of these facts a model knows is an evaluation: `evaluate.known`.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pandas as pd

from mechunlearn_utils.core.paths import DATA_DIR, PAPER_DATA_DIR  # noqa: F401 (re-exported: tests)
from mechunlearn_utils.data.paper import PaperDataError, paper_file
from mechunlearn_utils.data.prompts import SPORTS

ATHLETES_CSV = DATA_DIR / "athletes.csv"
COUNTERFACT_CSV = DATA_DIR / "counterfact_facts.csv"
GENERAL_TEXT = DATA_DIR / "general_text.txt"

CF_LIST_COLUMNS = ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers", "mc_distractors")


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the problem."""


def _resolve(path, default: Path, paper_name: str) -> Path:
    if path is None or str(path) == "default":
        return default
    if str(path) == "paper":
        try:
            return paper_file(paper_name)
        except PaperDataError as err:
            raise DataError(str(err)) from None
    return Path(path)


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    if len(df) == 0:
        raise DataError(f"{path} has a header but no rows")
    return df


# --------------------------------------------------------------------------- athletes

def load_athletes(path=None, sports: tuple[str, ...] = SPORTS) -> pd.DataFrame:
    """Athletes with their sport: columns athlete, sport (lower case, one of `sports`)."""
    path = _resolve(path, ATHLETES_CSV, "sports.csv")
    df = _read_csv(path)
    missing = {"athlete", "sport"} - set(df.columns)
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}; it needs athlete,sport")
    df = df[["athlete", "sport"]].dropna().copy()
    df["athlete"] = df.athlete.astype(str).str.strip()
    df["sport"] = df.sport.astype(str).str.strip().str.lower()
    bad = sorted(set(df.sport) - set(sports))
    if bad:
        raise DataError(f"{path}: unknown sport(s) {bad}; expected one of {list(sports)}")
    if len(df) == 0:
        raise DataError(f"{path} has no athletes")
    return df.drop_duplicates("athlete").reset_index(drop=True)


# --------------------------------------------------------------------------- CounterFact

_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)


def parse_list_cell(cell) -> list[str]:
    """A list cell as the paper's CSV writes it (numpy repr ``['a' 'b'\\n 'c']``) or as JSON."""
    if isinstance(cell, list):
        return cell
    if cell is None or (isinstance(cell, float) and pd.isna(cell)):
        return []
    text = str(cell).strip()
    if text.startswith("[") and "," in text:
        try:
            return [str(x) for x in json.loads(text)]
        except json.JSONDecodeError:
            pass
    return [ast.literal_eval(m) for m in _QUOTED.findall(text)]


def load_counterfact(path=None, mc_path=None) -> pd.DataFrame:
    """CounterFact-style facts, one row per fact, list columns as Python lists.

    Columns: case_id, relation_id, subject, prompt, target_true, target_new (answers keep their
    leading space), paraphrase_prompts, neighborhood_prompts, neighborhood_answers, mc_distractors,
    mc_question (may be empty: then MC asks to complete the prompt).
    """
    path = _resolve(path, COUNTERFACT_CSV, "counterfact_gemma-7b.csv")
    df = _read_csv(path)
    if "target_new" not in df.columns and "target_false" in df.columns:
        df = _from_paper_counterfact(df, path, mc_path)
    need = {"subject", "prompt", "target_true", "target_new", *CF_LIST_COLUMNS}
    missing = need - set(df.columns)
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}")
    for col in CF_LIST_COLUMNS:
        df[col] = df[col].map(parse_list_cell)
    for col in ("target_true", "target_new"):
        df[col] = df[col].astype(str).map(lambda s: s if s.startswith(" ") else " " + s)
    for col in ("neighborhood_answers", "mc_distractors"):
        df[col] = df[col].map(lambda xs: [x if x.startswith(" ") else " " + x for x in xs])
    if "mc_question" not in df.columns:
        df["mc_question"] = ""
    df["mc_question"] = df.mc_question.fillna("").astype(str)
    if "case_id" not in df.columns:
        df["case_id"] = range(len(df))
    bad = df[df.target_true.str.strip() == df.target_new.str.strip()]
    if len(bad):
        raise DataError(f"{path}: target_new equals target_true for {list(bad.subject)[:3]}")
    return df.reset_index(drop=True)


def _from_paper_counterfact(df: pd.DataFrame, path: Path, mc_path) -> pd.DataFrame:
    """Map the paper's columns to ours; MC questions come from its parquet (by prompt_id)."""
    df = df.rename(columns={"target_false": "target_new"}).copy()
    df["subject"] = df.subject.astype(str).str.strip()
    df["neighborhood_prompts"] = df.neighborhood_prompts.map(parse_list_cell)
    df["paraphrase_prompts"] = df.paraphrase_prompts.map(parse_list_cell)
    df["neighborhood_answers"] = [[t] * len(n) for t, n in zip(df.target_true, df.neighborhood_prompts)]
    mc_path = Path(mc_path) if mc_path else path.parent / "counterfact_mc_questions.parquet"
    df["mc_question"], df["mc_distractors"] = "", [[] for _ in range(len(df))]
    if mc_path.exists():
        mc = pd.read_parquet(mc_path).set_index("prompt_id")
        has = df.prompt_id.isin(mc.index)
        df.loc[has, "mc_question"] = [mc.at[i, "question"] for i in df.prompt_id[has]]
        df.loc[has, "mc_distractors"] = pd.Series(
            [list(mc.at[i, "targets_false"]) for i in df.prompt_id[has]], index=df.index[has])
    return df


# --------------------------------------------------------------------------- general text

def load_general_text(path=None, min_chars: int = 200) -> list[str]:
    """Paragraphs (blank-line separated) of general English text."""
    path = Path(path) if path else GENERAL_TEXT
    if not path.exists():
        raise DataError(f"general text file not found: {path}")
    paras = [p.strip().replace("\n", " ") for p in path.read_text(encoding="utf-8").split("\n\n")]
    paras = [p for p in paras if len(p) >= min_chars]
    if not paras:
        raise DataError(f"{path} holds no paragraph of at least {min_chars} characters")
    return paras


def balanced_sample(df: pd.DataFrame, n: int | None, by: str, seed: int = 0) -> pd.DataFrame:
    """Up to `n` rows spread evenly over the values of column `by` (all rows when n is None)."""
    if n is None or n >= len(df):
        return df.reset_index(drop=True)
    if n < 1:
        raise ValueError(f"asked for {n} rows: need at least one")
    shuffled = df.sample(frac=1.0, random_state=seed)
    shuffled["_rank"] = shuffled.groupby(by).cumcount()
    return shuffled.sort_values(["_rank", by]).head(n).drop(columns="_rank").reset_index(drop=True)
