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

The loop itself and the loss terms are `edit.loop` (`train_loop`, `edit_terms`), shared with the
weight masks and the attacks.

An edit is saved as only the changed matrices (safetensors) plus a JSON of how it was made
(`edit.storage`): `load_edited` puts it on a fresh base model and `restore` takes it off again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from mechunlearn_utils.data.prompts import sport_prompt
from mechunlearn_utils.data.tasks import Task
from mechunlearn_utils.edit.loop import (EditData, EditError, Examples, adam, cosine_schedule, edit_terms, examples,
                                         first_trainable_layer, train_loop)
from mechunlearn_utils.edit.storage import restore, save_edit, select_parameters, snapshot


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
    lm_pool: int = 0  # paragraphs the sequences are drawn from (0: 4 x lm_batch, fixed; -1: every one given)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    frozen_prefix: bool = True
    seed: int = 0

    @classmethod
    def paper(cls, **overrides) -> "EditConfig":
        """The paper's editing run (magikarp01/mechanistic-unlearning,
        finetuning_scripts/localized_finetuning_script_sports.py: 50 epochs of one optimizer step, 4 x 16
        gradient-accumulated = 64 forget, 64 maintain and 64 Pile sequences of 100 tokens per step,
        AdamW wd 0, cosine annealing over the steps, clip 1; lr and forget coef swept over
        {1e-5, 3e-5, 1e-4} x {0.1, 1, 5}). The Pile is not reachable offline: general text is drawn
        afresh each step from every training paragraph of `data/general_text.txt` (`lm_pool`)."""
        base = dict(steps=50, batch_size=64, lm_batch=64, lm_context=100, lm_positions=0, lm_pool=-1,
                    grad_clip=1.0, warmup_steps=0)
        return cls(**{**base, **overrides})


# The paper's sweep grid (the same script, its launch settings; see the citation in README)
PAPER_SWEEP = dict(lrs=(1e-5, 3e-5, 1e-4), coefs=(0.1, 1.0, 5.0))


