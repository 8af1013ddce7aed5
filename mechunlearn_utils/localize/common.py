"""Shared pieces of every localization method: fact sets, corruptions, and the result type of the
output-tracing methods.

Every activation is read and written through *sites* (`core.sites.Site`, `core.sites.run_sites`):
the same code runs on TransformerLens hooks, nnsight or plain PyTorch hooks (``backend=``; inside a
running bridge HF names carry ``_original_component``: `core.models.canonical_name` drops it). Note the MLP's output is the site
``mlp_out_prenorm`` (before Gemma's post-feedforward norm), as in the paper's AP (``mlp_out`` is
TransformerLens' ``hook_mlp_out``, after that norm).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from mechunlearn_utils.core.paths import STEMS
from mechunlearn_utils.core.logits import logit_diff
from mechunlearn_utils.core.sites import (BACKENDS, HEAD_KINDS, MLP_KINDS, SITE_KINDS, PassCounter,  # noqa: F401
                                          RunResult, Site, head_dim, run_sites)
from mechunlearn_utils.core.reproducibility import text_seed
from mechunlearn_utils.data.datasets import balanced_sample
from mechunlearn_utils.data.prompts import PromptSet

LOCALIZATIONS_DIR = (STEMS["localization"], "localizations")


class LocalizationError(ValueError):
    """A localization cannot be made or used as asked; the message says why."""


class UnknownFactError(LocalizationError):
    """Some facts are not known by the model (their right answer does not rank first)."""



# =========================================================================== facts

@dataclass(kw_only=True)
class FactSet(PromptSet):
    """A `data.prompts.PromptSet` (prompts, candidate answers, the right one) tokenized for
    localization, with the subject's token positions: the evaluator scores it like any PromptSet.

    ``candidates[i]`` are answer strings (leading space) and ``correct[i]`` the index of the right
    one; the logit difference is logit(right) - mean logit(other candidates).
    """

    task: str
    subjects: list[str]
    labels: list[str]
    input_ids: torch.Tensor = field(repr=False)
    attention_mask: torch.Tensor = field(repr=False)
    last_index: torch.Tensor = field(repr=False)
    subject_pos: list[list[int]] = field(repr=False)
    cand_ids: torch.Tensor = field(repr=False)

    @property
    def correct_ids(self) -> torch.Tensor:
        return self.cand_ids[torch.arange(len(self)), torch.tensor(self.correct)]

    def batch(self, idx=None, input_ids=None, trim: bool = False) -> dict:
        """Tokenized rows `idx` (all by default) as keyword arguments of a forward pass; `trim`:
        cut the padding columns past the rows' longest prompt (right padding lies after every row's
        last token, so no row's numbers depend on it; the activations are then that narrower)."""
        idx = torch.arange(len(self)) if idx is None else torch.as_tensor(idx)
        ids = self.input_ids if input_ids is None else input_ids
        width = int(self.last_index[idx].max()) + 1 if trim and len(idx) else ids.shape[1]
        return dict(input_ids=ids[idx, :width], attention_mask=self.attention_mask[idx, :width],
                    last_index=self.last_index[idx])

    def subject_mask(self) -> torch.Tensor:
        """Bool [fact, position]: True on the subject's tokens."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for i, pos in enumerate(self.subject_pos):
            mask[i, pos] = True
        return mask

    def subset(self, idx) -> "FactSet":
        idx = list(idx)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        t = torch.tensor(idx, dtype=torch.long)
        return FactSet(pick(self.prompts), pick(self.candidates), pick(self.correct), dict(self.meta),
                       task=self.task, subjects=pick(self.subjects), labels=pick(self.labels),
                       input_ids=self.input_ids[t], attention_mask=self.attention_mask[t],
                       last_index=self.last_index[t], subject_pos=pick(self.subject_pos), cand_ids=self.cand_ids[t])


def make_facts(model, task: str, prompts: list[str], subjects: list[str], candidates: list[list[str]],
               correct: list[int], labels: list[str] | None = None) -> FactSet:
    """Tokenize prompts and locate subjects; raises on an empty set or a multi-token answer."""
    if len(prompts) == 0:
        raise LocalizationError(f"the {task} fact set is empty: nothing to localize")
    if not (len(prompts) == len(subjects) == len(candidates) == len(correct)):
        raise LocalizationError("prompts, subjects, candidates and correct must have equal lengths")
    n_cands = {len(c) for c in candidates}
    if len(n_cands) != 1 or n_cands.pop() < 2:
        raise LocalizationError("every fact needs the same number (>= 2) of candidate answers")
    batch = model.tokenize(prompts)
    cand_ids = torch.tensor([[model.answer_token_id(c) for c in row] for row in candidates])
    subject_pos = [model.subject_positions(p, s) for p, s in zip(prompts, subjects)]
    labels = list(labels) if labels is not None else [c[i].strip() for c, i in zip(candidates, correct)]
    return FactSet(list(prompts), [list(c) for c in candidates], list(correct), dict(task=task),
                   task=task, subjects=list(subjects), labels=labels, input_ids=batch["input_ids"].cpu(),
                   attention_mask=batch["attention_mask"].cpu(), last_index=batch["last_index"].cpu(),
                   subject_pos=subject_pos, cand_ids=cand_ids)


def sports_facts(model, athletes: pd.DataFrame, n: int | None = None, seed: int = 0) -> FactSet:
    """Athletes in the paper's one-shot format, balanced over the sports; labels are the sports."""
    from mechunlearn_utils.data.prompts import SPORTS, sport_prompt

    if len(athletes) == 0:
        raise LocalizationError("no athletes given: the sports fact set is empty")
    df = balanced_sample(athletes, n, "sport", seed)
    cands = [" " + s for s in SPORTS]
    return make_facts(model, "sports", [sport_prompt(a) for a in df.athlete], list(df.athlete),
                      [cands] * len(df), [list(SPORTS).index(s) for s in df.sport], list(df.sport))


