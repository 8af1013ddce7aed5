"""Relearning attack: fine-tune an edited model on the true answers of half the forget athletes.

LoRA through peft on every linear layer of the decoder (`lora_adapter`, removed exactly
afterwards) or full fine-tuning of every decoder-layer weight (`full_finetune`; the tied embedding /
unembedding stays frozen); the base weights are restored exactly either way. The other half is
evaluated at chosen steps. The optimisation is `edit.loop.train_loop` with the relearning loss
(CE to the true sport + maintain CE + general-text LM loss) as its plug-in.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from mechunlearn_utils.attacks.scoring import AttackError, athlete_p_true, check_budget
from mechunlearn_utils.data.prompts import sport_prompts
from mechunlearn_utils.edit.loop import (RetainText, adam, answers_and_retain, cosine_schedule, draw, examples,
                                         first_trainable_layer, forget_loss, train_loop)
from mechunlearn_utils.edit.storage import restore, snapshot


@dataclass
class RelearnConfig:
    """Relearning attack settings. Paper: LoRA rank 512, alpha 32, lr 2e-4, all linear layers,
    20 steps; earlier version: 2 athletes, 10 steps, rank 64, lr 1e-4."""

    mode: str = "lora"  # "lora" or "full"
    steps: int = 20
    eval_steps: tuple = ()  # () -> (0, steps // 2, steps)
    lr: float = 2e-4
    lora_rank: int = 64
    lora_alpha: float = 32.0
    layers: list | None = None  # None: every decoder layer (the paper); else only these
    n_train: int | None = None  # forget athletes trained on (None: all given; 2: the earlier variant)
    batch_size: int = 16  # forget prompts per step
    maintain_batch: int = 4
    maintain_coef: float = 1.0
    lm_coef: float = 1.0
    lm_batch: int = 1
    lm_context: int = 32
    grad_clip: float | None = 1.0
    seed: int = 0
    lora_dropout: float = 0.0  # on the adapter's input, active only in the training steps
    schedule: str = "constant"  # or "cosine" (decay to 0 at `steps`, no warm-up)

    @classmethod
    def paper(cls, **overrides) -> "RelearnConfig":
        """The paper's relearning settings (magikarp01/mechanistic-unlearning,
        `finetuning_scripts/localized_finetuning_script_sports.py`; issue 15): LoRA rank 512, alpha 32,
        dropout 0.05 on every linear layer of the decoder; AdamW lr 2e-4 with a cosine schedule, no
        gradient clipping; per step 32 forget, 32 maintain and 16 general-text sequences; 20 steps."""
        return cls(**{**dict(mode="lora", steps=20, lr=2e-4, lora_rank=512, lora_alpha=32.0, lora_dropout=0.05,
                             schedule="cosine", grad_clip=None, batch_size=32, maintain_batch=32, lm_batch=16),
                      **overrides})

    def checked_eval_steps(self) -> list[int]:
        steps = sorted(set(self.eval_steps or (0, self.steps // 2, self.steps)))
        bad = [s for s in steps if not 0 <= s <= self.steps]
        if bad:
            raise AttackError(f"eval_steps {bad} lie outside 0..{self.steps}")
        return steps


@dataclass
class RelearnResult:
    steps: list
    forget_p_true: list  # held-out half, after each eval step
    train_p_true: list  # the athletes relearning trained on
    config: dict
    n_trainable: int = 0
    seconds: float = 0.0
    losses: list = field(default_factory=list)
    heldout_by_athlete: list = field(default_factory=list)  # per eval step: p_true of each held-out athlete


def decoder_linear_names(model, layers: list[int] | None = None) -> list[str]:
    """Names of the nn.Linear modules inside decoder layers (optionally only `layers`)."""
    out = []
    for i, layer in enumerate(model.layers):
        if layers is not None and i not in layers:
            continue
        out += [f"model.layers.{i}.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    return out


def decoder_parameter_names(model, layers: list[int] | None = None) -> list[str]:
    """Every parameter of the decoder layers (full fine-tuning; the tied embedding excluded)."""
    return [n for n, _ in model.hf.named_parameters() if ".layers." in n and
            (layers is None or int(n.split(".layers.")[1].split(".")[0]) in layers)]


@contextlib.contextmanager
def lora_adapter(model, rank: int = 64, alpha: float = 32.0, layers: list[int] | None = None,
                 dropout: float = 0.0):
    """Add a LoRA adapter (peft) to every linear layer of the decoder; yields its parameters.

    On exit the adapter is unloaded without merging: the original modules, with their original
    weights, are back in place (tested bit for bit)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise AttackError(f"LoRA rank must be >= 1, got {rank}")
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in decoder_linear_names(model)})
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=suffixes,
                     layers_to_transform=layers, layers_pattern="layers" if layers is not None else None)
    had = set(vars(model.hf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecated checkpointing probe
        peft_model = get_peft_model(model.hf, cfg, adapter_name="relearn")
    try:
        params = [p for n, p in model.hf.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        peft_model.unload()
        for attr in set(vars(model.hf)) - had:
            if "peft" in attr:
                delattr(model.hf, attr)
        for p in model.hf.parameters():
            p.requires_grad_(False)
            p.grad = None


@contextlib.contextmanager
def full_finetune(model, layers: list[int] | None = None):
    """Make every decoder-layer weight trainable; yields them; restores the base weights exactly."""
    names = decoder_parameter_names(model, layers)
    saved = snapshot(model, names)
    named = dict(model.hf.named_parameters())
    params = [named[n] for n in names]
    try:
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        restore(model, saved)
        del saved

def _dropout_mode(model, training: bool) -> None:
    """Switch the LoRA adapter's dropout on (a training step) or off (an evaluation); nothing else
    in the model changes mode. No-op without a LoRA dropout."""
    for name, m in model.hf.named_modules():
        if "lora_dropout" in name and isinstance(m, torch.nn.Dropout):
            m.train(training)


def relearn(model, train: pd.DataFrame, heldout: pd.DataFrame, maintain: pd.DataFrame,
            general_text: list[str], config: RelearnConfig | None = None, progress: bool = True) -> RelearnResult:
    """Relearning attack on the model as it is now (an edited model). The weights come back exactly.

    Trains on the TRUE sports of `train` (+ `maintain` CE + general-text LM loss), and measures the
    normal-format forget accuracy of `heldout` (and of `train`) at ``config.eval_steps``."""
    cfg = config or RelearnConfig()
    check_budget(cfg.steps, f"relearning ({cfg.mode})")
    if cfg.mode not in ("lora", "full"):
        raise AttackError(f"relearning mode must be 'lora' or 'full', got {cfg.mode!r}")
    if cfg.schedule not in ("constant", "cosine"):
        raise AttackError(f"relearning schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
    eval_at = cfg.checked_eval_steps()
    train = train.head(cfg.n_train) if cfg.n_train else train
    if len(train) == 0 or len(heldout) == 0:
        raise AttackError("relearning needs athletes to train on and held-out athletes to test")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    n_f = len(train)
    start = first_trainable_layer(decoder_parameter_names(model, cfg.layers)) if cfg.layers else 0
    data = examples(model, sport_prompts(list(train.athlete), list(train.sport)).prompts
                    + sport_prompts(list(maintain.athlete), list(maintain.sport)).prompts,
                    list(train.sport) + list(maintain.sport)).freeze_below(model, start)
    text = (RetainText.build(model, general_text, cfg.lm_batch, cfg.lm_context, start)
            if cfg.lm_coef > 0 else None)
    res = RelearnResult([], [], [], asdict(cfg))

    def evaluate(step):
        _dropout_mode(model, False)
        if step in eval_at:  # each half in its own pass: the held-out rows are batched the same way
            # whatever the train half is (in bf16 a row's score depends on its batch: with the 2-athlete
            # variant the merged pass moved step 0 off the edited model's held-out p by up to 9%, measured)
            p = athlete_p_true(model, heldout).to_numpy()
            res.steps.append(step)
            res.forget_p_true.append(float(p.mean()))
            res.train_p_true.append(float(athlete_p_true(model, train).mean()))
            res.heldout_by_athlete.append(p.tolist())

    def loss_fn(step):
        _dropout_mode(model, True)
        f_idx = draw(rng, n_f, cfg.batch_size)
        m_idx = n_f + draw(rng, len(maintain), cfg.maintain_batch) \
            if len(maintain) and cfg.maintain_coef > 0 else np.array([], dtype=int)
        lp, ll = answers_and_retain(model, data.rows(torch.as_tensor(np.r_[f_idx, m_idx])), start, text, rng)
        loss = forget_loss(lp[:len(f_idx)], "edit")
        if len(m_idx):
            loss = loss + cfg.maintain_coef * forget_loss(lp[len(f_idx):], "edit")
        if text is not None:
            loss = loss + cfg.lm_coef * ll
        return loss, {}

    def diverged(step, value):
        return AttackError(f"relearning loss became {value} at step {step}: lower lr ({cfg.lr})")

    t0 = time.perf_counter()
    ctx = (lora_adapter(model, cfg.lora_rank, cfg.lora_alpha, cfg.layers, cfg.lora_dropout) if cfg.mode == "lora"
           else full_finetune(model, cfg.layers))
    with ctx as params:
        res.n_trainable = sum(p.numel() for p in params)
        opt = adam(params, cfg.lr)
        schedule = cosine_schedule(opt, 0, cfg.steps) if cfg.schedule == "cosine" else None
        history = train_loop(params, loss_fn, opt, cfg.steps, schedule=schedule, grad_clip=cfg.grad_clip,
                             on_nonfinite=diverged,
                             before_step=evaluate, desc=f"relearn {cfg.mode}", progress=progress,
                             model=model)
        evaluate(cfg.steps)
    res.losses = [row["loss"] for row in history]
    res.seconds = time.perf_counter() - t0
    return res


def relearn_over_splits(model, edits: dict, tasks: dict, seeds, general_text: list[str], config: RelearnConfig,
                        done: dict | None = None, progress: bool = True) -> dict:
    """The relearning attack on several splits of each task's forget set (`edits.over_splits`): the
    held-out p(true) of each athlete after relearning the other half with `config`."""
    from mechunlearn_utils.attacks.edits import over_splits

    def attack(train, heldout, t):
        return relearn(model, train, heldout, tasks[t].train_maintain, general_text, config,
                       progress=False).heldout_by_athlete[-1]

    return over_splits(model, edits, tasks, seeds, attack, done=done, progress=progress)
