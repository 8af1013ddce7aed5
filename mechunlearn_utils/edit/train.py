"""Localized fine-tuning: edit or unlearn facts by training only a localization's weight matrices.

Loss = forget_coef * forget + maintain_coef * maintain CE + lm_coef * general-text LM loss, where
forget is the cross-entropy to the injected answer (editing) or -log(1 - p(true answer))
(unlearning; items already below p = e^-5 are ignored, as in the paper). AdamW (weight decay 0),
cosine schedule, gradient clipping, ~50 steps.

**Frozen prefix.** Layers below the lowest trainable one never change, so their output for the
fixed training prompts is computed once and reused at every step; the forward and backward then
run only through the upper layers (`forward.layers_from`); the one-shot example every prompt
shares runs once per batch (`forward.last_token_hidden`). For a late-layer localization this makes a
step several times cheaper than full fine-tuning.

An edit is saved as only the changed matrices (safetensors) plus a JSON of how it was made;
`load_edited` puts it on a fresh base model and `restore` takes it off again.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.evaluate.suite import unembed
from mechunlearn_utils.core.forward import hidden_from, last_token_hidden, prefix_hidden
from mechunlearn_utils.data.prompts import sport_prompt
from mechunlearn_utils.data.tasks import Task

UNLEARN_FLOOR = math.exp(-5)  # the paper ignores items already below this probability
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class EditError(RuntimeError):
    """Training could not proceed (diverged, bad input); the message says why."""


@dataclass
class EditConfig:
    steps: int = 50
    lr: float = 1e-4
    forget_coef: float = 1.0
    maintain_coef: float = 1.0
    lm_coef: float = 1.0
    batch_size: int = 16  # forget and maintain prompts per step (each)
    lm_batch: int = 2  # general-text sequences per step
    lm_context: int = 64  # tokens per general-text sequence
    lm_positions: int = 16  # positions per sequence scored by the LM loss (0: all; the 262k-way unembedding dominates)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    frozen_prefix: bool = True
    seed: int = 0


# --------------------------------------------------------------------------- frozen prefix

def layer_index(param_name: str) -> int | None:
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


def first_trainable_layer(param_names: list[str]) -> int:
    """Lowest decoder layer with a trainable matrix; 0 if anything below the layers trains."""
    layers = [layer_index(n) for n in param_names]
    if any(l is None and not n.endswith("model.norm.weight") for l, n in zip(layers, param_names)):
        return 0  # embeddings (tied with the unembedding) train: nothing is frozen
    found = [l for l in layers if l is not None]
    return min(found) if found else 0


# --------------------------------------------------------------------------- training data

@dataclass
class Examples:
    """A fixed, tokenized set of prompts with one answer token each (+ its frozen prefix)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor
    answer_ids: torch.Tensor
    prefix: torch.Tensor | None = None

    def __len__(self):
        return len(self.answer_ids)

    def rows(self, idx):
        return (self.input_ids[idx], self.attention_mask[idx], self.last_index[idx], self.answer_ids[idx],
                None if self.prefix is None else self.prefix[idx])


def _examples(model, prompts: list[str], answers: list[str]) -> Examples:
    if not prompts:
        raise EditError("a training set is empty: nothing to forget or maintain")
    batch = model.tokenize(prompts)
    ids = torch.tensor([model.answer_token_id(" " + a.strip()) for a in answers], device=model.hf.device)
    return Examples(batch["input_ids"], batch["attention_mask"], batch["last_index"], ids)


def task_examples(model, task: Task) -> tuple[Examples, Examples]:
    """(forget, maintain) examples in the training format. Forget answers: the injected answer for
    editing, the true one for unlearning. Rejects an injected answer equal to the true one."""
    f, m = task.train_forget, task.train_maintain
    if task.kind == "sports":
        if task.mode == "edit":
            same = f[f.target == f.sport]
            if len(same):
                raise EditError(f"injected answer equals the true one for {list(same.athlete)[:3]}")
        forget = _examples(model, [sport_prompt(a) for a in f.athlete],
                           list(f.target) if task.mode == "edit" else list(f.sport))
        maintain = _examples(model, [sport_prompt(a) for a in m.athlete], list(m.sport))
    else:
        if (f.target.str.strip() == f.target_true.str.strip()).any():
            raise EditError("injected answer equals the true one for some CounterFact facts")
        forget = _examples(model, list(f.prompt), list(f.target if task.mode == "edit" else f.target_true))
        maintain = _examples(model, list(m.prompt), list(m.target_true))
    return forget, maintain


