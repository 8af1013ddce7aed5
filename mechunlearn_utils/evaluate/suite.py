"""The one evaluation suite: probabilities of candidate answers at the final token.

Every evaluation of the workbook is a view of one scoring core, `candidate_logprobs` (log p of
each prompt's candidate answers; optional soft prompt, batch order): `score_prompts` per prompt,
`measure_answers` / `sports_measure` / `counterfact_measure` as {"p", "acc"}, `evaluate_task` the
paper's whole suite; `edit.masking.edit_measures`, `edit.train.train_split_measures`, the attacks'
`sports_p_true` / `language_p_true` and the widgets' tables call these.

The 262k-token vocabulary of Gemma-3 makes full-sequence logits costly, so everything here takes
the hidden state at each prompt's last token and unembeds only that position; the one-shot example
every prompt of a format starts with runs once per batch (`forward.last_token_hidden`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.forward import last_token_hidden
from mechunlearn_utils.core.logits import final_logits, unembed  # noqa: F401 (final_logits: re-exported)
from mechunlearn_utils.data.prompts import PromptSet

# The answers a sports edit is scored over, everywhere (evaluate_task, masks, attacks, widgets):
# the three sports of the data plus golf, the injected answer of sport_to_golf.
EDIT_CANDIDATES = ("basketball", "baseball", "football", "golf")


def length_sorted_batches(model, prompts: list[str], batch_size: int):
    """Yield (indices, tokenized batch) with prompts of similar length together (less padding)."""
    lengths = [len(model.encode(p)) for p in prompts]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size].tolist()
        yield idx, model.tokenize([prompts[i] for i in idx])


def candidate_token_ids(model, candidates: list[list[str]]) -> list[list[int]]:
    """Token id of every candidate answer; raises on an answer that is not one token."""
    ids = {c: model.answer_token_id(c) for c in {c for row in candidates for c in row}}
    return [[ids[c] for c in row] for row in candidates]


@torch.no_grad()
def candidate_logprobs(model, pset: PromptSet, batch_size: int = 32, progress: bool = False, *,
                       cand_ids: list[list[int]] | None = None, soft: torch.Tensor | None = None,
                       by_length: bool = True) -> list[np.ndarray]:
    """The scoring core: for each prompt, log p(candidate token) over the full vocabulary at its
    last token (one float32 array per prompt). Every evaluation of the workbook goes through here.

    `cand_ids` overrides the candidates' token ids (e.g. first tokens of multi-token words);
    `soft` is a soft prompt [k, d] inserted after BOS; `by_length` batches prompts of similar
    length together (less padding), else in the given order."""
    if len(pset) == 0:
        raise ValueError("nothing to evaluate: the prompt set is empty")
    cand_ids = candidate_token_ids(model, pset.candidates) if cand_ids is None else cand_ids
    soft = None if soft is None else soft.detach()
    result: list[np.ndarray | None] = [None] * len(pset)
    batches = (list(length_sorted_batches(model, pset.prompts, batch_size)) if by_length else
               [(list(range(s, min(s + batch_size, len(pset)))), model.tokenize(pset.prompts[s:s + batch_size]))
                for s in range(0, len(pset), batch_size)])
    for idx, batch in tqdm(batches, desc="evaluating", disable=not progress, leave=False):
        hidden = last_token_hidden(model, batch["input_ids"], batch["attention_mask"], batch["last_index"], soft=soft)
        logp = torch.log_softmax(unembed(model, hidden).float(), dim=-1)
        for row, i in enumerate(idx):
            result[i] = logp[row, cand_ids[i]].cpu().numpy()
    return result  # type: ignore[return-value]


def normalized(lps: np.ndarray) -> np.ndarray:
    """Probabilities renormalized over each prompt's candidates (rows of [prompt, candidate] log p)."""
    return np.exp(lps - np.logaddexp.reduce(lps, axis=-1, keepdims=True))


def score_prompts(model, pset: PromptSet, batch_size: int = 32, progress: bool = False) -> pd.DataFrame:
    """One row per prompt: raw p(correct), p(correct) normalized over candidates, argmax hit."""
    logps = candidate_logprobs(model, pset, batch_size, progress)
    rows = []
    for i, (lp, right) in enumerate(zip(logps, pset.correct)):
        norm = normalized(lp)
        rows.append(dict(prompt=pset.prompts[i], p_correct=float(np.exp(lp[right])),
                         p_norm=float(norm[right]), hit=bool(np.argmax(lp) == right),
                         predicted=pset.candidates[i][int(np.argmax(lp))].strip()))
    return pd.DataFrame(rows)


