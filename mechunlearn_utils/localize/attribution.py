"""Attribution patching (AP), as in the paper's code, and real activation patching to check it.

Follows localizations/ap/ap_wrapper.py (`AP`, `get_caches`, `generate_attr_scores`) and the sports
run in masks_learning/create_masks.py of magikarp01/mechanistic-unlearning: sites hook_q, hook_k,
hook_v, hook_result (per head), mlp_in and mlp_out (our site ``mlp_out_prenorm``: the MLP's own
output, before Gemma's post-feedforward norm); score = gradient of the logit difference x
(corrupt - clean activation), summed over positions and batch; the corruption replaces the subject's
tokens with random ASCII tokens such that the prompt keeps its tokenized length
(`common.corrupt_subject_tokens`); 80 athletes. Layer scores and ranking: `common.aggregate_layer_scores`
(attention: |sum of the heads' signed q, k, v, result scores|; MLP: |mlp_in + mlp_out_prenorm|).

``hook_result`` is each head's output after W_O; we read ``z`` (o_proj's input) instead: the map from
a head's z to its result is linear, so grad . delta is the same at both (the conservation the unit
test checks for down_proj). ``mlp_pre`` (the gate activations) is also scored, only for the
workbook's earlier variant ``ap_abs``; the paper's aggregation ignores it. Every site costs nothing
extra: 2 forward + 1 backward passes per batch, whatever the number of components.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.sites import PassCounter, Site, run_sites
from mechunlearn_utils.interp.patching import Component, activation_patching  # noqa: F401 (re-exported)
from mechunlearn_utils.localize.common import (PAPER_AP_HEAD_KINDS, PAPER_AP_MLP_KINDS, FactSet, LocalizationError,
                                               TracingResult, _ld_metric, corrupt_subject_tokens, require_known)

AP_PAPER_FACTS = 80  # create_masks.py: df = df[:80]
PAPER_AP_KINDS = PAPER_AP_HEAD_KINDS + PAPER_AP_MLP_KINDS
# Scored by default: the paper's sites plus the gate activations (hook_pre) for the `ap_abs` variant.
# (The down_proj input, mlp_post, would add nothing: down_proj is linear, so its AP score equals mlp_out_prenorm's.)
AP_KINDS = ("q", "k", "v", "z", "mlp_in", "mlp_pre", "mlp_out_prenorm")


def _attr(site: Site, grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """grad x delta summed over positions (and d_head / features): [batch, head] or [batch]."""
    prod = (grad.float() * delta.float()).sum(1)
    return prod.sum(-1)


def attribution_patching(model, facts: FactSet, batch_size: int = 32, backend: str = "tl",
                         seed: int = 0, kinds=AP_KINDS, corrupt_ids: torch.Tensor | None = None,
                         progress: bool = False, pool: str = "ascii") -> TracingResult:
    """Attribution patching: 2 forward + 1 backward passes per batch, whatever the component count.

    Score of component c = sum_i grad_i . (a_corrupt,i - a_clean,i) / sum_i (LD_clean,i - LD_corrupt,i):
    a first-order estimate of the normalized change in logit difference when c alone is patched
    from the corrupted run into the clean one (near -1: c carries the whole effect).
    ``pool``: the random-token pool of `corrupt_subject_tokens` ("ascii", the paper's; "any").
    """
    t0 = time.perf_counter()
    counter = PassCounter()
    L = model.n_layers
    sites = [Site(k, l) for l in range(L) for k in kinds]
    stats: dict = {}
    corrupt_ids = corrupt_subject_tokens(model, facts, seed, pool, stats=stats) if corrupt_ids is None else corrupt_ids
    attr = {s: [] for s in sites}
    ld_clean, ld_corrupt = [], []
    for start in tqdm(range(0, len(facts), batch_size), desc="attribution patching",
                      disable=not progress, leave=False):
        idx = torch.arange(start, min(start + batch_size, len(facts)))
        metric = _ld_metric(facts, idx)
        clean = run_sites(model, facts.batch(idx), capture=sites, backend=backend, grad_metric=metric,
                          counter=counter)
        require_known(facts, clean.logits, idx.tolist())
        with torch.no_grad():
            corr = run_sites(model, facts.batch(idx, corrupt_ids), capture=sites, backend=backend,
                             counter=counter)
        ld_clean.append(clean.metric.cpu())
        ld_corrupt.append(metric(corr.logits).cpu())
        for s in sites:
            attr[s].append(_attr(s, clean.grads[s], corr.acts[s] - clean.acts[s]).cpu())
    ld_clean, ld_corrupt = torch.cat(ld_clean), torch.cat(ld_corrupt)
    denom = float((ld_clean - ld_corrupt).sum())
    if denom <= 0:
        raise LocalizationError("the random-token corruption does not lower the logit difference "
                                "on these facts: attribution patching has no effect to attribute")
    per_item = {k: torch.stack([torch.cat(attr[Site(k, l)]) for l in range(L)], 1).float().numpy()
                for k in kinds}  # [fact, layer(, head)]
    scores = {k: v.sum(0) / denom for k, v in per_item.items()}
    info = dict(n_facts=len(facts), ld_clean=float(ld_clean.mean()), ld_corrupt=float(ld_corrupt.mean()),
                backend=backend, corruption="random subject tokens", seed=seed, corruption_stats=stats,
                passes_per_batch=dict(forward=2, backward=1))
    per_item.update(ld_clean=ld_clean.float().numpy(), ld_corrupt=ld_corrupt.float().numpy())
    return TracingResult("ap", scores, per_item, info, counter, time.perf_counter() - t0)


def ap_component_value(ap: TracingResult, comp: Component) -> float:
    s = ap.scores[comp.kind]
    return float(s[comp.layer] if comp.head is None else s[comp.layer, comp.head])


def pick_components(ap: TracingResult, n: int = 12, seed: int = 0) -> list[Component]:
    """Half the components with the largest |AP score|, half drawn at random from the rest."""
    every = []
    for kind, s in ap.scores.items():
        if s.ndim == 1:
            every += [Component(kind, l) for l in range(len(s))]
        else:
            every += [Component(kind, l, h) for l in range(s.shape[0]) for h in range(s.shape[1])]
    if n > len(every):
        n = len(every)
    order = sorted(every, key=lambda c: -abs(ap_component_value(ap, c)))
    top = order[: n - n // 2]
    rest = order[n - n // 2:]
    rng = np.random.default_rng(seed)
    extra = [rest[i] for i in rng.choice(len(rest), size=min(n // 2, len(rest)), replace=False)]
    return top + extra


def _ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(np.asarray(x)).rank().to_numpy()  # average ranks for ties


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def ap_agreement(model, facts: FactSet, ap: TracingResult, n_components: int = 12,
                 batch_size: int = 64, backend: str = "tl", seed: int = 0) -> dict:
    """Compare attribution patching with real activation patching on a handful of components.

    Real patching is `interp.patching.activation_patching` with ``direction="noise"`` (corrupt
    into clean), the change AP estimates. Uses the same random-token corruption (same seed) as `ap`. Returns the components, both
    estimates, their Pearson and Spearman correlations and the passes real patching cost.
    """
    comps = pick_components(ap, n_components, seed)
    counter = PassCounter()
    t0 = time.perf_counter()
    real = activation_patching(model, facts, components=comps, batch_size=batch_size, backend=backend,
                               seed=ap.info.get("seed", seed), counter=counter, direction="noise")
    est = np.array([ap_component_value(ap, c) for c in comps])
    return dict(components=[str(c) for c in comps], ap=est.tolist(), patching=real.tolist(),
                pearson=_pearson(est, real), spearman=_pearson(_ranks(est), _ranks(real)),
                max_abs_diff=float(np.abs(est - real).max()), passes=counter.as_dict(),
                seconds=time.perf_counter() - t0)


