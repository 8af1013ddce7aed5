"""Soft-prompt attack: ``n_tokens`` learned vectors inserted after BOS, each projected to norm
<= ``norm_bound`` after every step, trained to elicit the true answer on one half of the forget
athletes, evaluated on the other. The vectors live in the *raw* embedding space (the rows of
``embed_tokens.weight``); like token embeddings they are multiplied by the model's embedding scale
(``sqrt(d_model)`` for Gemma) on the way in, so the bound is comparable to a token's raw norm
(about 1.0 for gemma-3-270m). The optimisation is `edit.loop.train_loop` (Adam, projection after
each step).

A second attack, the paper's (`train_paper_soft_prompt`): a `UniversalSoftPromptAdversary`, attention over
15 learned vectors added to every token's embedding (issue 15), averaged over 4 runs."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from mechunlearn_utils.attacks.scoring import AttackError, athlete_p_true, check_budget
from mechunlearn_utils.core.forward import embed_scale
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


# --------------------------------------------------------------------------- the paper's adversary

@dataclass
class PaperSoftPromptConfig:
    """The paper's soft-prompt adversary (issue 15; `UniversalSoftPromptAdversary`, magikarp01/tasks
    `src/attacks.py`): attention over `n_vectors` learned key/value vectors, added to every token's
    embedding; key and value norms <= `norm_bound`; AdamW lr 1e-5; `runs` independent runs averaged."""

    n_vectors: int = 15
    norm_bound: float = 6.0  # per key / value vector, raw embedding units
    lr: float = 1e-5
    steps: int = 128
    batch_size: int = 16
    runs: int = 4
    seed: int = 0


class UniversalSoftPromptAdversary(torch.nn.Module):
    """x -> x + Attn(W_q x, K, V) at every token: one set of `n` keys and values (shared by every
    prompt: universal), a bias-free query projection and a one-head bias-free attention, as the
    `SoftPromptAdversary` of the authors' adversary code (keys / values drawn from N(0, 1) and
    clipped to the bound; here one set instead of one per batch row). Works in raw embedding units:
    the hook divides the model's embedding scale out and multiplies it back in."""

    def __init__(self, d_model: int, n: int = 15, norm_bound: float = 6.0, generator=None):
        super().__init__()
        self.norm_bound = norm_bound
        self.keys = torch.nn.Parameter(torch.randn(n, d_model, generator=generator))
        self.values = torch.nn.Parameter(torch.randn(n, d_model, generator=generator))
        self.query_proj = torch.nn.Linear(d_model, d_model, bias=False)
        self.attention = torch.nn.MultiheadAttention(d_model, num_heads=1, bias=False, batch_first=True)
        self.clip_()

    def clip_(self) -> None:
        """Project every key and value back to norm <= norm_bound (after each step)."""
        project_norm_(self.keys.data, self.norm_bound)
        project_norm_(self.values.data, self.norm_bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(x)
        kv = lambda t: t[None].expand(x.shape[0], -1, -1)  # noqa: E731
        return x + self.attention(q, kv(self.keys), kv(self.values), need_weights=False)[0]


@contextlib.contextmanager
def embedding_adversary(model, adversary: UniversalSoftPromptAdversary):
    """While inside, every token embedding of `model` passes through `adversary` (a forward hook
    on the input embedding; the shared-prefix forward and the scoring core see it too)."""
    scale = embed_scale(model)

    def hook(_module, _inputs, out):
        return (adversary(out.float() / scale) * scale).to(out.dtype)

    handle = model.hf.get_input_embeddings().register_forward_hook(hook)
    try:
        yield adversary
    finally:
        handle.remove()


@dataclass
class PaperSoftPrompt:
    adversaries: list  # one trained UniversalSoftPromptAdversary per run
    losses: list  # per run, the training loss per step
    config: dict
    seconds: float = 0.0


def train_paper_soft_prompt(model, train: pd.DataFrame, config: PaperSoftPromptConfig | None = None,
                            progress: bool = True) -> PaperSoftPrompt:
    """`config.runs` universal adversaries (`UniversalSoftPromptAdversary`), each trained with AdamW
    to make the model give the TRUE sport of `train` athletes (normal format); the model's weights
    never change. Evaluate with `paper_soft_prompt_p_true` (the runs averaged)."""
    cfg = config or PaperSoftPromptConfig()
    check_budget(cfg.steps, "paper soft-prompt attack")
    if cfg.runs < 1 or cfg.n_vectors < 1 or cfg.norm_bound <= 0 or len(train) == 0:
        raise AttackError("paper soft prompt needs runs >= 1, n_vectors >= 1, norm_bound > 0 and athletes")
    ex = examples(model, sport_prompts(list(train.athlete), list(train.sport)).prompts, list(train.sport))
    rng, t0 = np.random.default_rng(cfg.seed), time.perf_counter()
    out = PaperSoftPrompt([], [], asdict(cfg))
    for r in range(cfg.runs):
        torch.manual_seed(cfg.seed + r)
        adv = UniversalSoftPromptAdversary(model.d_model, cfg.n_vectors, cfg.norm_bound,
                                           torch.Generator().manual_seed(cfg.seed + r)).to(model.hf.device)
        with embedding_adversary(model, adv):
            history = train_loop(
                list(adv.parameters()),
                lambda step: (_soft_loss(model, ex, torch.as_tensor(draw(rng, len(train), cfg.batch_size)), None), {}),
                torch.optim.AdamW(adv.parameters(), lr=cfg.lr), cfg.steps, after_step=adv.clip_,
                on_nonfinite=lambda step, v: AttackError(f"paper soft-prompt loss became {v} at step {step}"),
                desc=f"paper soft prompt {r + 1}/{cfg.runs}", progress=progress)
        out.adversaries.append(adv.requires_grad_(False))
        out.losses.append([row["loss"] for row in history])
    out.seconds = time.perf_counter() - t0
    return out


def paper_soft_prompt_p_true(model, athletes: pd.DataFrame, sp: PaperSoftPrompt) -> pd.Series:
    """Forget p(true) of each athlete under each run's adversary, averaged over the runs (the paper
    averages its 4 runs)."""
    runs = []
    for adv in sp.adversaries:
        with embedding_adversary(model, adv):
            runs.append(athlete_p_true(model, athletes))
    return sum(runs) / len(runs)