def counterfact_facts(model, facts: pd.DataFrame, n: int | None = None) -> FactSet:
    """The first `n` CounterFact facts: candidates [target_true, target_new], labels target_true."""
    if len(facts) == 0:
        raise LocalizationError("no CounterFact facts given: the fact set is empty")
    df = facts.head(n) if n else facts
    return make_facts(model, "counterfact", list(df.prompt), list(df.subject),
                      [[t, f] for t, f in zip(df.target_true, df.target_new)], [0] * len(df),
                      [t.strip() for t in df.target_true])


def require_known(facts: FactSet, logits: torch.Tensor, rows=None) -> None:
    """Raise `UnknownFactError` when a fact's right answer is not the model's top candidate."""
    rows = list(range(len(facts))) if rows is None else list(rows)
    cand = logits.gather(1, facts.cand_ids[rows].to(logits.device))
    top = cand.argmax(1).cpu().tolist()
    bad = [(rows[i], t) for i, t in enumerate(top) if t != facts.correct[rows[i]]]
    if bad:
        shown = ", ".join(f"{facts.subjects[r]!r} (says {facts.candidates[r][t].strip()!r}, not "
                          f"{facts.candidates[r][facts.correct[r]].strip()!r})" for r, t in bad[:5])
        raise UnknownFactError(
            f"{len(bad)} of {len(rows)} {facts.task} facts are not known by the model: {shown}"
            f"{' ...' if len(bad) > 5 else ''}. Localize only facts the model knows: filter them "
            "with data.filter_known_athletes / filter_known_facts (notebook 00 does).")


# =========================================================================== corruptions

def subject_embedding_std(model, facts: FactSet) -> float:
    """Std of the (scaled) input embeddings over all subject tokens of the fact set."""
    with torch.no_grad():
        emb = model.hf.get_input_embeddings()(facts.input_ids.to(model.hf.device)).float().cpu()
    return float(emb[facts.subject_mask()].std())


