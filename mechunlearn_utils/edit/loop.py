"""The one training loop of the workbook, and the loss terms it is given.

Every optimisation of the workbook (an edit or unlearning, `edit.train.train_edit`; a weight mask,
`edit.masking.train_mask`; the relearning attack, `attacks.relearning.relearn`; the soft-prompt
attack, `attacks.soft_prompt.train_soft_prompt`) is `train_loop`: the caller hands it the trainable tensors, the optimizer
(and schedule) of that method and a **loss plug-in**, a function ``step -> (loss, record)``; the
loop owns the steps, the progress bar, the non-finite checks, zeroing, backward, gradient
clipping, the optimizer / schedule step and the per-step record.

The loss terms the plug-ins are made of live here too:

* `answer_logprobs`   log p(answer) at each prompt's last token (shared one-shot prefix, frozen
                      layers below ``start``)
* `forget_loss`       editing: CE to the injected answer; unlearning: -log(1 - p(true))
* `RetainText`        the retain term: next-token LM loss on general text (`lm_loss`), its batch
                      drawn from the caller's random generator (`draw`)
* `answers_and_retain`  log p(answer) of the prompts and the retain loss through one unembedding
                      (a training step's loss: edits, masks, relearning)
* `EditData`, `edit_terms`  the forget + maintain + retain loss of an edit (shared by editing
                      and masking)
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.forward import hidden_from, last_token_hidden, prefix_hidden
from mechunlearn_utils.core.precision import fp32_masters
from mechunlearn_utils.evaluate.suite import unembed

UNLEARN_FLOOR = math.exp(-5)  # the paper ignores items already below this probability
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class EditError(RuntimeError):
    """Training could not proceed (diverged, bad input); the message says why."""


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

    @classmethod
    def concat(cls, *sets: "Examples") -> "Examples":
        """The rows of `sets` in order, right-padded to one width (padding is masked and lies past
        every row's last token, so each row's hidden states are its own)."""
        width = max(s.input_ids.shape[1] for s in sets)

        def pad(t):  # zeros on the right of dim 1 (token ids, mask, frozen hidden states)
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))

        frozen = [s.prefix for s in sets]
        return cls(torch.cat([pad(s.input_ids) for s in sets]), torch.cat([pad(s.attention_mask) for s in sets]),
                   torch.cat([s.last_index for s in sets]), torch.cat([s.answer_ids for s in sets]),
                   None if any(f is None for f in frozen) else torch.cat([pad(f) for f in frozen]))

    def freeze_below(self, model, start: int) -> "Examples":
        """Compute the output of the layers below `start` once (`forward.prefix_hidden`)."""
        self.prefix = prefix_hidden(model.hf, self.input_ids, self.attention_mask, start)
        return self


def examples(model, prompts: list[str], answers: list[str]) -> Examples:
    """Tokenized prompts with the token id of each answer (a leading space added)."""
    if not prompts:
        raise EditError("a training set is empty: nothing to forget or maintain")
    batch = model.tokenize(prompts)
    ids = torch.tensor([model.answer_token_id(" " + a.strip()) for a in answers], device=model.hf.device)
    return Examples(batch["input_ids"], batch["attention_mask"], batch["last_index"], ids)


def general_text_batch(model, paragraphs: list[str], n: int, context: int) -> dict:
    """The first `context` tokens of `n` paragraphs (all long enough), as one batch."""
    ids = [model.encode(p)[:context] for p in paragraphs[:n]]
    ids = [x for x in ids if len(x) == context]
    if not ids:
        raise EditError(f"no general-text paragraph has {context} tokens")
    t = torch.tensor(ids, device=model.hf.device)
    return dict(input_ids=t, attention_mask=torch.ones_like(t))


def draw(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """`min(k, n)` distinct indices out of `n` (one draw of the caller's generator)."""
    return rng.choice(n, min(k, n), replace=False)


# --------------------------------------------------------------------------- loss terms

def answer_logprobs(model, ex_rows, start: int, soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer) and the full log-softmax row at each prompt's last token (`soft`: a soft
    prompt [k, d] inserted after BOS)."""
    input_ids, mask, last, answers, prefix = ex_rows
    h = last_token_hidden(model, input_ids, mask, last, start, prefix, soft=soft)
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


def lm_hidden(model, batch: dict, start: int, prefix, positions: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm'd hidden states [n, d] of general text and the next token [n] each predicts: every
    position, or `positions` [batch, k] of each sequence."""
    hidden = hidden_from(model.hf, batch["input_ids"], batch["attention_mask"], start, prefix)[:, :-1]
    targets = batch["input_ids"][:, 1:]
    if positions is not None:
        hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        targets = targets.gather(1, positions)
    return hidden.flatten(0, 1), targets.flatten()