def summarize(scores: pd.DataFrame) -> dict:
    """accuracy (argmax over candidates), mean normalized probability, mean raw probability."""
    return dict(n=int(len(scores)), accuracy=float(scores.hit.mean()),
                mean_p_norm=float(scores.p_norm.mean()), mean_p_correct=float(scores.p_correct.mean()))


def sports_recall(model, athletes: pd.DataFrame, fmt: str = "normal", template: str | None = None,
                  batch_size: int = 32, progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """Recall of athletes' sports in one format: (summary dict, per-athlete scores).

    The summary has n, accuracy (argmax over the candidate answers), mean_p_norm (probability of
    the right answer normalized over the candidates) and accuracy per sport.
    """
    from mechunlearn_utils.data.prompts import sport_prompts

    pset = sport_prompts(list(athletes.athlete), list(athletes.sport), fmt, template=template)
    scores = score_prompts(model, pset, batch_size, progress)
    scores.insert(0, "athlete", list(athletes.athlete))
    scores.insert(1, "sport", list(athletes.sport))
    summary = summarize(scores)
    summary["accuracy_by_sport"] = {s: float(g.hit.mean()) for s, g in scores.groupby("sport")}
    return summary, scores


# --------------------------------------------------------------------------- edit evaluation suite

def measure_answers(model, psets: dict[str, PromptSet], batch_size: int = 32) -> dict[str, dict]:
    """Several answers scored on the SAME prompts in one forward pass per batch.

    `psets` maps a label to a PromptSet; all must share prompts and candidates and differ only
    in which candidate is correct. Returns {label: {"p": mean normalized p, "acc": argmax hits,
    "p_raw": mean raw p over the whole vocabulary, "p_each": the normalized p of each prompt}}
    (raw: the paper's CounterFact measure, the first-token probability of the object, `tasks`
    facts/CounterFactTask.py; `p_each`: what a bootstrap over facts resamples).
    """
    first = next(iter(psets.values()))
    for label, ps in psets.items():
        if ps.prompts != first.prompts or ps.candidates != first.candidates:
            raise ValueError(f"prompt set {label!r} does not share prompts/candidates with the others")
    logps = candidate_logprobs(model, first, batch_size)
    out = {}
    for label, ps in psets.items():
        p = [float(normalized(lp)[c]) for lp, c in zip(logps, ps.correct)]
        hit = [int(np.argmax(lp)) == c for lp, c in zip(logps, ps.correct)]
        raw = [float(np.exp(lp[c])) for lp, c in zip(logps, ps.correct)]
        out[label] = {"p": float(np.mean(p)), "acc": float(np.mean(hit)), "p_raw": float(np.mean(raw)), "p_each": p}
    return out


def sports_measure(model, athletes: pd.DataFrame, answer_col, fmt: str,
                   candidates: tuple[str, ...], batch_size: int = 32) -> dict:
    """Mean normalized probability and argmax accuracy of `athletes[answer_col]` in one format.

    With a list of columns, returns {column: {"p", "acc"}} from a single pass over the prompts."""
    from mechunlearn_utils.data.prompts import sport_prompts

    cols = [answer_col] if isinstance(answer_col, str) else list(answer_col)
    psets = {c: sport_prompts(list(athletes.athlete), list(athletes[c]), fmt, candidates=candidates)
             for c in cols}
    out = measure_answers(model, psets, batch_size)
    return out[answer_col] if isinstance(answer_col, str) else out


def counterfact_measure(model, facts: pd.DataFrame, fmt: str, answer="target_true",
                        batch_size: int = 32) -> dict:
    """Mean normalized probability and accuracy of a CounterFact answer in one format (a list of
    answers -> {answer: {"p", "acc"}} from one pass)."""
    from mechunlearn_utils.data.prompts import counterfact_prompts

    answers = [answer] if isinstance(answer, str) else list(answer)
    out = measure_answers(model, {a: counterfact_prompts(facts, fmt, a) for a in answers}, batch_size)
    return out[answer] if isinstance(answer, str) else out


@torch.no_grad()
def lm_loss_on_text(model, paragraphs: list[str], context: int = 64, batch_size: int = 8,
                    each: list | None = None) -> float:
    """Mean next-token cross-entropy over the first `context` tokens of each paragraph (those with
    fewer tokens are skipped). `each`: a list to extend with every scored paragraph's own mean (all
    have `context` tokens, so their mean is the return value up to float rounding)."""
    ids = [x[:context] for x in (model.encode(p) for p in paragraphs) if len(x) >= context]
    if not ids:
        raise ValueError(f"no paragraph has {context} tokens")
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        t = torch.tensor(ids[start:start + batch_size], device=model.hf.device)
        hidden = model.hf.model(input_ids=t, use_cache=False).last_hidden_state[:, :-1]
        logits = unembed(model, hidden).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + t[:, 1:].numel()
        if each is not None:
            rows = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten(), reduction="none")
            each.extend(rows.view(len(t), -1).mean(1).tolist())
    return total / count