NOISE_RULES = ("scale_std", "paper_sqrt")


def subject_embedding_stds(model, facts: FactSet) -> torch.Tensor:
    """Per fact: std of the (scaled) input embeddings of that fact's subject tokens [fact]."""
    with torch.no_grad():
        emb = model.hf.get_input_embeddings()(facts.input_ids.to(model.hf.device)).float().cpu()
    return torch.tensor([float(emb[i, pos].std()) for i, pos in enumerate(facts.subject_pos)])


def gaussian_subject_noise(model, facts: FactSet, n_samples: int, scale: float, seed: int,
                           std: float | None = None, rule: str = "scale_std") -> torch.Tensor:
    """Noise [fact, sample, pos, d_model] on subject tokens, 0 elsewhere.

    * ``rule="scale_std"``: N(0, (scale * std)^2), std pooled over every subject token of the fact
      set (ROME's rule, scale 3).
    * ``rule="paper_sqrt"``: N(0, scale * std_i) per fact, i.e. noise level sqrt(scale * std_i) with
      std_i the std of fact i's own subject-token embeddings: literally what the paper's code does
      (``noise_level = torch.sqrt(3 * self.get_embedding_std())`` in
      localizations/causal_tracing/localizer.py of magikarp01/mechanistic-unlearning).

    Each fact's noise depends only on `seed` and its prompt (not on the other facts or padding).
    """
    if n_samples < 1:
        raise LocalizationError("causal tracing needs at least one noise sample")
    if rule not in NOISE_RULES:
        raise ValueError(f"unknown noise rule {rule!r}; choose one of {NOISE_RULES}")
    if rule == "paper_sqrt":
        level = torch.sqrt(scale * subject_embedding_stds(model, facts))
    else:
        std = subject_embedding_std(model, facts) if std is None else std
        level = torch.full((len(facts),), scale * std)
    F_, T = facts.input_ids.shape
    noise = torch.zeros((F_, n_samples, T, model.d_model))
    for i, pos in enumerate(facts.subject_pos):
        gen = torch.Generator().manual_seed(text_seed(seed, facts.prompts[i]))
        noise[i][:, pos] = torch.randn((n_samples, len(pos), model.d_model), generator=gen) * float(level[i])
    return noise


def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


