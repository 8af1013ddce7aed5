"""Localize factual recall: which weight matrices should an edit train?

Methods (Guo et al. 2024, section 3):

* **CT**, causal tracing (`causal_tracing`): Gaussian noise (``noise_scale`` x the std of the
  subject-token embeddings) on the subject's embeddings; restore each MLP output and each head's
  output (``hook_z``) to its clean value, one component per row of a batch; score = normalized
  indirect effect (p_restored - p_corrupt) / (p_clean - p_corrupt) of the right answer, averaged
  over facts and noise samples.
* **AP**, attribution patching (`attribution_patching`): one clean forward+backward and one
  corrupted forward per batch (random tokens replace the subject) give
  grad x (corrupt - clean) for every head's q/k/v/z and every MLP's input, gate activations
  (``hook_pre``) and output, on a normalized logit-difference metric.
  `activation_patching` / `ap_agreement` check it against real patching.
* **FLU**, fact lookup, "manual" (`flu_search`): probes (see `probes`) + path patching of heads
  into the final residual stream (extraction heads) + path patching of MLP outputs into the
  extraction layer's input; MLPs whose effect passes a threshold. Or a hand-given layer list.
* Baselines: `random_matrices`, `random_mlp_layers`, `all_mlps`, `nonlocalized`.

OT scores become localizations the paper's way (`localization_from_scores`): per layer, attention
(q/k/v/o) and MLP (gate/up/down) scores, ranked by |score|; whole weight matrices are added until
the parameter count reaches the budget (FLU's count).

Every activation is read and written through *sites* (`Site`): the same code runs on
TransformerLens hooks (``backend="tl"``: hook points of the `TransformerBridge`, which live inside
the HF modules), on nnsight (``backend="nnsight"``: ``model.model.layers[l].mlp`` /
``.self_attn.{q,k,v,o}_proj`` of any HF decoder model, so the same call works on a large or remote
model), or on plain PyTorch hooks on those same HF modules (``backend="hf"``: no extra library,
and it never builds the bridge; building the bridge renames HF parameters, see `canonical_name`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .evals import final_logits

BACKENDS = ("tl", "nnsight", "hf")
METHODS = ("flu", "ct", "ap", "ct_mlp", "ap_mlp", "random", "random_mlps", "all_mlps", "nonlocalized")
ATTN_MATRICES = ("q", "k", "v", "o")
MLP_MATRICES = ("gate", "up", "down")
LOCALIZATIONS_DIR = ("02_localization", "localizations")


class LocalizationError(ValueError):
    """A localization cannot be made or used as asked; the message says why."""


class UnknownFactError(LocalizationError):
    """Some facts are not known by the model (their right answer does not rank first)."""


# =========================================================================== facts

@dataclass
class FactSet:
    """Prompts whose answer the model must give, with the subject's token positions.

    ``candidates[i]`` are answer strings (leading space) and ``correct[i]`` the index of the right
    one; the logit difference is logit(right) - mean logit(other candidates).
    """

    task: str
    prompts: list[str]
    subjects: list[str]
    candidates: list[list[str]]
    correct: list[int]
    labels: list[str]
    input_ids: torch.Tensor = field(repr=False)
    attention_mask: torch.Tensor = field(repr=False)
    last_index: torch.Tensor = field(repr=False)
    subject_pos: list[list[int]] = field(repr=False)
    cand_ids: torch.Tensor = field(repr=False)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def correct_ids(self) -> torch.Tensor:
        return self.cand_ids[torch.arange(len(self)), torch.tensor(self.correct)]

    def batch(self, idx=None, input_ids=None) -> dict:
        """Tokenized rows `idx` (all by default) as keyword arguments of a forward pass."""
        idx = torch.arange(len(self)) if idx is None else torch.as_tensor(idx)
        ids = self.input_ids if input_ids is None else input_ids
        return dict(input_ids=ids[idx], attention_mask=self.attention_mask[idx],
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
        return FactSet(self.task, pick(self.prompts), pick(self.subjects), pick(self.candidates),
                       pick(self.correct), pick(self.labels), self.input_ids[t], self.attention_mask[t],
                       self.last_index[t], pick(self.subject_pos), self.cand_ids[t])


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
    return FactSet(task, list(prompts), list(subjects), [list(c) for c in candidates], list(correct),
                   labels, batch["input_ids"].cpu(), batch["attention_mask"].cpu(),
                   batch["last_index"].cpu(), subject_pos, cand_ids)


def balanced_sample(df: pd.DataFrame, n: int | None, by: str, seed: int = 0) -> pd.DataFrame:
    """Up to `n` rows spread evenly over the values of column `by` (all rows when n is None)."""
    if n is None or n >= len(df):
        return df.reset_index(drop=True)
    if n < 1:
        raise LocalizationError(f"asked for {n} facts: need at least one")
    shuffled = df.sample(frac=1.0, random_state=seed)
    shuffled["_rank"] = shuffled.groupby(by).cumcount()
    return shuffled.sort_values(["_rank", by]).head(n).drop(columns="_rank").reset_index(drop=True)


def sports_facts(model, athletes: pd.DataFrame, n: int | None = None, seed: int = 0) -> FactSet:
    """Athletes in the paper's one-shot format, balanced over the sports; labels are the sports."""
    from .prompts import SPORTS, sport_prompt

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


