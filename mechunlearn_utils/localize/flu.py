"""Fact lookup (FLU, the paper's "manual" localization): probe saturation and path patching.

The paper's FLU localization is a contiguous range of early MLPs, hard-coded per model in
finetuning_scripts/localized_finetuning_script_sports.py of magikarp01/mechanistic-unlearning
(``manual_layers``: Gemma-7B ``range(2, 8)``, Gemma-2-9B ``range(2, 7)``, Llama-3-8B ``range(1, 5)``),
read off its probe figure (experiments/gemma_7b_manual/manual_interp.py: per-layer logistic probes
on the full prompt and on ``<bos>name`` alone, with dashed lines at layers 2 and 7) and supported by
path patching. Here the range is computed (`flu_range`): from `start` (the paper's Gemma start, MLP 2:
the first blocks' attention first gathers the name's tokens onto its last token) to the first layer
where the name-only probe saturates (`probe_saturation_layer`). The workbook's earlier selection,
every MLP whose path-patching effect passes a threshold (`flu_search`), stays available as ``flu_pp``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.logits import logit_diff, token_logits
from mechunlearn_utils.interp.heads import heads_by_effect
from mechunlearn_utils.core.sites import PassCounter, Site, add_rows, is_gemma_style, run_sites
from mechunlearn_utils.localize.common import FactSet, LocalizationError, _batched, _ld_metric, corrupt_subject_tokens, require_known

FLU_START = 2  # the paper's first FLU MLP on Gemma models (Llama-3-8B: 1)
SATURATION_RULES = ("plateau", "max")
SATURATION_TOL = 0.02  # "plateau": gains below this count as none; "max": distance to the best layer
SATURATION_WINDOW = 2  # "plateau": look this many layers ahead


def probe_saturation_layer(acc, tol: float = SATURATION_TOL, rule: str = "plateau",
                           window: int = SATURATION_WINDOW) -> int:
    """The layer where a per-layer probe accuracy curve saturates.

    ``acc[l]`` is the probe's accuracy on the residual stream after block l (MLP l has written to it).

    * ``rule="plateau"`` (default): the first layer l that is at least halfway from acc[0] to the
      best accuracy and after which the probe gains less than `tol` over the next `window` layers
      (max(acc[l+1 : l+1+window]) - acc[l] < tol): where the early rise stops. Falls back to the
      "max" rule if no layer qualifies.
    * ``rule="max"``: the first layer whose accuracy reaches max(acc) - tol.

    Why two: on gemma-3-270m (124 athletes, 5-fold CV) the name-only probe rises to 0.85 by layer 3,
    stays there to layer 10, then climbs again to 0.99 at layer 12, where the extraction heads sit;
    "max" (any tol up to 0.05) puts saturation at 12, "plateau" at 3.
    """
    acc = np.asarray(acc, float)
    if acc.ndim != 1 or len(acc) == 0 or not np.isfinite(acc).all():
        raise LocalizationError(f"need a finite per-layer probe accuracy curve, got {acc!r}")
    if tol < 0 or window < 1:
        raise ValueError(f"need tol >= 0 and window >= 1, got {tol}, {window}")
    if rule not in SATURATION_RULES:
        raise ValueError(f"unknown saturation rule {rule!r}; choose one of {SATURATION_RULES}")
    if rule == "plateau":
        half = acc[0] + 0.5 * (acc.max() - acc[0])
        for l in range(len(acc) - 1):
            if acc[l] >= half and acc[l + 1:l + 1 + window].max() - acc[l] < tol:
                return l
    return int(np.flatnonzero(acc >= acc.max() - tol)[0])


def flu_range(acc, start: int = FLU_START, tol: float = SATURATION_TOL, rule: str = "plateau",
              window: int = SATURATION_WINDOW) -> list[int]:
    """The paper's FLU MLPs: start, start+1, ..., the name-only probe's saturation layer.

    If the probe saturates before `start`, the range is [start] alone (a single MLP); the caller
    can see this from ``probe_saturation_layer(...) < start``.
    """
    if not 0 <= start < len(acc):
        raise LocalizationError(f"FLU start {start} outside 0..{len(acc) - 1}")
    end = max(probe_saturation_layer(acc, tol, rule, window), start)
    return list(range(start, end + 1))


def range_support(mlp_effect, layers: list[int]) -> dict:
    """How much of the MLPs' path-patching effect a layer set covers.

    Returns the summed effect inside / outside the set and the share of the total positive effect
    the set holds (1 = every MLP with a positive effect is in the set)."""
    eff = np.asarray(mlp_effect, float)
    inside = [l for l in layers if l < len(eff)]
    pos = np.clip(eff, 0, None)
    total = float(pos.sum())
    return dict(effect_inside=float(eff[inside].sum()), effect_outside=float(eff.sum() - eff[inside].sum()),
                share_of_positive=float(pos[inside].sum() / total) if total > 0 else float("nan"),
                layers_measured=len(eff))


def _attn_output(model, l: int, z: torch.Tensor) -> torch.Tensor:
    """What block l's attention writes to the residual stream, from z [..., head, d_head]."""
    layer = model.layers[l]
    o = layer.self_attn.o_proj
    out = torch.nn.functional.linear(z.flatten(-2), o.weight, getattr(o, "bias", None))
    return layer.post_attention_layernorm(out) if is_gemma_style(layer) else out