def evaluate_task(model, task, formats=("normal", "question", "mcq"), heldout_text: list[str] | None = None,
                  unrelated_facts: pd.DataFrame | None = None, lm_context: int = 64,
                  per_fact: dict | None = None) -> dict:
    """Every measure of the paper's suite for one (edited) model on one task, as a flat dict.

    Sports: ``forget.<fmt>.p_true`` / ``.acc_true`` (lower = the edit held), ``forget.<fmt>.p_target``
    (probability of the injected answer, edits only), ``maintain.<fmt>.p_true`` / ``.acc_true``.
    CounterFact: the same with formats prompt / paraphrase / mcq, plus ``neighborhood.p_true``, and
    the paper's raw measure ``forget.<fmt>.p_raw_true`` / ``maintain.<fmt>.p_raw_true`` (p of the
    true object's token over the whole vocabulary, not renormalized over the candidates).
    Side effects: ``side.lm_loss`` on held-out text, ``side.unrelated_acc`` on facts not edited.
    `per_fact`: a dict to fill with each ``*.p_true`` measure's value per fact (a list in the
    order of the task's eval rows) and ``side.lm_loss`` per held-out paragraph, for bootstrap
    intervals over facts / paragraphs (`evaluate.verdicts`).
    """
    out: dict[str, float] = {}
    each: dict[str, list] = per_fact if per_fact is not None else {}
    if task.kind == "sports":
        cands = EDIT_CANDIDATES
        cols = ["sport", "target"] if task.mode == "edit" else ["sport"]
        for fmt in formats:
            r = sports_measure(model, task.eval_forget, cols, fmt, cands)
            out[f"forget.{fmt}.p_true"], out[f"forget.{fmt}.acc_true"] = r["sport"]["p"], r["sport"]["acc"]
            if task.mode == "edit":
                out[f"forget.{fmt}.p_target"] = r["target"]["p"]
            m = sports_measure(model, task.eval_maintain, "sport", fmt, cands)
            out[f"maintain.{fmt}.p_true"], out[f"maintain.{fmt}.acc_true"] = m["p"], m["acc"]
            each[f"forget.{fmt}.p_true"], each[f"maintain.{fmt}.p_true"] = r["sport"]["p_each"], m["p_each"]
    else:
        for fmt in ("prompt", "paraphrase", "mcq"):
            r = counterfact_measure(model, task.eval_forget, fmt, ["target_true", "target_new"])
            out[f"forget.{fmt}.p_true"], out[f"forget.{fmt}.acc_true"] = r["target_true"]["p"], r["target_true"]["acc"]
            out[f"forget.{fmt}.p_target"] = r["target_new"]["p"]
            out[f"forget.{fmt}.p_raw_true"] = r["target_true"]["p_raw"]
            m = counterfact_measure(model, task.eval_maintain, fmt)
            out[f"maintain.{fmt}.p_true"], out[f"maintain.{fmt}.acc_true"] = m["p"], m["acc"]
            out[f"maintain.{fmt}.p_raw_true"] = m["p_raw"]
            each[f"forget.{fmt}.p_true"], each[f"maintain.{fmt}.p_true"] = r["target_true"]["p_each"], m["p_each"]
        out["neighborhood.p_true"] = counterfact_measure(model, task.eval_forget, "neighborhood")["p"]
    if heldout_text:
        each["side.lm_loss"] = []
        out["side.lm_loss"] = lm_loss_on_text(model, heldout_text, lm_context, each=each["side.lm_loss"])
    if unrelated_facts is not None and len(unrelated_facts):
        out["side.unrelated_acc"] = counterfact_measure(model, unrelated_facts, "prompt")["acc"]
    return out
