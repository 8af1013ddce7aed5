"""Soft-prompt attack: ``n_tokens`` learned vectors inserted after BOS, each projected to norm
<= ``norm_bound`` after every step, trained to elicit the true answer on one half of the forget
athletes, evaluated on the other. The vectors live in the *raw* embedding space (the rows of
``embed_tokens.weight``); like token embeddings they are multiplied by the model's embedding scale
(``sqrt(d_model)`` for Gemma) on the way in, so the bound is comparable to a token's raw norm
(about 1.0 for gemma-3-270m). The optimisation is `edit.loop.train_loop` (Adam, projection after
each step)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from mechunlearn_utils.attacks.scoring import AttackError, check_budget
from mechunlearn_utils.data.prompts import sport_prompts
from mechunlearn_utils.edit.loop import answer_logprobs, draw, examples, train_loop


@dataclass
class SoftPromptConfig:
    """Paper: 15 vectors, norm bound 6, lr 1e-5, 128 steps, batch 16, 4 restarts."""

    n_tokens: int = 15
    norm_bound: float = 6.0  # per vector, raw embedding units (before the sqrt(d_model) scale)
    lr: float = 1e-2
    steps: int = 32
    batch_size: int = 16
    restarts: int = 1
    seed: int = 0


@dataclass
class SoftPrompt:
    vectors: torch.Tensor  # [n_tokens, d_model], raw embedding units
    train_loss: float
    restart_losses: list
    losses: list
    config: dict
    seconds: float = 0.0


@torch.no_grad()
def project_norm_(vectors: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale every row with norm above `bound` back onto the ball (in place)."""
    norms = vectors.norm(dim=-1, keepdim=True)
    vectors.mul_(torch.clamp(bound / norms.clamp_min(1e-12), max=1.0))
    return vectors

def _soft_loss(model, ex, idx, soft) -> torch.Tensor:
    return -answer_logprobs(model, ex.rows(idx), 0, soft=soft)[0].mean()


def train_soft_prompt(model, train: pd.DataFrame, config: SoftPromptConfig | None = None,
                      progress: bool = True) -> SoftPrompt:
    """A universal soft prompt that makes the model give the TRUE sport of `train` athletes.

    Each restart starts from the raw embeddings of random tokens; the restart with the lowest
    final training loss (on `train`, never the held-out half) is returned."""
    cfg = config or SoftPromptConfig()
    check_budget(cfg.steps, "soft-prompt attack")
    if cfg.restarts < 1 or cfg.n_tokens < 1 or cfg.norm_bound <= 0:
        raise AttackError("soft prompt needs restarts >= 1, n_tokens >= 1 and norm_bound > 0")
    if len(train) == 0:
        raise AttackError("soft-prompt attack: no athletes to train on")
    ex = examples(model, sport_prompts(list(train.athlete), list(train.sport)).prompts, list(train.sport))
    weight = model.hf.get_input_embeddings().weight
    rng = np.random.default_rng(cfg.seed)
    best, t0 = None, time.perf_counter()
    restart_losses = []
    for r in range(cfg.restarts):
        g = torch.Generator().manual_seed(cfg.seed + r)
        init = torch.randint(0, weight.shape[0], (cfg.n_tokens,), generator=g)
        soft = project_norm_(weight[init.to(weight.device)].detach().clone().float(), cfg.norm_bound)
        soft.requires_grad_(True)
        history = train_loop(
            [soft], lambda step: (_soft_loss(model, ex, torch.as_tensor(draw(rng, len(train), cfg.batch_size)), soft), {}),
            torch.optim.Adam([soft], lr=cfg.lr), cfg.steps, after_step=lambda: project_norm_(soft.data, cfg.norm_bound),
            on_nonfinite=lambda step, v: AttackError(f"soft-prompt loss became {v} at step {step}: lower lr ({cfg.lr})"),
            desc=f"soft prompt {r + 1}/{cfg.restarts}", progress=progress)
        with torch.no_grad():
            final = _soft_loss(model, ex, torch.arange(len(train)), soft).item()
        restart_losses.append(final)
        if best is None or final < best.train_loss:
            best = SoftPrompt(soft.detach().clone(), final, [], [row["loss"] for row in history], asdict(cfg))
    best.restart_losses = restart_losses
    best.seconds = time.perf_counter() - t0
    return best