def general_text_batch(model, paragraphs: list[str], n: int, context: int) -> dict:
    """The first `context` tokens of `n` paragraphs (all long enough), as one batch."""
    ids = [model.encode(p)[:context] for p in paragraphs[:n]]
    ids = [x for x in ids if len(x) == context]
    if not ids:
        raise EditError(f"no general-text paragraph has {context} tokens")
    t = torch.tensor(ids, device=model.hf.device)
    return dict(input_ids=t, attention_mask=torch.ones_like(t))


# --------------------------------------------------------------------------- losses

def answer_logprobs(model, ex_rows, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer) and the full log-softmax row at each prompt's last token."""
    input_ids, mask, last, answers, prefix = ex_rows
    h = last_token_hidden(model, input_ids, mask, last, start, prefix)
    logp = torch.log_softmax(unembed(model, h).float(), dim=-1)
    return logp.gather(1, answers[:, None])[:, 0], logp


def forget_loss(logp_true_or_target: torch.Tensor, mode: str) -> torch.Tensor:
    """Editing: CE to the injected answer. Unlearning: -log(1 - p(true)), ignoring p < e^-5."""
    if mode == "edit":
        return -logp_true_or_target.mean()
    p = logp_true_or_target.exp()
    keep = p > UNLEARN_FLOOR
    if not keep.any():
        return logp_true_or_target.sum() * 0.0
    return -torch.log1p(-p[keep].clamp(max=1 - 1e-6)).mean()