def lm_loss(model, batch: dict, start: int, prefix, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy on general text (the retain loss), averaged over every position or
    over `positions` [batch, k] (an unbiased estimate that skips most of the vocabulary-sized logits)."""
    hidden, targets = lm_hidden(model, batch, start, prefix, positions)
    return torch.nn.functional.cross_entropy(unembed(model, hidden).float(), targets)


def sample_positions(rng: np.random.Generator, n_seqs: int, n_positions: int, k: int) -> torch.Tensor | None:
    """`k` distinct positions per sequence out of `n_positions` ([n_seqs, k]); None when k is 0 or covers all."""
    if k <= 0 or k >= n_positions:
        return None
    return torch.tensor(np.stack([np.sort(rng.choice(n_positions, k, replace=False)) for _ in range(n_seqs)]))


@dataclass
class RetainText:
    """The retain term: general text (first `context` tokens of `pool` paragraphs; 0: `4 * batch`;
    -1: all of them), its frozen prefix, and per step `batch` sequences drawn afresh from the pool
    (`positions` scored per sequence; 0: all). The paper draws fresh Pile sequences every step: a pool of every
    training paragraph is the closest this offline workbook gets."""

    text: dict
    prefix: torch.Tensor | None
    start: int
    batch: int
    positions: int = 0

    @classmethod
    def build(cls, model, paragraphs: list[str], batch: int, context: int, start: int, positions: int = 0,
              pool: int = 0):
        n = len(paragraphs) if pool < 0 else (pool or batch * 4)
        text = general_text_batch(model, paragraphs, n, context)
        return cls(text, prefix_hidden(model.hf, text["input_ids"], text["attention_mask"], start), start,
                   batch, positions)

    def hidden(self, model, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`lm_hidden` of a batch drawn from `rng` (the sequences, then the scored positions)."""
        t_idx = draw(rng, len(self.text["input_ids"]), self.batch)
        tb = {k: v[t_idx] for k, v in self.text.items()}
        pos = sample_positions(rng, len(t_idx), tb["input_ids"].shape[1] - 1, self.positions)
        return lm_hidden(model, tb, self.start, None if self.prefix is None else self.prefix[t_idx],
                         None if pos is None else pos.to(tb["input_ids"].device))


def answers_and_retain(model, ex_rows, start: int, text: RetainText | None,
                       rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer) at each row's last token and the retain LM loss on a text batch drawn from
    `rng` (0 without `text`), through **one** unembedding of both sets of hidden states.

    The answer rows and the scored text positions are 32 + 32 rows of a training step; unembedding
    them apart read the 262k x 640 unembedding matrix twice forward and twice backward (memory-bound
    at this size: ~28 ms a read in bf16 on the 2-core AMX host). Row for row the same numbers as
    `answer_logprobs` + `lm_loss` up to the matrix product's rounding (tested)."""
    input_ids, mask, last, answers, prefix = ex_rows
    h = last_token_hidden(model, input_ids, mask, last, start, prefix)
    if text is None:
        logp = torch.log_softmax(unembed(model, h).float(), dim=-1)
        return logp.gather(1, answers[:, None])[:, 0], logp.new_zeros(())
    h_text, targets = text.hidden(model, rng)
    logp = torch.log_softmax(unembed(model, torch.cat([h, h_text])).float(), dim=-1)
    n = len(h)
    return logp[:n].gather(1, answers[:, None])[:, 0], torch.nn.functional.nll_loss(logp[n:], targets)


# --------------------------------------------------------------------------- the edit loss

@dataclass
class EditData:
    """What an edit trains on: forget and maintain examples, general text, the frozen-prefix layer."""

    forget: Examples
    maintain: Examples
    text: RetainText | None
    start: int
    both: Examples | None = None  # forget rows then maintain rows: one forward per step for both terms

    def __post_init__(self):
        if self.both is None:
            self.both = Examples.concat(self.forget, self.maintain)

    @classmethod
    def build(cls, model, forget: Examples, maintain: Examples, general_text: list[str], start: int,
              lm_coef: float, lm_batch: int, lm_context: int, lm_positions: int = 0,
              lm_pool: int = 0) -> "EditData":
        text = (RetainText.build(model, general_text, lm_batch, lm_context, start, lm_positions, lm_pool)
                if lm_coef > 0 else None)
        return cls(forget.freeze_below(model, start), maintain.freeze_below(model, start), text, start)


def edit_terms(model, data: EditData, rng: np.random.Generator, mode: str, cfg) -> tuple[torch.Tensor, dict]:
    """One step of the edit loss: forget_coef * forget + maintain_coef * maintain CE + lm_coef * LM
    (draws: forget rows, maintain rows, text rows and positions; `cfg` an `EditConfig` or a
    `MaskConfig`). Returns (loss, record)."""
    f_idx = draw(rng, len(data.forget), cfg.batch_size)
    m_idx = draw(rng, len(data.maintain), cfg.batch_size)
    lp, ll = answers_and_retain(model, data.both.rows(torch.as_tensor(np.r_[f_idx, len(data.forget) + m_idx])),
                                data.start, data.text, rng)
    lp_f, lp_m = lp[:len(f_idx)], lp[len(f_idx):]
    lf, lm_ = forget_loss(lp_f, mode), -lp_m.mean()
    loss = cfg.forget_coef * lf + cfg.maintain_coef * lm_ + cfg.lm_coef * ll
    return loss, dict(forget=lf, maintain=lm_, lm=ll, p_forget=lp_f.exp().mean())


# --------------------------------------------------------------------------- the loop

FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused Adam / AdamW kernel


def adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay 0 (the paper's optimizer for edits and relearning), with torch's
    fused kernel where the device has one: one pass over each tensor per step instead of a dozen
    elementwise ops. Measured on the 2-core AMX host, the 12 fp32 MLP matrices (16M weights) of a
    localized edit: 33.7 -> 11.2 ms per step; the same update up to float rounding (max |diff| of
    the weights 2.4e-7 after 11 steps). The weight masks keep torch's plain Adam: they train in the
    model's dtype, where the fused kernel's fp32 arithmetic would change more than rounding."""
    fused = bool(params) and all(p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused or None)


def cosine_schedule(opt, warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    def factor(step):
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_loop(params: list[torch.Tensor], loss_fn: Callable[[int], tuple[torch.Tensor, dict]], optimizer,
               steps: int, *, schedule=None, grad_clip: float | None = None, check_grad: bool = False,
               on_nonfinite: Callable[[int, float], Exception] | None = None,
               after_step: Callable[[], None] | None = None, before_step: Callable[[int], None] | None = None,
               postfix: tuple[str, ...] = ("loss",), desc: str = "training", progress: bool = True,
               model=None, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Run `steps` optimisation steps of `loss_fn` over `params`; returns one record per step.

    `model` (the `LoadedModel` the params belong to): in a model held in bf16, its trained tensors
    train as fp32 master weights (`core.precision.fp32_masters`); nothing changes under fp32.

    Each step: ``before_step(step)`` (an evaluation), ``loss, terms = loss_fn(step)``; a non-finite
    loss raises ``on_nonfinite(step, value)`` (an `EditError` by default) before any update;
    zero_grad, backward, gradient clipping to `grad_clip` (a non-finite norm raises when
    `check_grad`), optimizer step, `schedule` step, ``after_step()`` (a projection, a checkpoint).
    The record is ``{"step", "loss", **terms}`` with tensors turned into floats; ``on_step(record)``
    sees each one as it is made (a progress bar of a widget)."""
    with contextlib.nullcontext() if model is None else fp32_masters(model, params) as casts:
        return _steps(params, loss_fn, optimizer, steps, schedule, grad_clip, check_grad, on_nonfinite,
                      after_step, before_step, postfix, tqdm(range(steps), desc=desc, disable=not progress, leave=False),
                      on_step, casts)


def _steps(params, loss_fn, optimizer, steps, schedule, grad_clip, check_grad, on_nonfinite, after_step,
           before_step, postfix, bar, on_step=None, casts=None) -> list[dict]:
    history = []
    for step in bar:
        if casts is not None:
            casts.new_step()  # the masters moved: round them again (once for the whole step)
        if before_step is not None:
            before_step(step)
        loss, terms = loss_fn(step)
        if not torch.isfinite(loss):
            raise (on_nonfinite or _diverged)(step, loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if check_grad and not torch.isfinite(norm):
                raise EditError(f"gradient norm became {norm.item()} at step {step}; weights kept at "
                                "their last good values")
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if after_step is not None:
            after_step()
        row = dict(step=step, loss=loss.item(),
                   **{k: v.item() if torch.is_tensor(v) else v for k, v in terms.items()})
        history.append(row)
        if on_step is not None:
            on_step(row)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in postfix})
    return history


def _diverged(step: int, value: float) -> EditError:
    return EditError(f"loss became {value} at step {step}: lower the learning rate")
