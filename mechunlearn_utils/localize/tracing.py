"""Causal tracing (CT), as in the paper's code.

Follows localizations/causal_tracing/localizer.py (`CausalTracingLocalizer`) and the sports run in
masks_learning/create_masks.py of magikarp01/mechanistic-unlearning: Gaussian noise on the subject's
token embeddings; restore, one at a time, each head's result and each MLP's output to its clean
value; score = normalized indirect effect (p_restored - p_noised) / (p_clean - p_noised) of the
right answer; the paper uses the first 80 athletes of its sports.csv and one noise draw per run.

Differences, on purpose: the noised run and the restored runs share one noise draw per (fact,
sample) (the paper draws fresh noise in every run, which adds noise-to-noise variance to every
score); heads are restored at ``hook_z`` (o_proj's input), which carries exactly the head's
result. A layer's score and the ranking: see `common.aggregate_layer_scores` (paper: |sum over
heads|).

`causal_trace_tokens` is ROME's own, finer trace of one fact: restore one (token, layer) at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.sites import PassCounter, Site, add_rows, replace_rows, run_sites
from mechunlearn_utils.interp.common import token_labels
from mechunlearn_utils.localize.common import (FactSet, LocalizationError, TracingResult, _batched, _softmax_p,
                                               gaussian_subject_noise, require_known, subject_embedding_std)

CT_PAPER_FACTS = 80  # create_masks.py: df = df[:80]


@torch.no_grad()
def causal_tracing(model, facts: FactSet, noise_scale: float = 3.0, n_samples: int = 1,
                   batch_size: int = 64, backend: str = "tl", seed: int = 0,
                   min_gap: float | None = 0.0, progress: bool = False,
                   noise_rule: str = "scale_std", start_layers: bool = True) -> TracingResult:
    """Causal tracing of every MLP output and every head's output (hook_z), batched.

    One clean pass, one noised pass per (fact, noise sample) (p_corrupt), then rows (fact, noise
    sample, component) in batches of `batch_size`: each row is the noised prompt with one component
    restored to its clean value at every position. Items whose p_clean - p_corrupt <= `min_gap` are left out
    of the average (counted in ``info['n_items_used']``; ``min_gap=None`` keeps every item).
    ``noise_rule``: see `gaussian_subject_noise` ("paper_sqrt" is the paper code's noise level).
    ``start_layers`` (tl / hf backends): a restored run starts at the layer it restores, from the
    noised run's residual stream there (the layers below are the noised run's: the same numbers up
    to float rounding, about half the compute); False runs every layer of every row.
    """
    if noise_scale <= 0:
        raise LocalizationError(f"noise_scale must be positive, got {noise_scale}: without noise "
                                "there is nothing to restore")
    t0 = time.perf_counter()
    counter = PassCounter()
    L, H = model.n_layers, model.n_heads
    clean_sites = [Site(k, l) for l in range(L) for k in ("z", "mlp_out_prenorm")]
    clean = _batched(model, facts, clean_sites, backend, batch_size, counter)
    require_known(facts, clean["logits"])
    correct = facts.correct_ids
    p_clean = _softmax_p(clean["logits"], correct)
    std = subject_embedding_std(model, facts)
    noise = gaussian_subject_noise(model, facts, n_samples, noise_scale, seed, std, noise_rule)
    comps = [("mlp", l, -1) for l in range(L)] + [("head", l, h) for l in range(L) for h in range(H)]
    p = torch.zeros(len(facts), n_samples, len(comps) + 1)  # [..., 0]: the noised run, nothing restored
    pairs = [(f, s) for f in range(len(facts)) for s in range(n_samples)]
    # Restoring a component of layer l leaves layers < l as in the noised run: run those once per
    # (fact, sample), keep the residual stream entering every layer, and start each restored run at
    # its batch's lowest restored layer (`start_layers`; the backends without a start run it all).
    starts = start_layers and backend in ("tl", "hf")
    resid_sites = [Site("resid_pre", l) for l in range(L)] if starts else []
    noised = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        f_idx, s_idx = torch.tensor([c[0] for c in chunk]), torch.tensor([c[1] for c in chunk])
        out = run_sites(model, facts.batch(f_idx), {Site("embed"): add_rows(noise[f_idx, s_idx])},
                        capture=resid_sites, backend=backend, counter=counter)
        p[f_idx, s_idx, 0] = _softmax_p(out.logits, correct[f_idx])
        for site in resid_sites:
            noised.setdefault(site.layer, []).append(out.acts[site].cpu())
    noised = {l: torch.cat(v) for l, v in noised.items()}  # [fact x sample, pos, d]
    layer_of = [c[1] for c in comps]
    # rows by restored layer (a batch starts at its lowest), then by prompt length (a batch is cut to
    # its longest prompt: `FactSet.batch(trim=True)`)
    length = facts.last_index.tolist()
    rows = sorted(((f, s, c) for f, s in pairs for c in range(len(comps))),
                  key=lambda r: (layer_of[r[2]], length[r[0]], r))
    layers_run = 0
    for start in tqdm(range(0, len(rows), batch_size), desc="causal tracing", disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        f_idx = torch.tensor([r[0] for r in chunk])
        first = min(layer_of[r[2]] for r in chunk) if starts else 0
        batch = facts.batch(f_idx, trim=True)
        width = batch["input_ids"].shape[1]
        edits = {} if starts else {Site("embed"): add_rows(noise[f_idx, torch.tensor([r[1] for r in chunk])][:, :width])}
        for l in range(first, L):
            mlp_rows = [i for i, r in enumerate(chunk) if comps[r[2]][:2] == ("mlp", l)]
            head_rows = [(i, comps[r[2]][2]) for i, r in enumerate(chunk) if comps[r[2]][:2] == ("head", l)]
            if mlp_rows:
                edits[Site("mlp_out_prenorm", l)] = replace_rows(clean[Site("mlp_out_prenorm", l)], f_idx, mlp_rows)
            if head_rows:
                edits[Site("z", l)] = replace_rows(clean[Site("z", l)], f_idx, [i for i, _ in head_rows],
                                               [h for _, h in head_rows])
        hidden = noised[first][torch.tensor([r[0] * n_samples + r[1] for r in chunk]), :width] if starts else None
        out = run_sites(model, batch, edits, backend=backend, counter=counter, start=first, hidden=hidden)
        p[f_idx, torch.tensor([r[1] for r in chunk]), torch.tensor([r[2] + 1 for r in chunk])] = \
            _softmax_p(out.logits, correct[f_idx])
        layers_run += (L - first) * len(chunk)
    p_corrupt, p_restored = p[..., 0], p[..., 1:]
    gap = p_clean[:, None] - p_corrupt
    nie = (p_restored - p_corrupt[..., None]) / gap[..., None]
    used = gap > min_gap if min_gap is not None else torch.ones_like(gap, dtype=torch.bool)
    if not used.any():
        raise LocalizationError(
            f"the noise (scale {noise_scale}) never lowered p(right answer) by more than {min_gap}: "
            "causal tracing has nothing to restore; raise noise_scale")
    mean_nie = nie[used].mean(0).float().numpy()
    scores = {"mlp": mean_nie[:L], "head": mean_nie[L:].reshape(L, H)}
    info = dict(noise_scale=noise_scale, noise_std=std, noise_rule=noise_rule, min_gap=min_gap,
                n_samples=n_samples, n_facts=len(facts),
                n_items_used=int(used.sum()), p_clean=float(p_clean.mean()),
                p_corrupt=float(p_corrupt.mean()), backend=backend, positions="all",
                layer_fraction=layers_run / max(len(rows) * L, 1))
    return TracingResult("ct", scores, {"nie": nie.float().numpy(), "p_clean": p_clean.float().numpy(),
                                        "p_corrupt": p_corrupt.float().numpy()},
                         info, counter, time.perf_counter() - t0)




# --------------------------------------------------------------------------- ROME's per-token trace

TRACE_KINDS = ("resid_pre", "mlp_out", "attn_out")  # the residual stream, and what each sublayer adds to it


@dataclass
class TokenTrace:
    """ROME's causal trace of one fact: ``p[kind]`` [position group, layer] is p(right answer) of
    the noised run with the clean `kind` activation of that layer restored at those positions."""

    p: dict
    labels: list[str]
    layers: list[int]
    subject_positions: list[int]
    p_clean: float
    p_noised: float
    seconds: float = 0.0


@torch.no_grad()
def causal_trace_tokens(model, facts: FactSet, fact: int = 0, kinds=TRACE_KINDS, layers=None, positions=None,
                        noise_scale: float = 3.0, seed: int = 0, noise_rule: str = "scale_std",
                        batch_size: int = 64, backend: str = "tl") -> TokenTrace:
    """Per (position, layer) causal trace of fact `fact` (Meng et al. 2022, ROME, figure 1): the
    Gaussian subject noise of `causal_tracing` (one draw, that fact's), then one run per (kind,
    layer, position) restoring the clean activation there only. `layers`: None = all; `positions`:
    None = each position alone, or a list of position lists (e.g. ``[range(T)]``: every position at
    once). A group before the first subject token needs no run: the noised and clean runs agree
    there, so its p is p_noised."""
    if noise_scale <= 0:
        raise LocalizationError(f"noise_scale must be positive, got {noise_scale}")
    t0 = time.perf_counter()
    one = facts.subset([fact])
    T = int(one.last_index[0]) + 1
    layers = list(range(model.n_layers)) if layers is None else [int(l) for l in layers]
    groups = [[p] for p in range(T)] if positions is None else [sorted(int(p) for p in g) for g in positions]
    sites = [Site(k, l) for k in kinds for l in layers]
    clean = _batched(model, one, sites, backend, batch_size, PassCounter())
    require_known(one, clean["logits"])
    correct = one.correct_ids
    noise = gaussian_subject_noise(model, one, 1, noise_scale, seed, None, noise_rule)
    first = min(one.subject_pos[0])
    rows = [None] + [(s, g) for s in sites for g in range(len(groups)) if max(groups[g]) >= first]
    p_rows = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        f_idx = torch.zeros(len(chunk), dtype=torch.long)
        edits = {Site("embed"): add_rows(noise[f_idx, 0])}
        for s in sites:
            sel = [i for i, r in enumerate(chunk) if r is not None and r[0] == s]
            if sel:
                edits[s] = replace_rows(clean[s], f_idx, sel, positions=[groups[chunk[i][1]] for i in sel])
        out = run_sites(model, one.batch(f_idx), edits, backend=backend)
        p_rows.append(_softmax_p(out.logits, correct[f_idx]))
    p_rows = torch.cat(p_rows).numpy()
    p_noised = float(p_rows[0])
    p = {k: np.full((len(groups), len(layers)), p_noised) for k in kinds}
    for r, value in zip(rows[1:], p_rows[1:]):
        p[r[0].kind][r[1], layers.index(r[0].layer)] = value
    tokens = token_labels(model, one.input_ids[0, :T])
    labels = [tokens[g[0]] if len(g) == 1 else f"{g[0]}..{g[-1]}" for g in groups]
    return TokenTrace(p, labels, layers, list(one.subject_pos[0]), float(_softmax_p(clean["logits"], correct)[0]),
                      p_noised, time.perf_counter() - t0)