def lm_loss(model, batch: dict, start: int, prefix, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on general text (the retain loss), averaged over every position or
    over `positions` [batch, k] (an unbiased estimate that skips most of the vocabulary-sized logits)."""
    hidden = hidden_from(model.hf, batch["input_ids"], batch["attention_mask"], start, prefix)[:, :-1]
    targets = batch["input_ids"][:, 1:]
    if positions is not None:
        hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        targets = targets.gather(1, positions)
    logits = unembed(model, hidden).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def sample_positions(rng: np.random.Generator, n_seqs: int, n_positions: int, k: int) -> torch.Tensor | None:
    """`k` distinct positions per sequence out of `n_positions` ([n_seqs, k]); None when k is 0 or covers all."""
    if k <= 0 or k >= n_positions:
        return None
    return torch.tensor(np.stack([np.sort(rng.choice(n_positions, k, replace=False)) for _ in range(n_seqs)]))


# --------------------------------------------------------------------------- training

@dataclass
class EditResult:
    param_names: list[str]
    config: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    start_layer: int = 0
    n_params: int = 0


def select_parameters(model, param_names: list[str]) -> dict[str, torch.nn.Parameter]:
    """The named HF parameters; a clear error for names the model lacks or an empty list."""
    if not param_names:
        raise EditError("the localization names no parameters to train")
    named = model.named_parameters()
    missing = [n for n in param_names if n not in named]
    if missing:
        raise EditError(f"{len(missing)} parameter(s) not in {model.name}, e.g. {missing[:2]}: "
                        "was this localization made for another model?")
    return {n: named[n] for n in param_names}


def snapshot(model, param_names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named weights (to restore the base model after an edit)."""
    return {n: p.detach().clone() for n, p in select_parameters(model, param_names).items()}


@torch.no_grad()
def restore(model, saved: dict[str, torch.Tensor]) -> None:
    params = select_parameters(model, list(saved))
    for n, t in saved.items():
        params[n].copy_(t)


def train_edit(model, param_names: list[str], task: Task, general_text: list[str],
               config: EditConfig | None = None, progress: bool = True) -> EditResult:
    """Fine-tune only `param_names` of `model.hf` on `task`, in place. Returns the loss history.

    Raises `EditError` on a non-finite loss or gradient; the weights keep their last good values.
    """
    cfg = config or EditConfig()
    if cfg.steps < 1:
        raise EditError("steps must be at least 1")
    params = select_parameters(model, param_names)
    start = first_trainable_layer(param_names) if cfg.frozen_prefix else 0
    forget, maintain = task_examples(model, task)
    use_text = cfg.lm_coef > 0
    if use_text:
        text = general_text_batch(model, general_text, cfg.lm_batch * 4, cfg.lm_context)
        text_prefix = prefix_hidden(model.hf, text["input_ids"], text["attention_mask"], start)
    for ex in (forget, maintain):
        ex.prefix = prefix_hidden(model.hf, ex.input_ids, ex.attention_mask, start)

    rng = np.random.default_rng(cfg.seed)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    sched = _cosine(opt, cfg.warmup_steps, cfg.steps)
    result = EditResult(list(param_names), asdict(cfg), start_layer=start,
                        n_params=sum(p.numel() for p in params.values()))
    last_good = {n: p.detach().clone() for n, p in params.items()}
    t0 = time.perf_counter()
    model.hf.train(False)  # no dropout; gradients still flow
    bar = tqdm(range(cfg.steps), desc=f"{task.name}", disable=not progress, leave=False)
    try:
        for step in bar:
            f_idx = rng.choice(len(forget), min(cfg.batch_size, len(forget)), replace=False)
            m_idx = rng.choice(len(maintain), min(cfg.batch_size, len(maintain)), replace=False)
            lp_f, _ = answer_logprobs(model, forget.rows(f_idx), start)
            lp_m, _ = answer_logprobs(model, maintain.rows(m_idx), start)
            lf = forget_loss(lp_f, task.mode)
            lm_ = -lp_m.mean()
            ll = lp_m.new_zeros(())
            if use_text:
                t_idx = rng.choice(len(text["input_ids"]), min(cfg.lm_batch, len(text["input_ids"])), replace=False)
                tb = {k: v[t_idx] for k, v in text.items()}
                pos = sample_positions(rng, len(t_idx), tb["input_ids"].shape[1] - 1, cfg.lm_positions)
                ll = lm_loss(model, tb, start, None if text_prefix is None else text_prefix[t_idx],
                             None if pos is None else pos.to(tb["input_ids"].device))
            loss = cfg.forget_coef * lf + cfg.maintain_coef * lm_ + cfg.lm_coef * ll
            if not torch.isfinite(loss):
                _put_back(params, last_good)
                raise EditError(f"loss became {loss.item()} at step {step}: lower the learning rate "
                                f"(lr={cfg.lr}); weights kept at their last good values")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            if not torch.isfinite(norm):
                raise EditError(f"gradient norm became {norm.item()} at step {step}; weights kept at "
                                "their last good values")
            opt.step()
            sched.step()
            if all(torch.isfinite(p).all() for p in params.values()):
                for n, p in params.items():
                    last_good[n].copy_(p.detach())
            row = dict(step=step, loss=loss.item(), forget=lf.item(), maintain=lm_.item(), lm=ll.item(),
                       p_forget=lp_f.exp().mean().item())
            result.history.append(row)
            bar.set_postfix(forget=f"{row['forget']:.3f}", maintain=f"{row['maintain']:.3f}", lm=f"{row['lm']:.2f}")
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    result.seconds = time.perf_counter() - t0
    result.seconds_per_step = result.seconds / max(len(result.history), 1)
    return result


@torch.no_grad()
def _put_back(params: dict, saved: dict) -> None:
    for n, p in params.items():
        p.copy_(saved[n])


def _cosine(opt, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------- saving edits

def save_edit(model, param_names: list[str], path, meta: dict) -> Path:
    """Save only the edited matrices (safetensors) + `<path>.json` describing the edit."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    params = select_parameters(model, param_names)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(path))
    info = {"model": model.name, "param_names": list(param_names), **meta}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1, default=str))
    return path


def load_edited(model, path) -> dict[str, torch.Tensor]:
    """Put a saved edit onto `model` (in place). Returns the base weights it replaced (`restore`)."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"no saved edit at {path}: run notebooks/03_editing_and_unlearning.py first")
    info = json.loads(path.with_suffix(".json").read_text())
    if info.get("model") != model.name:
        raise EditError(f"edit {path.name} was made for {info.get('model')!r}, not {model.name!r}")
    tensors = load_file(str(path))
    base = snapshot(model, list(tensors))
    params = select_parameters(model, list(tensors))
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return base


@contextlib.contextmanager
def edited(model, path):
    """`with edited(model, path): ...` evaluates the edited model, then restores the base."""
    base = load_edited(model, path)
    try:
        yield model
    finally:
        restore(model, base)


# --------------------------------------------------------------------------- experiments

def train_split_measures(model, task: Task) -> dict:
    """Training-format p(true) on the training split: {"forget_p_true", "maintain_p_true"}."""
    from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES as cands
    from mechunlearn_utils.evaluate.suite import counterfact_measure, sports_measure

    if task.kind == "sports":
        f = sports_measure(model, task.train_forget, "sport", "normal", cands)["p"]
        m = sports_measure(model, task.train_maintain, "sport", "normal", cands)["p"]
    else:
        f = counterfact_measure(model, task.train_forget, "prompt")["p"]
        m = counterfact_measure(model, task.train_maintain, "prompt")["p"]
    return {"forget_p_true": f, "maintain_p_true": m}


def rank_settings(rows: list[dict], forget_target: float = 0.1) -> list[dict]:
    """Best first: settings whose edit took (forget p_true <= `forget_target`) by maintain p_true,
    then the rest by forget p_true (a failed edit is never preferred to one that took)."""
    took = sorted((r for r in rows if r["forget_p_true"] <= forget_target), key=lambda r: -r["maintain_p_true"])
    rest = sorted((r for r in rows if r["forget_p_true"] > forget_target), key=lambda r: r["forget_p_true"])
    return [{**r, "took": r["forget_p_true"] <= forget_target} for r in took + rest]


def sweep(model, param_names: list[str], task: Task, general_text: list[str], lrs, coefs,
          config: EditConfig | None = None, forget_target: float = 0.1, progress: bool = False) -> list[dict]:
    """Train every (lr, forget_coef) pair from the base weights and measure it on the training split
    (the evaluation split is never used to choose). Best first (`rank_settings`); the base weights
    are restored after each. A setting that diverges gets forget_p_true = 1 and its error."""
    base = snapshot(model, param_names)
    rows = []
    try:
        for lr in lrs:
            for coef in coefs:
                cfg = EditConfig(**{**asdict(config or EditConfig()), "lr": lr, "forget_coef": coef})
                try:
                    train_edit(model, param_names, task, general_text, cfg, progress=progress)
                    rows.append(dict(lr=lr, forget_coef=coef, **train_split_measures(model, task)))
                except EditError as err:
                    rows.append(dict(lr=lr, forget_coef=coef, forget_p_true=1.0, maintain_p_true=0.0, error=str(err)))
                restore(model, base)
    finally:
        restore(model, base)
    return rank_settings(rows, forget_target)


def edit_and_evaluate(model, param_names: list[str], task: Task, general_text: list[str],
                      config: EditConfig, eval_kwargs: dict, save_path=None, meta: dict | None = None,
                      progress: bool = True) -> tuple[dict, EditResult]:
    """Train one edit from the base weights, evaluate it, optionally save it, restore the base."""
    from mechunlearn_utils.evaluate.suite import evaluate_task

    base = snapshot(model, param_names)
    try:
        result = train_edit(model, param_names, task, general_text, config, progress=progress)
        metrics = evaluate_task(model, task, **eval_kwargs)
        if save_path is not None:
            save_edit(model, param_names, save_path, {"task": task.name, "config": asdict(config),
                                                      "task_meta": task.meta, **(meta or {})})
    finally:
        restore(model, base)
    metrics.update({"train.seconds": result.seconds, "train.seconds_per_step": result.seconds_per_step,
                    "train.start_layer": result.start_layer, "train.n_params": result.n_params,
                    "train.final_forget_loss": result.history[-1]["forget"]})
    return metrics, result