@functools.lru_cache(maxsize=4)
def ascii_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens whose text is non-empty ASCII, special tokens excluded: the pool the
    paper draws its random subject tokens from (``is_ascii`` in masks_learning/create_masks.py
    of magikarp01/mechanistic-unlearning). Cached per tokenizer."""
    specials = special_token_ids(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = [i for i, t in enumerate(texts) if t.strip() and t.isascii() and i not in specials]
    if not ids:
        raise LocalizationError("the tokenizer has no ASCII token to corrupt subjects with")
    return torch.tensor(ids, dtype=torch.long)


def corrupt_subject_tokens(model, facts: FactSet, seed: int = 0, pool: str = "ascii",
                           same_length: bool = True, tries: int = 100, stats: dict | None = None) -> torch.Tensor:
    """input_ids with every subject token replaced by a random token, as the paper's AP does.

    Follows ``get_random_toks`` in masks_learning/create_masks.py (magikarp01/mechanistic-unlearning):
    draw len(subject) tokens from the ASCII tokens (``pool="ascii"``; ``"any"``: any non-special
    token, the workbook's earlier choice) and redraw, up to `tries` times, until the corrupted prompt,
    decoded and re-encoded, has the same number of tokens as the clean one (``same_length``): the
    corrupted text then reads as a prompt of the same tokenized length, not only the same ids count.
    A fact with no such draw in `tries` keeps its last draw; ``stats['n_length_mismatch']`` counts them.
    Each fact's draw depends only on `seed` and its prompt, so a fact is corrupted the same way in
    any subset of the fact set (AP on a subset reuses the full run's per-fact scores).
    """
    if pool not in ("ascii", "any"):
        raise ValueError(f"unknown token pool {pool!r}; choose 'ascii' or 'any'")
    tok = model.tokenizer
    vocab = model.hf.get_input_embeddings().weight.shape[0]
    specials = torch.tensor(sorted(special_token_ids(tok)), dtype=torch.long)
    choices = ascii_token_ids(tok) if pool == "ascii" else None
    ids = facts.input_ids.clone()
    mismatch = 0

    def n_tokens(row):
        return len(tok.encode(tok.decode(row), add_special_tokens=False))

    for i, pos in enumerate(facts.subject_pos):
        gen = torch.Generator().manual_seed(text_seed(seed, facts.prompts[i]))
        real = facts.attention_mask[i].bool()
        target = n_tokens(facts.input_ids[i][real].tolist()) if same_length else None
        for _ in range(max(1, tries)):
            if choices is not None:
                draw = choices[torch.randint(0, len(choices), (len(pos),), generator=gen)]
            else:
                draw = torch.randint(0, vocab, (len(pos),), generator=gen)
                bad = torch.isin(draw, specials)
                while bad.any():  # redraw special tokens
                    draw[bad] = torch.randint(0, vocab, (int(bad.sum()),), generator=gen)
                    bad = torch.isin(draw, specials)
            ids[i, pos] = draw
            if not same_length or n_tokens(ids[i][real].tolist()) == target:
                break
        else:
            mismatch += 1
    if stats is not None:
        stats.update(n_length_mismatch=mismatch, pool=pool, same_length=same_length)
    return ids


# --------------------------------------------------------------------------- helpers

def _softmax_p(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1).gather(1, ids[:, None].to(logits.device))[:, 0].cpu()


def _ld_metric(facts: FactSet, f_idx):
    cand = facts.cand_ids[f_idx]
    corr = torch.tensor(facts.correct)[f_idx]
    return lambda logits: logit_diff(logits.float().gather(1, cand.to(logits.device)), corr)


def _batched(model, facts: FactSet, sites, backend, batch_size, counter, input_ids=None) -> dict:
    """Clean (or given-input) runs over all facts: {'logits': [F, V] on cpu, Site: [F, ...]}."""
    out: dict = {"logits": []}
    for start in range(0, len(facts), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(facts)))
        run = run_sites(model, facts.batch(idx, input_ids), capture=sites, backend=backend,
                        counter=counter)
        out["logits"].append(run.logits.cpu())
        for s in sites:
            out.setdefault(s, []).append(run.acts[s].cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# --------------------------------------------------------------------------- OT results

# How a layer's score is formed from its components' scores (cb_utils/mask_utils.py of
# magikarp01/mechanistic-unlearning, `get_top_components_no_subcomponents_gqa`, combine_heads=True,
# combine_fn="sum"): attention = the SIGNED sum over heads and over the q, k, v, result scores;
# MLP = the signed sum of mlp_in and mlp_out (our mlp_out_prenorm); units are then ranked by the absolute value.
AGGREGATIONS = ("paper", "abs")
PAPER_AP_HEAD_KINDS = ("q", "k", "v", "z")  # z: o_proj's input; grad.delta there equals it at hook_result
PAPER_AP_MLP_KINDS = ("mlp_in", "mlp_out_prenorm")  # the MLP's input and output, both inside its norms


def aggregate_layer_scores(scores: dict, aggregation: str = "paper") -> dict:
    """Per layer attention and MLP scores {'attn': [L], 'mlp': [L]} from component scores.

    * AP scores ({q, k, v, z: [L, H], mlp_in, mlp_pre, mlp_out_prenorm: [L]}), ``"paper"``:
      attn[l] = |sum_h (q + k + v + z)[l, h]|, mlp[l] = |mlp_in[l] + mlp_out_prenorm[l]| (mlp_pre unused;
      the paper's `get_top_components_no_subcomponents_gqa`, cb_utils/mask_utils.py).
      ``"abs"`` (the workbook's earlier rule): sum of |score| over heads and every kind present
      (mlp_pre included), which lets many small scores of either sign add up.
    * CT scores ({head: [L, H], mlp: [L]}), ``"paper"``: attn[l] = |sum_h head[l, h]|,
      mlp[l] = |mlp[l]| (same function, on the causal-tracing graph); ``"abs"``: sum_h |head[l, h]|.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    paper = aggregation == "paper"
    if "head" in scores:  # causal tracing
        head, mlp = np.asarray(scores["head"], float), np.asarray(scores["mlp"], float)
        return {"attn": np.abs(head.sum(1)) if paper else np.abs(head).sum(1), "mlp": np.abs(mlp)}
    heads = [np.asarray(scores[k], float) for k in HEAD_KINDS if k in scores]
    if paper:
        mlps = [np.asarray(scores[k], float) for k in PAPER_AP_MLP_KINDS if k in scores]
        return {"attn": np.abs(sum(h.sum(1) for h in heads)), "mlp": np.abs(sum(mlps))}
    mlps = [np.asarray(scores[k], float) for k in MLP_KINDS if k in scores]
    return {"attn": np.asarray(sum(np.abs(h).sum(1) for h in heads)), "mlp": np.asarray(sum(np.abs(m) for m in mlps))}


@dataclass
class TracingResult:
    """Scores of one OT method: per component kind an array [layer] or [layer, head]."""

    method: str
    scores: dict
    per_item: dict = field(repr=False, default_factory=dict)
    info: dict = field(default_factory=dict)
    passes: PassCounter = field(default_factory=PassCounter)
    seconds: float = 0.0

    def subset(self, idx) -> "TracingResult":
        """Scores of a subset of the facts, from the stored per-fact numbers (no passes)."""
        idx = np.asarray(list(idx))
        if self.method == "ct":
            return self._ct_subset(idx)
        if self.method != "ap":
            raise LocalizationError(f"cannot subset a {self.method!r} result")
        denom = float((self.per_item["ld_clean"][idx] - self.per_item["ld_corrupt"][idx]).sum())
        if denom <= 0:
            raise LocalizationError("the corruption does not lower the logit difference on this subset")
        kinds = [k for k in self.scores]
        per = {k: self.per_item[k][idx] for k in kinds}
        per.update(ld_clean=self.per_item["ld_clean"][idx], ld_corrupt=self.per_item["ld_corrupt"][idx])
        info = dict(self.info, n_facts=len(idx), ld_clean=float(per["ld_clean"].mean()),
                    ld_corrupt=float(per["ld_corrupt"].mean()), subset_of=self.info.get("n_facts"))
        return TracingResult("ap", {k: per[k].sum(0) / denom for k in kinds}, per, info, PassCounter(), 0.0)

    def _ct_subset(self, idx) -> "TracingResult":
        nie, p_clean, p_corrupt = (self.per_item[k][idx] for k in ("nie", "p_clean", "p_corrupt"))
        gap = p_clean[:, None] - p_corrupt
        min_gap = self.info.get("min_gap", 0.0)
        used = gap > min_gap if min_gap is not None else np.ones_like(gap, dtype=bool)
        if not used.any():
            raise LocalizationError("the noise never lowered p(right answer) on this subset")
        L, H = np.asarray(self.scores["head"]).shape
        mean = nie[used].mean(0)
        info = dict(self.info, n_facts=len(idx), n_items_used=int(used.sum()), subset_of=self.info.get("n_facts"),
                    p_clean=float(p_clean.mean()), p_corrupt=float(p_corrupt.mean()))
        return TracingResult("ct", {"mlp": mean[:L], "head": mean[L:].reshape(L, H)},
                             dict(nie=nie, p_clean=p_clean, p_corrupt=p_corrupt), info, PassCounter(), 0.0)

    def layer_scores(self, aggregation: str = "paper") -> dict:
        """Per layer attention and MLP scores {'attn': [L], 'mlp': [L]}: see `aggregate_layer_scores`."""
        return aggregate_layer_scores(self.scores, aggregation)
