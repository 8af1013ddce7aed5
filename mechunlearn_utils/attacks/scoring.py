"""What every attack measures: forget accuracy of athletes, a thin view of the evaluation suite.

The probability of the *true* sport normalized over `evaluate.suite.EDIT_CANDIDATES` (the paper's
"continuous accuracy", the candidates `evaluate_task` uses) on athletes the attack did not train
on, scored by the suite's one scoring core (`evaluate.suite.candidate_logprobs`), optionally with a
soft prompt. Also the attacks' error type, the budget check and the half split of the athletes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mechunlearn_utils.data.prompts import PromptSet, sport_prompts
from mechunlearn_utils.data.tasks import split_half
from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES, candidate_logprobs, candidate_token_ids


class AttackError(ValueError):
    """An attack cannot run as asked (zero budget, unknown language, bad data); says why."""


def check_budget(steps: int, what: str) -> None:
    """Refuse an attack budget below one step with a message that says so."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise AttackError(f"{what}: an attack budget of {steps!r} steps does nothing; give steps >= 1 "
                          "(the notebook's RELEARN_STEPS / SOFT_PROMPT_STEPS parameters)")


def candidate_scores(model, prompts: list[str], cand_ids, correct, soft=None, batch_size: int = 32) -> pd.DataFrame:
    """Per prompt: p(correct) normalized over its candidate token ids, raw p, argmax hit.

    Prompts are batched in the given order and the candidates renormalized with torch's softmax
    (the attacks' rounding since they were written, kept so that runs compare bit for bit)."""
    if len(prompts) == 0:
        raise AttackError("nothing to evaluate: no prompts (is the athlete set empty?)")
    cand_ids = [list(c) for c in np.asarray(cand_ids)]
    pset = PromptSet(list(prompts), [[""] * len(c) for c in cand_ids], list(correct))
    lp = torch.from_numpy(np.stack(candidate_logprobs(model, pset, batch_size, cand_ids=cand_ids, soft=soft,
                                                      by_length=False)))
    r = torch.as_tensor(np.asarray(correct), dtype=torch.long)
    ar = torch.arange(len(r))
    norm = torch.softmax(lp, -1)
    return pd.DataFrame(dict(p_norm=norm[ar, r].numpy(), p_correct=lp[ar, r].exp().numpy(),
                             hit=(lp.argmax(-1) == r).numpy()))


def summary(scores: pd.DataFrame) -> dict:
    """{"p": mean normalized p, "acc": argmax accuracy, "n"} of `candidate_scores`."""
    return {"p": float(scores.p_norm.mean()), "acc": float(scores.hit.mean()), "n": int(len(scores))}


def _sport_scores(model, athletes: pd.DataFrame, fmt: str, template: str | None, answer_col: str, soft,
                  batch_size: int = 32) -> pd.DataFrame:
    if len(athletes) == 0:
        raise AttackError("no athletes to evaluate: the set is empty")
    pset = sport_prompts(list(athletes.athlete), list(athletes[answer_col]), fmt, candidates=EDIT_CANDIDATES,
                         template=template)
    return candidate_scores(model, pset.prompts, candidate_token_ids(model, pset.candidates), pset.correct,
                            soft, batch_size)


def sports_p_true(model, athletes: pd.DataFrame, fmt: str = "normal", template: str | None = None,
                  answer_col: str = "sport", soft=None, batch_size: int = 32) -> dict:
    """{"p": mean normalized p of `answer_col`, "acc": argmax accuracy, "n"} in one format
    (``soft``: a soft prompt [k, d] inserted after BOS)."""
    return summary(_sport_scores(model, athletes, fmt, template, answer_col, soft, batch_size))


def athlete_p_true(model, athletes: pd.DataFrame, fmt: str = "normal", template: str | None = None,
                   answer_col: str = "sport", soft=None) -> pd.Series:
    """Normalized p of `answer_col` per athlete (indexed by athlete name): score once, average subsets."""
    s = _sport_scores(model, athletes, fmt, template, answer_col, soft)
    return pd.Series(s.p_norm.values, index=list(athletes.athlete), name="p_true")


def split_forget(athletes: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(attack-train half, held-out half) of the forget athletes, fixed by `seed` (`tasks.split_half`)."""
    if len(athletes) < 2:
        raise AttackError(f"need at least 2 forget athletes to hold half out, got {len(athletes)}")
    return split_half(athletes, np.random.default_rng(seed))