def protocol_table(scaled: EditConfig, sweep_lrs, sweep_coefs, sweep_steps: int, n_tasks_swept: int,
                   n_tasks: int):
    """What the scaled protocol changes against the paper's editing run: one row per setting with
    both values and the factor (paper / ours) where it is a size."""
    import pandas as pd

    paper = EditConfig.paper()
    rows = [("steps", scaled.steps, paper.steps), ("forget prompts per step", scaled.batch_size, paper.batch_size),
            ("maintain prompts per step", scaled.batch_size, paper.batch_size),
            ("general-text sequences per step", scaled.lm_batch, paper.lm_batch),
            ("tokens per general-text sequence", scaled.lm_context, paper.lm_context),
            ("LM positions scored per sequence", scaled.lm_positions or scaled.lm_context, paper.lm_context),
            ("general-text pool (paragraphs)", "all" if scaled.lm_pool < 0 else scaled.lm_pool or 4 * scaled.lm_batch,
             "all (fresh each step)"),
            ("sweep lrs", ", ".join(f"{x:g}" for x in sweep_lrs), ", ".join(f"{x:g}" for x in PAPER_SWEEP["lrs"])),
            ("sweep forget coefs", ", ".join(f"{x:g}" for x in sweep_coefs),
             ", ".join(f"{x:g}" for x in PAPER_SWEEP["coefs"])),
            ("sweep steps", sweep_steps, paper.steps), ("tasks swept", n_tasks_swept, n_tasks)]
    df = pd.DataFrame(rows, columns=["setting", "this run", "paper"]).set_index("setting")
    df["paper / this run"] = [round(b / a, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a
                              else "" for a, b in zip(df["this run"], df["paper"])]
    return df


# --------------------------------------------------------------------------- training data

def task_examples(model, task: Task) -> tuple[Examples, Examples]:
    """(forget, maintain) examples in the training format. Forget answers: the injected answer for
    editing, the true one for unlearning. Rejects an injected answer equal to the true one."""
    f, m = task.train_forget, task.train_maintain
    if task.kind == "sports":
        if task.mode == "edit":
            same = f[f.target == f.sport]
            if len(same):
                raise EditError(f"injected answer equals the true one for {list(same.athlete)[:3]}")
        forget = examples(model, [sport_prompt(a) for a in f.athlete],
                          list(f.target) if task.mode == "edit" else list(f.sport))
        maintain = examples(model, [sport_prompt(a) for a in m.athlete], list(m.sport))
    else:
        if (f.target.str.strip() == f.target_true.str.strip()).any():
            raise EditError("injected answer equals the true one for some CounterFact facts")
        forget = examples(model, list(f.prompt), list(f.target if task.mode == "edit" else f.target_true))
        maintain = examples(model, list(m.prompt), list(m.target_true))
    return forget, maintain


def edit_data(model, param_names: list[str], task: Task, general_text: list[str], cfg) -> EditData:
    """The training data of an edit or a mask (`cfg`: an `EditConfig` or a `MaskConfig`)."""
    start = first_trainable_layer(list(param_names)) if cfg.frozen_prefix else 0
    forget, maintain = task_examples(model, task)
    return EditData.build(model, forget, maintain, general_text, start, cfg.lm_coef, cfg.lm_batch,
                          cfg.lm_context, getattr(cfg, "lm_positions", 0), getattr(cfg, "lm_pool", 0))


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


def train_edit(model, param_names: list[str], task: Task, general_text: list[str],
               config: EditConfig | None = None, progress: bool = True, on_step=None) -> EditResult:
    """Fine-tune only `param_names` of `model.hf` on `task`, in place. Returns the loss history
    (``on_step(record)``: called after every step, see `train_loop`).

    Raises `EditError` on a non-finite loss or gradient; the weights keep their last good values.
    """
    cfg = config or EditConfig()
    if cfg.steps < 1:
        raise EditError("steps must be at least 1")
    params = select_parameters(model, param_names)
    data = edit_data(model, param_names, task, general_text, cfg)
    rng = np.random.default_rng(cfg.seed)
    for p in params.values():
        p.requires_grad_(True)
    opt = adam(list(params.values()), cfg.lr)
    result = EditResult(list(param_names), asdict(cfg), start_layer=data.start,
                        n_params=sum(p.numel() for p in params.values()))
    last_good = {n: p.detach().clone() for n, p in params.items()}

    def diverged(step, value):
        restore(model, last_good)
        return EditError(f"loss became {value} at step {step}: lower the learning rate "
                         f"(lr={cfg.lr}); weights kept at their last good values")

    def checkpoint():
        # one pass over the weights (a finite total norm <=> every weight finite; a norm that overflows,
        # weights past ~1e19, only keeps the older checkpoint). Check + copy for full fine-tuning's 100M
        # bf16 weights: 173 ms per step with `isfinite(p).all()` per tensor, 44 ms so (measured)
        values = list(params.values())
        if torch.isfinite(torch.nn.utils.get_total_norm(values)):
            torch._foreach_copy_(list(last_good.values()), [p.detach() for p in values])

    t0 = time.perf_counter()
    model.hf.train(False)  # no dropout; gradients still flow
    try:
        result.history = train_loop(
            list(params.values()), lambda step: edit_terms(model, data, rng, task.mode, cfg),
            opt, cfg.steps, schedule=cosine_schedule(opt, cfg.warmup_steps, cfg.steps), grad_clip=cfg.grad_clip,
            check_grad=True, on_nonfinite=diverged, after_step=checkpoint, postfix=("forget", "maintain", "lm"),
            desc=task.name, progress=progress, model=model, on_step=on_step)
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    result.seconds = time.perf_counter() - t0
    result.seconds_per_step = result.seconds / max(len(result.history), 1)
    return result


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