def _mlp_output(model, l: int, mlp_out: torch.Tensor) -> torch.Tensor:
    """What block l's MLP writes to the residual stream, from the MLP's raw output."""
    layer = model.layers[l]
    return layer.post_feedforward_layernorm(mlp_out) if is_gemma_style(layer) else mlp_out


def _candidate_logits(model, resid: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding of only the candidate tokens: resid [b, (n,) d] -> [b, (n,) n_cand]."""
    return token_logits(model, model.hf.model.norm(resid), cand_ids)


@torch.no_grad()
def head_path_patching(model, facts: FactSet, batch_size: int = 32, backend: str = "tl",
                       seed: int = 0, corrupt_ids: torch.Tensor | None = None,
                       counter: PassCounter | None = None) -> dict:
    """Path patching of every head into the final residual stream (its direct effect).

    Each head's corrupted output (random-token subject) replaces its clean output *only* on the
    direct path to the unembedding at the last token; effect = (LD_clean - LD_patched) /
    (LD_clean - LD_corrupt) (batch means). Two forward passes per batch; the per-head part is
    linear algebra on the last position. Returns {'effect': [L, H], 'ld_clean', 'ld_corrupt'}.
    """
    counter = counter if counter is not None else PassCounter()
    L = model.n_layers
    corrupt_ids = corrupt_subject_tokens(model, facts, seed) if corrupt_ids is None else corrupt_ids
    sites = [Site("z", l) for l in range(L)] + [Site("resid_final")]
    clean = _batched(model, facts, sites, backend, batch_size, counter)
    require_known(facts, clean["logits"])
    corr = _batched(model, facts, sites[:-1], backend, batch_size, counter, corrupt_ids)
    last = facts.last_index
    rows = torch.arange(len(facts))
    cand = facts.cand_ids
    corr_t = torch.tensor(facts.correct)
    ld = lambda c: logit_diff(c, corr_t)  # noqa: E731
    dev = model.hf.device
    resid = clean[Site("resid_final")][rows, last].to(dev)
    ld_clean = ld(_candidate_logits(model, resid, cand.to(dev)).cpu())
    ld_corrupt = _ld_metric(facts, rows)(corr["logits"])
    effect = np.zeros((L, model.n_heads))
    for l in range(L):
        zc = clean[Site("z", l)][rows, last].to(dev)  # [F, H, dh]
        zx = corr[Site("z", l)][rows, last].to(dev)
        base = _attn_output(model, l, zc)
        H = zc.shape[1]
        z_pat = zc[:, None].repeat(1, H, 1, 1)  # [F, H(patched), H, dh]
        idx = torch.arange(H)
        z_pat[:, idx, idx] = zx
        delta = _attn_output(model, l, z_pat) - base[:, None]  # [F, H, d]
        lds = ld(_candidate_logits(model, resid[:, None] + delta, cand.to(dev)).cpu())  # [F, H]
        effect[l] = ((ld_clean[:, None] - lds).mean(0) / (ld_clean - ld_corrupt).mean()).float().numpy()
    return dict(effect=effect, ld_clean=float(ld_clean.mean()), ld_corrupt=float(ld_corrupt.mean()))


@torch.no_grad()
def mlp_path_patching(model, facts: FactSet, receiver_layer: int, batch_size: int = 64,
                      backend: str = "tl", seed: int = 0, positions: str = "subject",
                      corrupt_ids: torch.Tensor | None = None, counter: PassCounter | None = None,
                      progress: bool = False) -> dict:
    """Path patching of each MLP m < receiver_layer into the residual stream entering that layer.

    The corrupted MLP output's contribution replaces the clean one only in the input of block
    `receiver_layer` (not in the blocks in between); the run continues from there. ``positions``:
    'subject' (the subject's tokens, the fact-lookup hypothesis) or 'all'.
    Returns {'effect': [receiver_layer], ...}, effect as in `head_path_patching`.
    """
    if receiver_layer < 1:
        raise LocalizationError(f"receiver layer {receiver_layer}: no MLP lies before it")
    if positions not in ("subject", "all"):
        raise ValueError("positions must be 'subject' or 'all'")
    counter = counter if counter is not None else PassCounter()
    corrupt_ids = corrupt_subject_tokens(model, facts, seed) if corrupt_ids is None else corrupt_ids
    senders = [Site("mlp_out_prenorm", m) for m in range(receiver_layer)]
    clean = _batched(model, facts, senders, backend, batch_size, counter)
    require_known(facts, clean["logits"])
    corr = _batched(model, facts, senders, backend, batch_size, counter, corrupt_ids)
    all_idx = torch.arange(len(facts))
    ld_clean = _ld_metric(facts, all_idx)(clean["logits"])
    ld_corrupt = _ld_metric(facts, all_idx)(corr["logits"])
    pos_mask = (facts.subject_mask() if positions == "subject" else facts.attention_mask.bool())
    deltas = torch.stack([(_mlp_output(model, m, corr[s]) - _mlp_output(model, m, clean[s]))
                          * pos_mask[..., None] for m, s in enumerate(senders)], 1)  # [F, M, T, d]
    rows = [(f, m) for m in range(receiver_layer) for f in range(len(facts))]
    ld_rows = torch.zeros(len(rows))
    for start in tqdm(range(0, len(rows), batch_size), desc="MLP path patching",
                      disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        f_idx = torch.tensor([r[0] for r in chunk])
        delta = deltas[f_idx, torch.tensor([r[1] for r in chunk])]
        out = run_sites(model, facts.batch(f_idx), {Site("resid_pre", receiver_layer): add_rows(delta)},
                        backend=backend, counter=counter)
        ld_rows[start:start + len(chunk)] = _ld_metric(facts, f_idx)(out.logits.cpu())
    ld = ld_rows.view(receiver_layer, len(facts))
    effect = ((ld_clean.mean() - ld.mean(1)) / (ld_clean.mean() - ld_corrupt.mean())).float().numpy()
    return dict(effect=effect, ld_clean=float(ld_clean.mean()), ld_corrupt=float(ld_corrupt.mean()),
                positions=positions, receiver_layer=receiver_layer)


@dataclass
class FLUResult:
    layers: list[int]
    threshold: float | None
    head_effect: np.ndarray | None = None
    extraction_heads: list = field(default_factory=list)
    extraction_layer: int | None = None
    mlp_effect: np.ndarray | None = None
    passes: PassCounter = field(default_factory=PassCounter)
    seconds: float = 0.0
    hand_given: bool = False


def select_flu_layers(mlp_effect: np.ndarray, threshold: float) -> list[int]:
    """MLP layers whose path-patching effect reaches `threshold`; raises if none does."""
    layers = [int(m) for m in np.flatnonzero(np.asarray(mlp_effect) >= threshold)]
    if not layers:
        best = int(np.argmax(mlp_effect))
        raise LocalizationError(
            f"FLU threshold {threshold} selects no MLP: the largest path-patching effect is "
            f"{float(np.max(mlp_effect)):.3f} (layer {best}). Lower the threshold or give the "
            "layers by hand (FLU_LAYERS)")
    return layers


def flu_search(model, facts: FactSet, threshold: float = 0.05, head_threshold: float = 0.05,
               head_top_k: int | None = None, layers: list[int] | None = None,
               batch_size: int = 64, backend: str = "tl", seed: int = 0,
               positions: str = "subject", receiver_layer: int | None = None,
               progress: bool = False) -> FLUResult:
    """Fact-lookup MLPs: extraction heads by path patching into the final residual stream, then
    MLPs by path patching into the lowest extraction layer's input, kept if effect >= threshold.

    With `layers` given (hand-picked, e.g. from the probes), nothing is searched. With
    `receiver_layer` given (e.g. the layer of notebook 01's extraction head), the heads are still
    scored but the MLPs are patched into that layer's input.
    """
    t0 = time.perf_counter()
    if layers is not None:
        layers = sorted({int(l) for l in layers})
        if not layers or min(layers) < 0 or max(layers) >= model.n_layers:
            raise LocalizationError(f"hand-given FLU layers {layers} must be in 0..{model.n_layers - 1}")
        return FLUResult(layers, None, hand_given=True)
    counter = PassCounter()
    corrupt_ids = corrupt_subject_tokens(model, facts, seed)
    heads = head_path_patching(model, facts, batch_size, backend, seed, corrupt_ids, counter)
    try:
        chosen = heads_by_effect(heads["effect"], head_threshold, head_top_k)
    except ValueError as e:
        raise LocalizationError(str(e)) from None
    receiver = min(l for l, _ in chosen) if receiver_layer is None else int(receiver_layer)
    if not receiver < model.n_layers:
        raise LocalizationError(f"receiver layer {receiver} outside 0..{model.n_layers - 1}")
    if receiver < 1:
        raise LocalizationError("an extraction head sits in layer 0: no MLP comes before it; "
                                "raise the head threshold or give the layers by hand")
    mlps = mlp_path_patching(model, facts, receiver, batch_size, backend, seed, positions,
                             corrupt_ids, counter, progress)
    picked = select_flu_layers(mlps["effect"], threshold)
    return FLUResult(picked, threshold, heads["effect"], chosen, receiver, mlps["effect"], counter,
                     time.perf_counter() - t0)


