"""Alternative formats and other languages: does the edit hold where it was not trained?

* `ALT_FORMATS`: question and multiple choice from the evaluation suite plus the three
  `prompts.SPORT_PARAPHRASE_TEMPLATES` no edit trains on.
* Other languages (`language_p_true`): one-shot prompts in French, German, Spanish from
  ``data/multilingual_templates.csv``; answers as the model says them. An answer word of several
  tokens is scored by its **first token** (the default, ``multi_token="first"``; the first tokens
  of a language's candidates must differ) or rejected (``multi_token="reject"``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechunlearn_utils.attacks.scoring import AttackError, athlete_p_true, candidate_scores, sports_p_true, summary
from mechunlearn_utils.core.paths import DATA_DIR
from mechunlearn_utils.data.prompts import SPORT_PARAPHRASE_TEMPLATES
from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES

LANGUAGE_CSV = DATA_DIR / "multilingual_templates.csv"
ALT_FORMATS = {
    "question": dict(fmt="question"),
    "mcq": dict(fmt="mcq"),
    **{f"para{i + 1}": dict(template=t) for i, t in enumerate(SPORT_PARAPHRASE_TEMPLATES)},
}


def formats_p_true(model, athletes: pd.DataFrame, names=tuple(ALT_FORMATS)) -> dict:
    """{format: forget p_true} for the alternative formats."""
    return {name: format_p_true(model, athletes, name)["p"] for name in names}


def _format_kwargs(name: str) -> dict:
    if name == "normal":
        return {}
    if name not in ALT_FORMATS:
        raise AttackError(f"unknown format {name!r}; choose from {['normal', *ALT_FORMATS]}")
    return ALT_FORMATS[name]


def format_p_true(model, athletes: pd.DataFrame, name: str, answer_col: str = "sport") -> dict:
    """Forget accuracy in one of `ALT_FORMATS` (or 'normal')."""
    return sports_p_true(model, athletes, answer_col=answer_col, **_format_kwargs(name))


def format_athlete_p_true(model, athletes: pd.DataFrame, name: str, answer_col: str = "sport") -> pd.Series:
    """`format_p_true`'s normalized p per athlete (indexed by name); its mean is `format_p_true`'s p."""
    return athlete_p_true(model, athletes, answer_col=answer_col, **_format_kwargs(name))


def load_language_templates(path=None) -> pd.DataFrame:
    """data/multilingual_templates.csv, indexed by language code (fr, de, es)."""
    path = Path(path) if path else LANGUAGE_CSV
    if not path.exists():
        raise AttackError(f"language templates not found: {path}")
    df = pd.read_csv(path, keep_default_na=False)
    need = {"language", "template", *EDIT_CANDIDATES}
    if need - set(df.columns):
        raise AttackError(f"{path} lacks column(s) {sorted(need - set(df.columns))}")
    bad = df[~df.template.str.contains("{athlete}", regex=False)]
    if len(bad):
        raise AttackError(f"{path}: template of {list(bad.language)} lacks '{{athlete}}'")
    empty = [(r.language, s) for r in df.itertuples() for s in EDIT_CANDIDATES if not str(getattr(r, s)).strip()]
    if empty:
        raise AttackError(f"{path}: empty answer word(s) {empty}")
    if df.language.duplicated().any():
        raise AttackError(f"{path}: duplicate language rows {sorted(df.language[df.language.duplicated()])}")
    df["template"] = df.template.str.replace("\\n", "\n", regex=False)
    return df.set_index("language")


def language_row(templates: pd.DataFrame, language: str) -> pd.Series:
    if language not in templates.index:
        raise AttackError(f"no template for language {language!r} in {LANGUAGE_CSV.name}; "
                          f"available: {', '.join(templates.index)} (add a row to the CSV)")
    return templates.loc[language]


def answer_token_ids(model, words: list[str], multi_token: str = "first") -> list[int]:
    """The token each answer word is scored by: its only token, or (``multi_token='first'``) the
    first of several; ``'reject'`` raises on a multi-token word. First tokens must differ."""
    if multi_token not in ("first", "reject"):
        raise AttackError(f"multi_token must be 'first' or 'reject', got {multi_token!r}")
    ids = []
    for w in words:
        toks = model.tokenizer(" " + str(w).strip(), add_special_tokens=False).input_ids
        if len(toks) > 1 and multi_token == "reject":
            pieces = [model.tokenizer.decode([t]) for t in toks]
            raise AttackError(f"answer {w!r} is {len(toks)} tokens for {model.name} ({pieces}); "
                              "use multi_token='first' to score its first token, or a one-token word")
        ids.append(toks[0])
    if len(set(ids)) < len(ids):
        dup = [w for w, i in zip(words, ids) if ids.count(i) > 1]
        raise AttackError(f"answers {dup} start with the same token for {model.name}: first-token "
                          "scoring cannot tell them apart; choose other words")
    return ids


def languages_p_true(model, templates: pd.DataFrame, languages: list[str], athletes: pd.DataFrame,
                     answer_col: str = "sport") -> dict:
    """{language: forget p_true} (every language checked before any model call)."""
    for lang in languages:
        language_row(templates, lang)
    return {lang: language_p_true(model, templates, lang, athletes, answer_col)["p"] for lang in languages}


def language_p_true(model, templates: pd.DataFrame, language: str, athletes: pd.DataFrame,
                    answer_col: str = "sport", multi_token: str = "first", soft=None) -> dict:
    """Forget accuracy (normalized p of `answer_col`) with the one-shot prompt of `language`."""
    row = language_row(templates, language)
    if len(athletes) == 0:
        raise AttackError("no athletes to evaluate: the set is empty")
    ids = answer_token_ids(model, [row[s] for s in EDIT_CANDIDATES], multi_token)
    prompts = [row.template.format(athlete=a) for a in athletes.athlete]
    correct = [list(EDIT_CANDIDATES).index(s) for s in athletes[answer_col]]
    return summary(candidate_scores(model, prompts, [ids] * len(prompts), correct, soft))