def logit_diff(logits: torch.Tensor, cand_ids: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per row: logit of the right candidate minus the mean logit of the other candidates."""
    cand = logits.gather(1, cand_ids.to(logits.device))
    right = cand.gather(1, correct.to(logits.device)[:, None])[:, 0]
    return right - (cand.sum(1) - right) / (cand.shape[1] - 1)


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


# =========================================================================== sites and backends

SITE_KINDS = ("embed", "resid_pre", "q", "k", "v", "z", "mlp_in", "mlp_pre", "mlp_post", "mlp_out",
              "resid_final")
HEAD_KINDS = ("q", "k", "v", "z")  # shaped [batch, pos, head, d_head]
MLP_KINDS = ("mlp_in", "mlp_pre", "mlp_post", "mlp_out")
_ORDER = {k: i for i, k in enumerate(SITE_KINDS)}


@dataclass(frozen=True)
class Site:
    """One activation: ``kind`` in SITE_KINDS at block ``layer`` (None for embed / resid_final).

    * q/k/v: the q/k/v_proj outputs, [batch, pos, head, d_head] (k/v have the KV heads)
    * z: the input of o_proj (each head's output before mixing), [batch, pos, head, d_head]
    * mlp_in: the MLP's input (after the pre-MLP norm), [batch, pos, d_model]
    * mlp_pre: the gate projection's output (TL hook_pre), [batch, pos, d_mlp]
    * mlp_post: the MLP's hidden activations (input of down_proj, TL hook_post), [batch, pos, d_mlp]
    * mlp_out: the MLP's output (before Gemma's post-feedforward norm), [batch, pos, d_model]
    * resid_pre: the residual stream entering block ``layer``; resid_final: entering the final norm
    """

    kind: str
    layer: int | None = None

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; choose one of {SITE_KINDS}")
        if (self.layer is None) != (self.kind in ("embed", "resid_final")):
            raise ValueError(f"site {self.kind!r} {'needs' if self.layer is None else 'takes no'} a layer")

    def order(self) -> tuple:
        if self.kind == "embed":
            return (-1, 0)
        if self.kind == "resid_final":
            return (10 ** 9, 0)
        return (self.layer, _ORDER[self.kind])

    def tl_name(self) -> str:
        return {"embed": "hook_embed", "resid_final": "ln_final.hook_in",
                "resid_pre": f"blocks.{self.layer}.hook_resid_pre",
                "q": f"blocks.{self.layer}.attn.hook_q", "k": f"blocks.{self.layer}.attn.hook_k",
                "v": f"blocks.{self.layer}.attn.hook_v", "z": f"blocks.{self.layer}.attn.hook_z",
                "mlp_in": f"blocks.{self.layer}.mlp.hook_in",
                "mlp_pre": f"blocks.{self.layer}.mlp.hook_pre",
                "mlp_post": f"blocks.{self.layer}.mlp.hook_post",
                "mlp_out": f"blocks.{self.layer}.mlp.hook_out"}[self.kind]

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}{self.layer}"


@dataclass
class PassCounter:
    """Model passes spent: calls (batches) and sequences (rows), forward and backward."""

    forward: int = 0
    backward: int = 0
    forward_sequences: int = 0
    backward_sequences: int = 0

    def add(self, n_rows: int, backward: bool = False) -> None:
        self.forward += 1
        self.forward_sequences += n_rows
        if backward:
            self.backward += 1
            self.backward_sequences += n_rows

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    logits: torch.Tensor  # [batch, vocab] at each prompt's last token
    acts: dict
    grads: dict
    metric: torch.Tensor | None = None


def head_dim(model) -> int:
    cfg = model.hf.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def run_sites(model, batch: dict, edits: dict | None = None, capture=(), backend: str = "tl",
              grad_metric=None, counter: PassCounter | None = None) -> RunResult:
    """One forward pass with edits and captures at sites, and optionally one backward pass.

    * ``edits``: {Site: fn(activation) -> new activation} (head sites see [batch, pos, head, d_head])
    * ``capture``: sites whose activation (after any edit) is returned in ``.acts``
    * ``grad_metric``: fn(logits [batch, vocab]) -> per-row metric; when given, the gradient of its
      sum w.r.t. every captured site is returned in ``.grads`` (the model's weights stay frozen)
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    edits = dict(edits or {})
    capture = list(dict.fromkeys(capture))
    run = {"tl": _run_tl, "nnsight": _run_nnsight, "hf": _run_hf}[backend]
    with torch.set_grad_enabled(grad_metric is not None):
        out = run(model, batch, edits, capture, grad_metric)
    if counter is not None:
        counter.add(len(batch["input_ids"]), backward=grad_metric is not None)
    return out


def _run_tl(model, batch, edits, capture, metric) -> RunResult:
    """TransformerLens: bridge hook points (inside the HF modules) + last-token unembedding."""
    tl = model.tl
    acts, grads = {}, {}
    need_grad = metric is not None
    sites = set(edits) | set(capture) | ({Site("embed")} if need_grad else set())
    fwd, bwd = [], []
    for site in sites:
        def fwd_hook(x, hook, site=site):
            if site in edits:
                x = edits[site](x)
            if need_grad and site.kind == "embed":
                x = x.detach().requires_grad_(True)  # frozen weights: start the graph here
            if site in acts or site in capture:
                acts[site] = x
            return x
        fwd.append((site.tl_name(), fwd_hook))
        if need_grad and site in capture:
            bwd.append((site.tl_name(), lambda g, hook, site=site: grads.__setitem__(site, g.detach())))
    kwargs = {k: v.to(model.hf.device) for k, v in batch.items()}
    with tl.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = final_logits(model, **kwargs)
        value = None
        if need_grad:
            value = metric(logits)
            value.sum().backward()
    missing = [str(s) for s in capture if s not in acts]
    if missing:
        raise RuntimeError(f"TransformerLens hooks never fired for sites {missing}")
    return RunResult(logits.detach(), {s: a.detach() for s, a in acts.items() if s in capture},
                     grads, None if value is None else value.detach())


def _site_target(base, site: Site):
    """(submodule, 'input'|'output') of a site under a decoder root `base` (HF `model.model`, or
    its nnsight envoy: both have the same attribute tree)."""
    if site.kind == "embed":
        return base.embed_tokens, "output"
    if site.kind == "resid_final":
        return base.norm, "input"
    layer = base.layers[site.layer]
    return {"resid_pre": (layer, "input"), "q": (layer.self_attn.q_proj, "output"),
            "k": (layer.self_attn.k_proj, "output"), "v": (layer.self_attn.v_proj, "output"),
            "z": (layer.self_attn.o_proj, "input"), "mlp_in": (layer.mlp, "input"),
            "mlp_pre": (layer.mlp.gate_proj, "output"), "mlp_post": (layer.mlp.down_proj, "input"),
            "mlp_out": (layer.mlp, "output")}[site.kind]


def _nn_envoy(nn, site: Site):
    """(envoy, 'input'|'output') of a site in any HF decoder model (model.model.layers[l]...)."""
    return _site_target(nn.model, site)


def _hf_module(model, site: Site):
    """(module, 'input'|'output') of a site: the same HF modules nnsight uses."""
    return _site_target(model.hf.model, site)


def _run_hf(model, batch, edits, capture, metric) -> RunResult:
    """Plain PyTorch forward hooks / pre-hooks on the HF modules."""
    dh = head_dim(model)
    need_grad = metric is not None
    sites = set(edits) | set(capture) | ({Site("embed")} if need_grad else set())
    acts: dict = {}

    def apply(site, x):
        shaped = x.view(*x.shape[:-1], -1, dh) if site.kind in HEAD_KINDS else x
        if site in edits:
            shaped = edits[site](shaped)
        if need_grad and site.kind == "embed":
            shaped = shaped.detach().requires_grad_(True)
        if site in capture:
            if need_grad and shaped.requires_grad:
                shaped.retain_grad()
            acts[site] = shaped
        return shaped.reshape(x.shape)

    def out_hook(site):
        return lambda mod, args, out: apply(site, out)

    def in_hook(site):
        def hook(mod, args, kwargs):
            if args:
                return (apply(site, args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: apply(site, kwargs[key])}
        return hook

    handles = []
    try:
        for site in sites:
            mod, where = _hf_module(model, site)
            handles.append(mod.register_forward_hook(out_hook(site)) if where == "output"
                           else mod.register_forward_pre_hook(in_hook(site), with_kwargs=True))
        kwargs = {k: v.to(model.hf.device) for k, v in batch.items()}
        logits = final_logits(model, **kwargs)
        value = None
        if need_grad:
            value = metric(logits)
            value.sum().backward()
    finally:
        for h in handles:
            h.remove()
    grads = {s: a.grad.detach() for s, a in acts.items() if need_grad and a.grad is not None}
    return RunResult(logits.detach(), {s: a.detach() for s, a in acts.items()}, grads,
                     None if value is None else value.detach())


def _run_nnsight(model, batch, edits, capture, metric) -> RunResult:
    """nnsight: sites are module inputs/outputs, visited in forward order (nnsight 0.8 requires it)."""
    nn = model.nn
    dh = head_dim(model)
    need_grad = metric is not None
    sites = sorted(set(edits) | set(capture) | ({Site("embed")} if need_grad else set()),
                   key=Site.order)
    kwargs = {k: v.to(model.hf.device) for k, v in batch.items()}
    raw, grads, box = {}, {}, {}  # filled inside the trace (nnsight runs the block itself)
    with nn.trace(kwargs["input_ids"], attention_mask=kwargs["attention_mask"],
                  logits_to_keep=kwargs["last_index"][:, None]):
        for site in sites:
            env, attr = _nn_envoy(nn, site)
            act = getattr(env, attr)
            changed = False
            if site in edits:
                shaped = act.view(*act.shape[:-1], -1, dh) if site.kind in HEAD_KINDS else act
                act = edits[site](shaped).reshape(act.shape)
                changed = True
            if need_grad and site.kind == "embed":
                act = act.detach().requires_grad_(True)
                changed = True
            if changed:
                setattr(env, attr, act)
            if site in capture:
                raw[site] = act.save()
        box["logits"] = nn.output.logits[:, 0].save()
        if need_grad:
            box["metric"] = metric(box["logits"]).save()
            with box["metric"].sum().backward():
                for site in reversed([s for s in sites if s in capture]):
                    grads[site] = raw[site].grad.save()
    logits, value = box["logits"], box.get("metric")
    fix = lambda s, t: t.detach().view(*t.shape[:-1], -1, dh) if s.kind in HEAD_KINDS else t.detach()  # noqa: E731
    return RunResult(logits.detach(), {s: fix(s, t) for s, t in raw.items()},
                     {s: fix(s, g) for s, g in grads.items()}, None if value is None else value.detach())


# =========================================================================== corruptions

def subject_embedding_std(model, facts: FactSet) -> float:
    """Std of the (scaled) input embeddings over all subject tokens of the fact set."""
    with torch.no_grad():
        emb = model.hf.get_input_embeddings()(facts.input_ids.to(model.hf.device)).float().cpu()
    return float(emb[facts.subject_mask()].std())


def gaussian_subject_noise(model, facts: FactSet, n_samples: int, scale: float, seed: int,
                           std: float | None = None) -> torch.Tensor:
    """Noise [fact, sample, pos, d_model]: N(0, (scale*std)^2) on subject tokens, 0 elsewhere.

    Each fact's noise depends only on `seed` and its prompt (not on the other facts or padding).
    """
    if n_samples < 1:
        raise LocalizationError("causal tracing needs at least one noise sample")
    std = subject_embedding_std(model, facts) if std is None else std
    F_, T = facts.input_ids.shape
    noise = torch.zeros((F_, n_samples, T, model.d_model))
    for i, pos in enumerate(facts.subject_pos):
        gen = torch.Generator().manual_seed(_fact_seed(seed, facts.prompts[i]))
        noise[i][:, pos] = torch.randn((n_samples, len(pos), model.d_model), generator=gen) * (scale * std)
    return noise


def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


def _fact_seed(seed: int, text: str) -> int:
    import hashlib

    return int(hashlib.sha256(f"{seed}|{text}".encode()).hexdigest()[:12], 16)


def corrupt_subject_tokens(model, facts: FactSet, seed: int = 0) -> torch.Tensor:
    """input_ids with every subject token replaced by a random (non-special) vocabulary token.

    Each fact's draw depends only on `seed` and its prompt, so a fact is corrupted the same way
    in any subset of the fact set (AP on a subset reuses the full run's per-fact scores).
    """
    vocab = model.hf.get_input_embeddings().weight.shape[0]
    specials = torch.tensor(sorted(special_token_ids(model.tokenizer)), dtype=torch.long)
    ids = facts.input_ids.clone()
    for i, pos in enumerate(facts.subject_pos):
        gen = torch.Generator().manual_seed(_fact_seed(seed, facts.prompts[i]))
        draw = torch.randint(0, vocab, (len(pos),), generator=gen)
        bad = torch.isin(draw, specials)
        while bad.any():  # redraw special tokens
            draw[bad] = torch.randint(0, vocab, (int(bad.sum()),), generator=gen)
            bad = torch.isin(draw, specials)
        ids[i, pos] = draw
    return ids


# =========================================================================== causal tracing

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
        """AP scores of a subset of the facts, from the stored per-fact attributions (no passes)."""
        if self.method != "ap":
            raise LocalizationError("only attribution-patching results can be subset")
        idx = np.asarray(list(idx))
        denom = float((self.per_item["ld_clean"][idx] - self.per_item["ld_corrupt"][idx]).sum())
        if denom <= 0:
            raise LocalizationError("the corruption does not lower the logit difference on this subset")
        kinds = [k for k in self.scores]
        per = {k: self.per_item[k][idx] for k in kinds}
        per.update(ld_clean=self.per_item["ld_clean"][idx], ld_corrupt=self.per_item["ld_corrupt"][idx])
        info = dict(self.info, n_facts=len(idx), ld_clean=float(per["ld_clean"].mean()),
                    ld_corrupt=float(per["ld_corrupt"].mean()), subset_of=self.info.get("n_facts"))
        return TracingResult("ap", {k: per[k].sum(0) / denom for k in kinds}, per, info, PassCounter(), 0.0)

    def layer_scores(self) -> dict:
        """Per layer, |score| summed per component type: {'attn': [L], 'mlp': [L]}."""
        if self.method == "ct":
            return {"attn": np.abs(self.scores["head"]).sum(1), "mlp": np.abs(self.scores["mlp"])}
        attn = sum(np.abs(self.scores[k]).sum(1) for k in HEAD_KINDS if k in self.scores)
        mlp = sum(np.abs(self.scores[k]) for k in MLP_KINDS if k in self.scores)
        return {"attn": np.asarray(attn), "mlp": np.asarray(mlp)}


def _softmax_p(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1).gather(1, ids[:, None].to(logits.device))[:, 0].cpu()


@torch.no_grad()
def causal_tracing(model, facts: FactSet, noise_scale: float = 3.0, n_samples: int = 1,
                   batch_size: int = 64, backend: str = "tl", seed: int = 0,
                   min_gap: float | None = 0.0, progress: bool = False) -> TracingResult:
    """Causal tracing of every MLP output and every head's output (hook_z), batched.

    One clean pass, then rows (fact, noise sample, component) in batches of `batch_size`: each row
    is the noised prompt with one component restored to its clean value at every position (a row
    with no restoration gives p_corrupt). Items whose p_clean - p_corrupt <= `min_gap` are left out
    of the average (counted in ``info['n_items_used']``; ``min_gap=None`` keeps every item).
    """
    if noise_scale <= 0:
        raise LocalizationError(f"noise_scale must be positive, got {noise_scale}: without noise "
                                "there is nothing to restore")
    t0 = time.perf_counter()
    counter = PassCounter()
    L, H = model.n_layers, model.n_heads
    clean_sites = [Site(k, l) for l in range(L) for k in ("z", "mlp_out")]
    clean = _batched(model, facts, clean_sites, backend, batch_size, counter)
    require_known(facts, clean["logits"])
    correct = facts.correct_ids
    p_clean = _softmax_p(clean["logits"], correct)
    std = subject_embedding_std(model, facts)
    noise = gaussian_subject_noise(model, facts, n_samples, noise_scale, seed, std)
    comps = [("mlp", l, -1) for l in range(L)] + [("head", l, h) for l in range(L) for h in range(H)]
    rows = [(f, s, c) for f in range(len(facts)) for s in range(n_samples) for c in range(-1, len(comps))]
    p_rows = torch.zeros(len(rows))
    chunks = range(0, len(rows), batch_size)
    for start in tqdm(chunks, desc="causal tracing", disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        f_idx = torch.tensor([r[0] for r in chunk])
        edits = {Site("embed"): _add_rows(noise[f_idx, torch.tensor([r[1] for r in chunk])])}
        for l in range(L):
            mlp_rows = [i for i, r in enumerate(chunk) if r[2] >= 0 and comps[r[2]][:2] == ("mlp", l)]
            head_rows = [(i, comps[r[2]][2]) for i, r in enumerate(chunk)
                         if r[2] >= 0 and comps[r[2]][:2] == ("head", l)]
            if mlp_rows:
                edits[Site("mlp_out", l)] = _restore(clean[Site("mlp_out", l)], f_idx, mlp_rows)
            if head_rows:
                edits[Site("z", l)] = _restore(clean[Site("z", l)], f_idx, [i for i, _ in head_rows],
                                               [h for _, h in head_rows])
        out = run_sites(model, facts.batch(f_idx), edits, backend=backend, counter=counter)
        p_rows[start:start + len(chunk)] = _softmax_p(out.logits, correct[f_idx])
    p = p_rows.view(len(facts), n_samples, len(comps) + 1)
    p_corrupt, p_restored = p[..., 0], p[..., 1:]
    gap = p_clean[:, None] - p_corrupt
    nie = (p_restored - p_corrupt[..., None]) / gap[..., None]
    used = gap > min_gap if min_gap is not None else torch.ones_like(gap, dtype=torch.bool)
    if not used.any():
        raise LocalizationError(
            f"the noise (scale {noise_scale}) never lowered p(right answer) by more than {min_gap}: "
            "causal tracing has nothing to restore; raise noise_scale")
    mean_nie = nie[used].mean(0).numpy()
    scores = {"mlp": mean_nie[:L], "head": mean_nie[L:].reshape(L, H)}
    info = dict(noise_scale=noise_scale, noise_std=std, n_samples=n_samples, n_facts=len(facts),
                n_items_used=int(used.sum()), p_clean=float(p_clean.mean()),
                p_corrupt=float(p_corrupt.mean()), backend=backend, positions="all")
    return TracingResult("ct", scores, {"nie": nie.numpy(), "p_clean": p_clean.numpy(),
                                        "p_corrupt": p_corrupt.numpy()},
                         info, counter, time.perf_counter() - t0)


def _add_rows(delta: torch.Tensor):
    def edit(a):
        return a + delta.to(a.device, a.dtype)
    return edit


def _restore(clean: torch.Tensor, f_idx: torch.Tensor, rows: list[int], heads: list[int] | None = None):
    """Edit that puts the clean activation back in `rows` (for head sites: only `heads`)."""
    rows_t = torch.tensor(rows)
    src_rows = f_idx[rows_t]

    def edit(a):
        a = a.clone()
        if heads is None:
            a[rows_t] = clean[src_rows].to(a.device, a.dtype)
        else:
            h = torch.tensor(heads)
            a[rows_t, :, h] = clean[src_rows, :, h].to(a.device, a.dtype)
        return a
    return edit


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


# =========================================================================== attribution patching

# The paper's sites: every head's q/k/v/z; the MLP's input, gate (hook_pre) and output. (The
# down_proj input, mlp_post, would add nothing: down_proj is linear, so its AP score equals mlp_out's.)
AP_KINDS = ("q", "k", "v", "z", "mlp_in", "mlp_pre", "mlp_out")


def _ld_metric(facts: FactSet, f_idx):
    cand = facts.cand_ids[f_idx]
    corr = torch.tensor(facts.correct)[f_idx]
    return lambda logits: logit_diff(logits.float(), cand, corr)


def _attr(site: Site, grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """grad x delta summed over positions (and d_head / features): [batch, head] or [batch]."""
    prod = (grad.float() * delta.float()).sum(1)
    return prod.sum(-1)


def attribution_patching(model, facts: FactSet, batch_size: int = 32, backend: str = "tl",
                         seed: int = 0, kinds=AP_KINDS, corrupt_ids: torch.Tensor | None = None,
                         progress: bool = False) -> TracingResult:
    """Attribution patching: 2 forward + 1 backward passes per batch, whatever the component count.

    Score of component c = sum_i grad_i . (a_corrupt,i - a_clean,i) / sum_i (LD_clean,i - LD_corrupt,i):
    a first-order estimate of the normalized change in logit difference when c alone is patched
    from the corrupted run into the clean one (near -1: c carries the whole effect).
    """
    t0 = time.perf_counter()
    counter = PassCounter()
    L = model.n_layers
    sites = [Site(k, l) for l in range(L) for k in kinds]
    corrupt_ids = corrupt_subject_tokens(model, facts, seed) if corrupt_ids is None else corrupt_ids
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
    per_item = {k: torch.stack([torch.cat(attr[Site(k, l)]) for l in range(L)], 1).numpy()
                for k in kinds}  # [fact, layer(, head)]
    scores = {k: v.sum(0) / denom for k, v in per_item.items()}
    info = dict(n_facts=len(facts), ld_clean=float(ld_clean.mean()), ld_corrupt=float(ld_corrupt.mean()),
                backend=backend, corruption="random subject tokens", seed=seed,
                passes_per_batch=dict(forward=2, backward=1))
    per_item.update(ld_clean=ld_clean.numpy(), ld_corrupt=ld_corrupt.numpy())
    return TracingResult("ap", scores, per_item, info, counter, time.perf_counter() - t0)


@dataclass(frozen=True)
class Component:
    """A patchable unit: a site and (for head sites) one head."""

    kind: str
    layer: int
    head: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}" + ("" if self.head is None else f".{self.head}")


@torch.no_grad()
def activation_patching(model, facts: FactSet, components: list[Component], batch_size: int = 64,
                        backend: str = "tl", seed: int = 0, corrupt_ids: torch.Tensor | None = None,
                        counter: PassCounter | None = None) -> np.ndarray:
    """Real patching: each component's corrupted activation into the clean run, one per row.

    Returns, per component, (mean LD_patched - mean LD_clean) / (mean LD_clean - mean LD_corrupt),
    the quantity attribution patching approximates.
    """
    if not components:
        raise LocalizationError("no components to patch")
    counter = counter if counter is not None else PassCounter()
    corrupt_ids = corrupt_subject_tokens(model, facts, seed) if corrupt_ids is None else corrupt_ids
    sites = sorted({Site(c.kind, c.layer) for c in components}, key=Site.order)
    clean = _batched(model, facts, sites, backend, batch_size, counter)
    corr = _batched(model, facts, sites, backend, batch_size, counter, corrupt_ids)
    all_idx = torch.arange(len(facts))
    ld_clean = _ld_metric(facts, all_idx)(clean["logits"])
    ld_corrupt = _ld_metric(facts, all_idx)(corr["logits"])
    rows = [(f, c) for c in range(len(components)) for f in range(len(facts))]
    ld_rows = torch.zeros(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        f_idx = torch.tensor([r[0] for r in chunk])
        edits = {}
        for site in sites:
            sel = [i for i, r in enumerate(chunk) if Site(components[r[1]].kind, components[r[1]].layer) == site]
            if not sel:
                continue
            heads = [components[chunk[i][1]].head for i in sel]
            if site.kind in HEAD_KINDS:
                edits[site] = _restore(corr[site], f_idx, sel, heads)
            else:
                edits[site] = _restore(corr[site], f_idx, sel)
        out = run_sites(model, facts.batch(f_idx), edits, backend=backend, counter=counter)
        ld_rows[start:start + len(chunk)] = _ld_metric(facts, f_idx)(out.logits.cpu())
    ld = ld_rows.view(len(components), len(facts))
    denom = float(ld_clean.mean() - ld_corrupt.mean())
    return ((ld.mean(1) - ld_clean.mean()) / denom).numpy()


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

    Uses the same random-token corruption (same seed) as `ap`. Returns the components, both
    estimates, their Pearson and Spearman correlations and the passes real patching cost.
    """
    comps = pick_components(ap, n_components, seed)
    counter = PassCounter()
    t0 = time.perf_counter()
    real = activation_patching(model, facts, comps, batch_size, backend, ap.info.get("seed", seed),
                               counter=counter)
    est = np.array([ap_component_value(ap, c) for c in comps])
    return dict(components=[str(c) for c in comps], ap=est.tolist(), patching=real.tolist(),
                pearson=_pearson(est, real), spearman=_pearson(_ranks(est), _ranks(real)),
                max_abs_diff=float(np.abs(est - real).max()), passes=counter.as_dict(),
                seconds=time.perf_counter() - t0)


# =========================================================================== path patching (FLU)

def _ld_from_candidates(c: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Logit difference from candidate logits c [b, ..., n_cand] and right indices [b]."""
    idx = correct.view(-1, *[1] * (c.dim() - 1)).expand(*c.shape[:-1], 1)
    right = c.gather(-1, idx)[..., 0]
    return right - (c.sum(-1) - right) / (c.shape[-1] - 1)


def _is_gemma_style(layer) -> bool:
    """Gemma 2/3 blocks norm each sublayer's output (post_attention / post_feedforward norms)."""
    return hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm")


def _attn_output(model, l: int, z: torch.Tensor) -> torch.Tensor:
    """What block l's attention writes to the residual stream, from z [..., head, d_head]."""
    layer = model.layers[l]
    o = layer.self_attn.o_proj
    out = torch.nn.functional.linear(z.flatten(-2), o.weight, getattr(o, "bias", None))
    return layer.post_attention_layernorm(out) if _is_gemma_style(layer) else out


def _mlp_output(model, l: int, mlp_out: torch.Tensor) -> torch.Tensor:
    """What block l's MLP writes to the residual stream, from the MLP's raw output."""
    layer = model.layers[l]
    return layer.post_feedforward_layernorm(mlp_out) if _is_gemma_style(layer) else mlp_out


def _candidate_logits(model, resid: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding of only the candidate tokens: resid [b, (n,) d] -> [b, (n,) n_cand]."""
    normed = model.hf.model.norm(resid)
    w = model.hf.lm_head.weight[cand_ids]  # [b, n_cand, d]
    flat = normed.reshape(normed.shape[0], -1, normed.shape[-1])
    logits = torch.einsum("bnd,bcd->bnc", flat, w).reshape(*normed.shape[:-1], cand_ids.shape[-1])
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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
    ld = lambda c: _ld_from_candidates(c, corr_t)  # noqa: E731
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
        effect[l] = ((ld_clean[:, None] - lds).mean(0) / (ld_clean - ld_corrupt).mean()).numpy()
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
    senders = [Site("mlp_out", m) for m in range(receiver_layer)]
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
        out = run_sites(model, facts.batch(f_idx), {Site("resid_pre", receiver_layer): _add_rows(delta)},
                        backend=backend, counter=counter)
        ld_rows[start:start + len(chunk)] = _ld_metric(facts, f_idx)(out.logits.cpu())
    ld = ld_rows.view(receiver_layer, len(facts))
    effect = ((ld_clean.mean() - ld.mean(1)) / (ld_clean.mean() - ld_corrupt.mean())).numpy()
    return dict(effect=effect, ld_clean=float(ld_clean.mean()), ld_corrupt=float(ld_corrupt.mean()),
                positions=positions, receiver_layer=receiver_layer)


def extraction_heads(effect: np.ndarray, threshold: float = 0.05, top_k: int | None = None) -> list[tuple]:
    """Heads whose direct effect reaches `threshold` (or the `top_k` largest), largest first."""
    order = sorted(((float(effect[l, h]), l, h) for l in range(effect.shape[0])
                    for h in range(effect.shape[1])), reverse=True)
    chosen = order[:top_k] if top_k else [o for o in order if o[0] >= threshold]
    if not chosen:
        raise LocalizationError(
            f"no head's direct effect reaches {threshold} (largest {order[0][0]:.3f} at layer "
            f"{order[0][1]} head {order[0][2]}): lower the head threshold or give top_k")
    return [(l, h) for _, l, h in chosen]


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
    chosen = extraction_heads(heads["effect"], head_threshold, head_top_k)
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


# =========================================================================== parameters

_ORIG = re.compile(r"\.?_?original_component")
_MATRIX = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")


def canonical_name(name: str) -> str:
    """HF parameter name without the TransformerBridge's ``_original_component`` wrappers."""
    return _ORIG.sub("", name)


def named_parameters(model) -> dict:
    """{canonical HF name: parameter} (the same names before and after the bridge is built)."""
    out = {}
    for name, p in model.hf.named_parameters():
        out.setdefault(canonical_name(name), p)
    return out


@dataclass(frozen=True)
class Matrix:
    name: str
    layer: int
    block: str  # "attn" or "mlp"
    kind: str  # q k v o gate up down
    numel: int


def weight_matrices(model) -> list[Matrix]:
    """Every attention (q/k/v/o) and MLP (gate/up/down) matrix, biases folded into their matrix."""
    found: dict = {}
    for name, p in named_parameters(model).items():
        m = _MATRIX.search(name)
        if m:
            layer, block, kind, part = int(m[1]), m[2], m[3], m[4]
            key = (layer, kind)
            base = name[: -len(part)] + "weight"
            found.setdefault(key, [base, 0])[1] += p.numel()
    mats = [Matrix(base, l, "attn" if k in ATTN_MATRICES else "mlp", k, n)
            for (l, k), (base, n) in found.items()]
    if not mats:
        raise LocalizationError(f"no q/k/v/o_proj or gate/up/down_proj matrices found in {model.name}")
    order = {k: i for i, k in enumerate(ATTN_MATRICES + MLP_MATRICES)}
    return sorted(mats, key=lambda m: (m.layer, order[m.kind]))


def _matrix_params(model, mats: list[Matrix]) -> list[str]:
    names = named_parameters(model)
    out = []
    for m in mats:
        out.append(m.name)
        bias = m.name[: -len("weight")] + "bias"
        if bias in names:
            out.append(bias)
    return out


# =========================================================================== localizations

@dataclass
class Localization:
    """Which parameters an edit trains, and how that was decided (plain, JSON-serializable)."""

    method: str
    model_name: str
    task: str
    params: list[str]
    n_params: int
    scores: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ---- what it covers
    def layers(self, block: str) -> list[int]:
        """Layers with at least one `block` ('attn' or 'mlp') matrix in the localization."""
        out = set()
        for p in self.params:
            m = _MATRIX.search(p)
            if m and (m[2] == "self_attn") == (block == "attn"):
                out.add(int(m[1]))
        return sorted(out)

    @property
    def mlp_layers(self) -> list[int]:
        return self.layers("mlp")

    @property
    def attn_layers(self) -> list[int]:
        return self.layers("attn")

    def matrices(self) -> list[str]:
        """Short labels such as 'mlp3.gate', 'attn12.q' (other parameters by name)."""
        out = []
        for p in self.params:
            m = _MATRIX.search(p)
            if m and m[4] == "weight":
                out.append(f"{'attn' if m[2] == 'self_attn' else 'mlp'}{m[1]}.{m[3]}")
            elif not m:
                out.append(p)
        return out

    # ---- use with a model
    def check(self, model) -> None:
        """Raise unless this localization was made for `model` and names only its parameters."""
        if self.model_name != model.name:
            raise LocalizationError(f"localization {self.method!r} was made for {self.model_name!r}, "
                                    f"not {model.name!r}: run notebook 02 with MODEL={model.name!r}")
        names = named_parameters(model)
        missing = [p for p in self.params if p not in names]
        if missing:
            raise LocalizationError(f"localization {self.method!r} names {len(missing)} parameter(s) "
                                    f"{model.name} lacks, e.g. {missing[:3]}")
        count = sum(names[p].numel() for p in self.params)
        if count != self.n_params:
            raise LocalizationError(f"localization {self.method!r} records {self.n_params} parameters "
                                    f"but its matrices hold {count} in {model.name}")

    def trainable_parameters(self, model) -> list[torch.nn.Parameter]:
        """Set requires_grad on exactly this localization's parameters; return them."""
        self.check(model)
        names = named_parameters(model)
        chosen = {id(names[p]) for p in self.params}
        for p in model.hf.parameters():
            p.requires_grad_(id(p) in chosen)
        return [names[p] for p in self.params]

    # ---- files
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=_jsonable)

    @classmethod
    def from_json(cls, text: str) -> "Localization":
        data = json.loads(text)
        missing = {"method", "model_name", "task", "params", "n_params"} - set(data)
        if missing:
            raise LocalizationError(f"not a localization file: keys {sorted(missing)} are missing")
        return cls(**data)

    def save(self, results_dir) -> Path:
        from .results import atomic_write_text

        path = localization_path(results_dir, self.task, self.method)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, results_dir, task: str, method: str, model=None) -> "Localization":
        """Load RESULTS_DIR/02_localization/localizations/<task>/<method>.json (checked on `model`)."""
        from .results import MissingResultsError

        path = localization_path(results_dir, task, method)
        if not path.exists():
            have = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.exists() else []
            raise MissingResultsError(f"{path} is missing (have {have or 'none'}): run "
                                      "notebooks/02_localization.py first (same RESULTS_DIR)")
        loc = cls.from_json(path.read_text())
        if model is not None:
            loc.check(model)
        return loc


def localization_path(results_dir, task: str, method: str) -> Path:
    return Path(results_dir).joinpath(*LOCALIZATIONS_DIR, task, f"{method}.json")


def load_localizations(results_dir, task: str, model=None) -> dict:
    """Every saved localization of a task: {method: Localization}."""
    folder = Path(results_dir).joinpath(*LOCALIZATIONS_DIR, task)
    if not folder.exists():
        from .results import MissingResultsError

        raise MissingResultsError(f"{folder} is missing: run notebooks/02_localization.py first")
    return {p.stem: Localization.load(results_dir, task, p.stem, model) for p in sorted(folder.glob("*.json"))}


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, PassCounter):
        return x.as_dict()
    raise TypeError(f"cannot store {type(x)} in a localization file")


def _plain(x):
    return json.loads(json.dumps(x, default=_jsonable))


def _make(model, method, task, mats: list[Matrix], scores=None, meta=None) -> Localization:
    if not mats:
        raise LocalizationError(f"localization {method!r} selects no parameter")
    params = _matrix_params(model, mats)
    names = named_parameters(model)
    return Localization(method, model.name, task, params, sum(names[p].numel() for p in params),
                        _plain(scores or {}), _plain(meta or {}))


def mlp_layers_localization(model, layers: list[int], method: str = "flu", task: str = "",
                            scores=None, meta=None) -> Localization:
    """Whole MLPs (gate, up, down) of the given layers."""
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise LocalizationError(f"{method}: no MLP layer given")
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad:
        raise LocalizationError(f"{method}: layers {bad} outside 0..{model.n_layers - 1}")
    mats = [m for m in weight_matrices(model) if m.block == "mlp" and m.layer in layers]
    return _make(model, method, task, mats, scores, dict(meta or {}, layers=layers))


def flu_localization(model, flu: FLUResult, task: str = "") -> Localization:
    scores = {} if flu.hand_given else dict(
        mlp_path_patching=flu.mlp_effect, head_path_patching=flu.head_effect)
    meta = dict(threshold=flu.threshold, hand_given=flu.hand_given, seconds=flu.seconds,
                passes=flu.passes, extraction_heads=[list(h) for h in flu.extraction_heads],
                extraction_layer=flu.extraction_layer)
    return mlp_layers_localization(model, flu.layers, "flu", task, scores, meta)


def _budget_check(method: str, budget: int, available: int) -> None:
    if budget <= 0:
        raise LocalizationError(f"{method}: the parameter budget must be positive, got {budget}")
    if budget > available:
        raise LocalizationError(f"{method}: no combination of matrices reaches {budget:,} parameters "
                                f"(all candidates together hold {available:,})")


def localization_from_scores(model, method: str, layer_scores: dict, budget: int, task: str = "",
                             mlp_only: bool = False, scores=None, meta=None) -> Localization:
    """The paper's OT localization: rank (layer, attn|mlp) units by |score|, add their whole
    matrices (q,k,v,o / gate,up,down) until the parameter count reaches `budget`."""
    units = [(float(abs(v)), l, "mlp") for l, v in enumerate(layer_scores["mlp"])]
    if not mlp_only:
        units += [(float(abs(v)), l, "attn") for l, v in enumerate(layer_scores["attn"])]
    units.sort(key=lambda u: (-u[0], u[1], u[2]))
    mats = weight_matrices(model)
    _budget_check(method, budget, sum(m.numel for m in mats if not mlp_only or m.block == "mlp"))
    chosen, total = [], 0
    for _, layer, block in units:
        for m in (m for m in mats if m.layer == layer and m.block == block):
            if total >= budget:
                break
            chosen.append(m)
            total += m.numel
    ranking = [f"{b}{l}" for _, l, b in units]
    meta = dict(meta or {}, budget=budget, mlp_only=mlp_only, unit_ranking=ranking)
    layer_scores = {k: np.asarray(v).tolist() for k, v in layer_scores.items()}
    return _make(model, method, task, chosen, dict(scores or {}, layer_scores=layer_scores), meta)


def random_matrices(model, budget: int, seed: int = 0, task: str = "", method: str = "random") -> Localization:
    """Random attention/MLP matrices until the parameter count reaches `budget`."""
    mats = weight_matrices(model)
    _budget_check(method, budget, sum(m.numel for m in mats))
    rng = np.random.default_rng(seed)
    chosen, total = [], 0
    for i in rng.permutation(len(mats)):
        if total >= budget:
            break
        chosen.append(mats[i])
        total += mats[i].numel
    return _make(model, method, task, chosen, meta=dict(budget=budget, seed=seed))


def random_mlp_layers(model, n_layers: int, seed: int = 0, task: str = "") -> Localization:
    """`n_layers` whole MLPs chosen at random."""
    if not 1 <= n_layers <= model.n_layers:
        raise LocalizationError(f"random_mlps: cannot pick {n_layers} of {model.n_layers} MLP layers")
    rng = np.random.default_rng(seed)
    layers = sorted(int(l) for l in rng.choice(model.n_layers, size=n_layers, replace=False))
    return mlp_layers_localization(model, layers, "random_mlps", task, meta=dict(seed=seed))


def all_mlps(model, task: str = "") -> Localization:
    return mlp_layers_localization(model, list(range(model.n_layers)), "all_mlps", task)


def nonlocalized(model, task: str = "") -> Localization:
    """Every parameter except the token embeddings (Gemma ties them to the unembedding)."""
    names = named_parameters(model)
    emb = model.hf.get_input_embeddings().weight
    out_emb = model.hf.get_output_embeddings()
    skip = {id(emb)} | ({id(out_emb.weight)} if out_emb is not None else set())
    params = [n for n, p in names.items() if id(p) not in skip]
    tied = out_emb is not None and out_emb.weight is emb
    return Localization("nonlocalized", model.name, task, params, sum(names[n].numel() for n in params),
                        {}, dict(tied_embeddings=bool(tied), excluded="input embeddings"
                                 + ("" if tied else " and lm_head")))


def all_localizations(model, task: str, flu: Localization, ct: TracingResult | None = None,
                      ap: TracingResult | None = None, seed: int = 0) -> dict:
    """Every method's localization for a task, parameter-matched to FLU's count (see METHODS)."""
    budget = flu.n_params
    locs = {"flu": flu}
    for name, res in (("ct", ct), ("ap", ap)):
        if res is None:
            continue
        ls = res.layer_scores()
        meta = dict(seconds=res.seconds, passes=res.passes, info=res.info)
        locs[name] = localization_from_scores(model, name, ls, budget, task, scores=res.scores, meta=meta)
        locs[f"{name}_mlp"] = localization_from_scores(model, f"{name}_mlp", ls, budget, task,
                                                       mlp_only=True, meta=meta)
    locs["random"] = random_matrices(model, budget, seed, task)
    locs["random_mlps"] = random_mlp_layers(model, len(flu.mlp_layers), seed, task)
    locs["all_mlps"] = all_mlps(model, task)
    locs["nonlocalized"] = nonlocalized(model, task)
    return {m: locs[m] for m in METHODS if m in locs}


def localization_metrics(task: str, locs: dict) -> dict:
    """Flat metrics: <task>.<method>.{mlp_layers, attn_layers, n_params, n_matrices, seconds,
    forward_passes, backward_passes, forward_sequences}."""
    out = {}
    for name, loc in locs.items():
        key = f"{task}.{name}"
        out.update({f"{key}.mlp_layers": loc.mlp_layers, f"{key}.attn_layers": loc.attn_layers,
                    f"{key}.n_params": loc.n_params, f"{key}.n_matrices": len(loc.matrices())})
        passes = loc.meta.get("passes") or {}
        out[f"{key}.seconds"] = float(loc.meta.get("seconds") or 0.0)
        out[f"{key}.forward_passes"] = int(passes.get("forward", 0))
        out[f"{key}.backward_passes"] = int(passes.get("backward", 0))
        out[f"{key}.forward_sequences"] = int(passes.get("forward_sequences", 0))
    return out


def _finite(x):
    return float(x) if np.isfinite(x) else None


def task_metrics(task: str, locs: dict, ap: TracingResult, ct: TracingResult, flu: FLUResult,
                 agreement: dict) -> dict:
    """Flat metrics of one task (notebook 02's metrics.json; keys documented there)."""
    out = localization_metrics(task, locs)
    t = task
    out.update({
        f"{t}.budget": locs["flu"].n_params, f"{t}.ct.n_facts": ct.info["n_facts"],
        f"{t}.ct.noise_samples": ct.info["n_samples"], f"{t}.ct.noise_scale": ct.info["noise_scale"],
        f"{t}.ct.p_clean": ct.info["p_clean"], f"{t}.ct.p_corrupt": ct.info["p_corrupt"],
        f"{t}.ap.n_facts": ap.info["n_facts"],
        f"{t}.ap.ld_clean": ap.info["ld_clean"], f"{t}.ap.ld_corrupt": ap.info["ld_corrupt"],
        f"{t}.ap.agreement.pearson": _finite(agreement["pearson"]),
        f"{t}.ap.agreement.spearman": _finite(agreement["spearman"]),
        f"{t}.ap.agreement.n_components": len(agreement["components"]),
        f"{t}.ap.agreement.components": agreement["components"],
        f"{t}.flu.threshold": flu.threshold, f"{t}.flu.hand_given": flu.hand_given,
        f"{t}.flu.extraction_layer": flu.extraction_layer,
        f"{t}.flu.extraction_heads": [f"{l}.{h}" for l, h in flu.extraction_heads],
        f"{t}.flu.mlp_effect": [] if flu.mlp_effect is None else np.asarray(flu.mlp_effect).tolist(),
        f"ratio_ct_over_ap.{t}.seconds": ct.seconds / ap.seconds,
        f"ratio_ct_over_ap.{t}.forward_sequences": ct.passes.forward_sequences / ap.passes.forward_sequences,
        f"ratio_ct_over_ap.{t}.seconds_per_fact": (ct.seconds / ct.info["n_facts"])
        / (ap.seconds / ap.info["n_facts"]),
        f"ratio_ct_over_ap.{t}.forward_sequences_per_fact": (ct.passes.forward_sequences / ct.info["n_facts"])
        / (ap.passes.forward_sequences / ap.info["n_facts"]),
    })
    for name, res in (("ct", ct), ("ap", ap)):
        ls = res.layer_scores()
        out.update({f"{t}.{name}.layer_attn": np.asarray(ls["attn"]).tolist(),
                    f"{t}.{name}.layer_mlp": np.asarray(ls["mlp"]).tolist()})
    return out


def jaccard(a: Localization, b: Localization, model=None) -> float:
    """Parameter-weighted Jaccard overlap of two localizations (1 = same parameters)."""
    sa, sb = set(a.params), set(b.params)
    if model is None:
        return len(sa & sb) / max(len(sa | sb), 1)
    names = named_parameters(model)
    size = lambda s: sum(names[p].numel() for p in s)  # noqa: E731
    return size(sa & sb) / max(size(sa | sb), 1)


def overlap_matrix(locs: dict, model=None) -> pd.DataFrame:
    keys = list(locs)
    return pd.DataFrame([[jaccard(locs[a], locs[b], model) for b in keys] for a in keys],
                        index=keys, columns=keys)


def _ranges(layers: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4,7'."""
    out, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            out.append(f"{start}" if start == l else f"{start}-{l}")
            start = None
    return ",".join(out) or "-"


def mean_depth(loc: Localization, n_layers: int, block: str | None = None) -> float:
    """Parameter-weighted mean layer of a localization's matrices / (n_layers - 1); NaN if none.

    ``block='mlp'`` or ``'attn'`` restricts to those matrices (each layer counted once per matrix)."""
    layers = []
    for label in loc.matrices():
        m = re.match(r"(attn|mlp)(\d+)\.", label)
        if m and (block is None or m[1] == block):
            layers.append(int(m[2]))
    return float(np.mean(layers) / max(n_layers - 1, 1)) if layers else float("nan")


def summary_table(locs: dict) -> pd.DataFrame:
    """One row per localization: MLP / attention layers, matrices, parameters, cost."""
    rows = []
    for name, loc in locs.items():
        passes = loc.meta.get("passes") or {}
        rows.append({"method": name, "MLP layers": _ranges(loc.mlp_layers),
                     "attention layers": _ranges(loc.attn_layers), "matrices": len(loc.matrices()),
                     "params (M)": round(loc.n_params / 1e6, 2),
                     "seconds": round(float(loc.meta.get("seconds") or 0.0), 1),
                     "forward seqs": int(passes.get("forward_sequences", 0))})
    return pd.DataFrame(rows).set_index("method")


def depth_table(locs: dict, n_layers: int) -> pd.DataFrame:
    """Mean layer / depth of each localization: all matrices, MLP matrices, attention matrices."""
    return pd.DataFrame({name: {"all": mean_depth(l, n_layers), "mlp": mean_depth(l, n_layers, "mlp"),
                                "attn": mean_depth(l, n_layers, "attn")} for name, l in locs.items()}).T


# =========================================================================== plots

def localization_grid(loc: Localization, n_layers: int) -> pd.DataFrame:
    """[matrix kind x layer] 0/1 table of what a localization trains."""
    kinds = [f"attn.{k}" for k in ATTN_MATRICES] + [f"mlp.{k}" for k in MLP_MATRICES]
    grid = pd.DataFrame(0, index=kinds, columns=range(n_layers))
    for label in loc.matrices():
        m = re.match(r"(attn|mlp)(\d+)\.(\w+)$", label)
        if m:
            grid.loc[f"{m[1]}.{m[3]}", int(m[2])] = 1
    if loc.method == "nonlocalized":
        grid[:] = 1
    return grid


def plot_localization(loc: Localization, n_layers: int, ax=None):
    """Heatmap of the matrices a localization trains (rows: matrix kind, columns: layer)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(min(0.45 * n_layers + 2, 12), 2.8))
    sns.heatmap(localization_grid(loc, n_layers), cmap="Blues", vmin=0, vmax=1, cbar=False,
                linewidths=0.5, linecolor="white", ax=ax)
    ax.set(xlabel="layer", ylabel="", title=f"{loc.task} · {loc.method}: {loc.n_params / 1e6:.2f}M params")
    return ax.figure


def plot_scores(scores: dict, title: str = "", ax=None, center: float = 0.0):
    """Heatmap rows = component (heads, MLP), columns = layer, from a TracingResult.scores."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = {}
    for kind, s in scores.items():
        s = np.asarray(s)
        if s.ndim == 2:
            rows.update({f"{kind}.h{h}": s[:, h] for h in range(s.shape[1])})
        else:
            rows[kind] = s
    table = pd.DataFrame(rows).T
    if ax is None:
        _, ax = plt.subplots(figsize=(min(0.45 * table.shape[1] + 2, 12), 0.3 * len(table) + 1.2))
    lim = float(np.abs(table.values).max()) or 1.0
    sns.heatmap(table, cmap="RdBu_r", center=center, vmin=-lim, vmax=lim, ax=ax)
    ax.set(xlabel="layer", title=title)
    return ax.figure


def plot_flu(flu: FLUResult, title: str = ""):
    """Left: each head's direct effect on the answer (extraction heads boxed); right: each MLP's
    effect through the extraction layer's input, with the FLU threshold."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if flu.hand_given:
        raise LocalizationError("hand-given FLU layers have no path-patching scores to plot")
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw=dict(width_ratios=[1.4, 1]))
    eff = np.asarray(flu.head_effect)
    lim = float(np.abs(eff).max()) or 1.0
    sns.heatmap(eff.T, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, ax=a0,
                cbar_kws=dict(label="direct effect"))
    for l, h in flu.extraction_heads:
        a0.add_patch(plt.Rectangle((l, h), 1, 1, fill=False, lw=2, ec="k"))
    a0.set(xlabel="layer", ylabel="head", title="heads -> final residual (path patching)")
    mlp = np.asarray(flu.mlp_effect)
    a1.bar(range(len(mlp)), mlp, color=["C3" if l in flu.layers else "C7" for l in range(len(mlp))])
    a1.axhline(flu.threshold, ls="--", c="k", lw=1)
    a1.set(xlabel="MLP layer", ylabel="effect", xticks=range(len(mlp)),
           title=f"MLPs -> layer {flu.extraction_layer} input (red: FLU)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
