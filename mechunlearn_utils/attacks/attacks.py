"""Attacks on edited models: does the forgotten fact come back?

Every attack starts from an edited model saved by notebook 03 (`edit_path`, `edited` from
`edit`) and measures the **forget accuracy**: the probability of the *true* sport normalized
over the candidates ``basketball, baseball, football, golf`` (the paper's "continuous accuracy",
the same candidates `evals.evaluate_task` uses), on athletes the attack did not train on.

* **Relearning** (`relearn`): fine-tune on the true answers of one half of the forget athletes
  (+ maintain athletes + general text), evaluate the other half at chosen steps. LoRA through
  peft on every linear layer of the decoder (`lora_adapter`, removed exactly afterwards) or full
  fine-tuning of every decoder-layer weight (the tied embedding / unembedding stays frozen);
  the base weights are restored exactly either way.
* **Soft prompt** (`train_soft_prompt`): ``n_tokens`` learned vectors inserted after BOS, each
  projected to norm <= ``norm_bound`` after every step, trained to elicit the true answer on one
  half, evaluated on the other. The vectors live in the *raw* embedding space (the rows of
  ``embed_tokens.weight``); like token embeddings they are multiplied by the model's embedding
  scale (``sqrt(d_model)`` for Gemma) on the way in, so the bound is comparable to a token's raw
  norm (about 1.0 for gemma-3-270m).
* **Alternative formats** (`ALT_FORMATS`): question and multiple choice from the evaluation suite
  plus the three `prompts.SPORT_PARAPHRASE_TEMPLATES` no edit trains on.
* **Quantization** (`quantized`, `fake_quantize`): symmetric per-output-row (optionally per
  group of input columns) round-to-nearest int8 / int4, applied to the edited matrices or to
  every linear weight of the decoder, then evaluated.
* **Other languages** (`language_p_true`): one-shot prompts in French, German, Spanish from
  ``data/multilingual_templates.csv``; answers as the model says them. An answer word of several
  tokens is scored by its **first token** (the default, ``multi_token="first"``; the first tokens
  of a language's candidates must differ) or rejected (``multi_token="reject"``).

**Shared prefix.** All prompts of a format start with the same one-shot example, which runs once
per batch with and without gradients (`forward.last_token_hidden`; the soft prompt sits inside
that shared prefix). Where relearning trains only upper layers (``layers=``), the lower layers'
output is computed once as well (`forward.prefix_hidden`).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.paths import DATA_DIR
from mechunlearn_utils.edit.train import (answer_logprobs, edited, first_trainable_layer, forget_loss, general_text_batch, lm_loss,
                   restore, snapshot)
from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES, candidate_token_ids, unembed
from mechunlearn_utils.core.forward import last_token_hidden, prefix_hidden
from mechunlearn_utils.data.prompts import SPORT_PARAPHRASE_TEMPLATES, sport_prompts
from mechunlearn_utils.workbook.results import MissingResultsError

CANDIDATES = EDIT_CANDIDATES
SPORT_COLUMNS = CANDIDATES
SPORTS_TASKS = ("athletes_to_sport", "sport_to_golf", "unlearn_sport")
EDITS_STEM = "03_editing_and_unlearning"
EDITS_NOTEBOOK = "notebooks/03_editing_and_unlearning.py"
LANGUAGE_CSV = DATA_DIR / "multilingual_templates.csv"
ALT_FORMATS = {
    "question": dict(fmt="question"),
    "mcq": dict(fmt="mcq"),
    **{f"para{i + 1}": dict(template=t) for i, t in enumerate(SPORT_PARAPHRASE_TEMPLATES)},
}


class AttackError(ValueError):
    """An attack cannot run as asked (zero budget, unknown language, bad data); says why."""


def check_budget(steps: int, what: str) -> None:
    """Refuse an attack budget below one step with a message that says so."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise AttackError(f"{what}: an attack budget of {steps!r} steps does nothing; give steps >= 1 "
                          "(the notebook's RELEARN_STEPS / SOFT_PROMPT_STEPS parameters)")


# =========================================================================== edited models

def edits_dir(results_dir, task: str) -> Path:
    return Path(results_dir) / EDITS_STEM / "edits" / task


def available_methods(results_dir, task: str) -> list[str]:
    """Methods with a saved edit for `task` (sorted), [] when none."""
    d = edits_dir(results_dir, task)
    return sorted(p.stem for p in d.glob("*.safetensors") if p.with_suffix(".json").exists())


def edit_path(results_dir, task: str, method: str) -> Path:
    """The saved edit of (task, method), or an error that names the notebook to run."""
    path = edits_dir(results_dir, task) / f"{method}.safetensors"
    if not path.exists() or not path.with_suffix(".json").exists():
        have = available_methods(results_dir, task)
        hint = f" (saved for this task: {', '.join(have)})" if have else ""
        raise MissingResultsError(
            f"no edited model for task {task!r}, method {method!r} at {path}{hint}: run "
            f"{EDITS_NOTEBOOK} first with the same RESULTS_DIR and this task and method")
    return path


def edit_info(results_dir, task: str, method: str) -> dict:
    """The JSON notebook 03 wrote next to the edit (task, task_meta, config, method, ...)."""
    return json.loads(edit_path(results_dir, task, method).with_suffix(".json").read_text())


def task_kwargs(info: dict) -> dict:
    """`make_task` keyword arguments that rebuild the exact splits an edit was trained on."""
    meta = dict(info.get("task_meta") or {})
    kw = {"seed": meta.get("seed", 0)}
    if "sport" in meta:
        kw["sport"] = meta["sport"]
    if "n" in meta:
        kw["n"] = meta["n"]
    return kw


def find_edits(results_dir, tasks: list[str], methods: list[str] | None = None) -> dict:
    """{(task, method): path} for the requested tasks; ``methods`` None or [] = every saved one.

    Raises the notebook-03 error when a task has no edit at all, or a requested method is missing
    for every task (a method missing for some tasks only is skipped)."""
    bad = [t for t in tasks if t not in SPORTS_TASKS]
    if not tasks or bad:
        raise AttackError(f"the attacks run on sports tasks {list(SPORTS_TASKS)}; got {list(tasks)} (CounterFact "
                          "facts have no shared answer set for soft prompts, languages and relearning splits)")
    found = {}
    for task in tasks:
        have = available_methods(results_dir, task)
        if not have:
            edit_path(results_dir, task, (methods or ["flu"])[0])  # raises with the hint
        for m in (methods or have):
            if m in have:
                found[task, m] = edit_path(results_dir, task, m)
    for m in methods or []:
        if not any(k[1] == m for k in found):
            edit_path(results_dir, tasks[0], m)  # raises, naming notebook 03
    return found


def over_edits(model, edits: dict, fn, include_base: bool = False, desc: str = "edited models",
               progress: bool = True) -> dict:
    """``{(task, method): fn(task, method)}``, each edit put on the model in turn and taken off again.

    ``include_base`` first adds ``(task, "base")`` for every task, run on the unedited model."""
    items = [((t, "base"), None) for t in dict.fromkeys(k[0] for k in edits)] if include_base else []
    out = {}
    for (task, method), path in tqdm(items + list(edits.items()), desc=desc, disable=not progress):
        with (contextlib.nullcontext() if path is None else edited(model, path)):
            out[task, method] = fn(task, method)
    return out


def edit_weights(model, path) -> tuple[dict, dict]:
    """(base weights, edited weights) of the matrices a saved edit changes; call on the base model."""
    from safetensors.torch import load_file

    new = load_file(str(Path(path).with_suffix(".safetensors")))
    return snapshot(model, list(new)), new


def candidate_scores(model, prompts: list[str], cand_ids, correct, soft=None, batch_size: int = 32) -> pd.DataFrame:
    """Per prompt: p(correct) normalized over its candidate token ids, raw p, argmax hit."""
    if len(prompts) == 0:
        raise AttackError("nothing to evaluate: no prompts (is the athlete set empty?)")
    cand = torch.as_tensor(np.asarray(cand_ids), dtype=torch.long)
    correct = torch.as_tensor(np.asarray(correct), dtype=torch.long)
    rows = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            b = model.tokenize(prompts[s:s + batch_size])
            h = last_token_hidden(model, b["input_ids"], b["attention_mask"], b["last_index"],
                                  soft=None if soft is None else soft.detach())
            logp = torch.log_softmax(unembed(model, h).float(), -1).cpu()
            c, r = cand[s:s + batch_size], correct[s:s + batch_size]
            lp = logp.gather(1, c)
            norm = torch.softmax(lp, -1)
            ar = torch.arange(len(c))
            rows.append(pd.DataFrame(dict(p_norm=norm[ar, r].numpy(), p_correct=lp[ar, r].exp().numpy(),
                                          hit=(lp.argmax(-1) == r).numpy())))
    return pd.concat(rows, ignore_index=True)


def _summary(scores: pd.DataFrame) -> dict:
    return {"p": float(scores.p_norm.mean()), "acc": float(scores.hit.mean()), "n": int(len(scores))}


def _sport_scores(model, athletes: pd.DataFrame, fmt: str, template: str | None, answer_col: str, soft,
                  batch_size: int = 32) -> pd.DataFrame:
    if len(athletes) == 0:
        raise AttackError("no athletes to evaluate: the set is empty")
    pset = sport_prompts(list(athletes.athlete), list(athletes[answer_col]), fmt, candidates=CANDIDATES,
                         template=template)
    return candidate_scores(model, pset.prompts, candidate_token_ids(model, pset.candidates), pset.correct,
                            soft, batch_size)


def sports_p_true(model, athletes: pd.DataFrame, fmt: str = "normal", template: str | None = None,
                  answer_col: str = "sport", soft=None, batch_size: int = 32) -> dict:
    """{"p": mean normalized p of `answer_col`, "acc": argmax accuracy, "n"} in one format
    (``soft``: a soft prompt [k, d] inserted after BOS)."""
    return _summary(_sport_scores(model, athletes, fmt, template, answer_col, soft, batch_size))


def athlete_p_true(model, athletes: pd.DataFrame, fmt: str = "normal", template: str | None = None,
                   answer_col: str = "sport", soft=None) -> pd.Series:
    """Normalized p of `answer_col` per athlete (indexed by athlete name): score once, average subsets."""
    s = _sport_scores(model, athletes, fmt, template, answer_col, soft)
    return pd.Series(s.p_norm.values, index=list(athletes.athlete), name="p_true")


def split_forget(athletes: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(attack-train half, held-out half) of the forget athletes, fixed by `seed`."""
    if len(athletes) < 2:
        raise AttackError(f"need at least 2 forget athletes to hold half out, got {len(athletes)}")
    idx = np.random.default_rng(seed).permutation(len(athletes))
    half = len(athletes) // 2
    return (athletes.iloc[idx[:half]].reset_index(drop=True),
            athletes.iloc[idx[half:]].reset_index(drop=True))


# =========================================================================== relearning

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
    grad_clip: float = 1.0
    seed: int = 0

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
def lora_adapter(model, rank: int = 64, alpha: float = 32.0, layers: list[int] | None = None):
    """Add a LoRA adapter (peft) to every linear layer of the decoder; yields its parameters.

    On exit the adapter is unloaded without merging: the original modules, with their original
    weights, are back in place (tested bit for bit)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise AttackError(f"LoRA rank must be >= 1, got {rank}")
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in decoder_linear_names(model)})
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=suffixes,
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


def _answer_examples(model, prompts: list[str], answers: list[str]) -> dict:
    b = model.tokenize(prompts)
    b["answers"] = torch.tensor([model.answer_token_id(" " + a.strip()) for a in answers], device=model.hf.device)
    return b


def _logp_answers(model, b: dict, idx, start: int, prefix) -> torch.Tensor:
    """log p(answer) for rows `idx` (shared token prefix, and frozen layers below `start` when > 0)."""
    rows = (b["input_ids"][idx], b["attention_mask"][idx], b["last_index"][idx], b["answers"][idx],
            None if prefix is None else prefix[idx])
    return answer_logprobs(model, rows, start)[0]


def relearn(model, train: pd.DataFrame, heldout: pd.DataFrame, maintain: pd.DataFrame,
            general_text: list[str], config: RelearnConfig | None = None, progress: bool = True) -> RelearnResult:
    """Relearning attack on the model as it is now (an edited model). The weights come back exactly.

    Trains on the TRUE sports of `train` (+ `maintain` CE + general-text LM loss), and measures the
    normal-format forget accuracy of `heldout` (and of `train`) at ``config.eval_steps``."""
    cfg = config or RelearnConfig()
    check_budget(cfg.steps, f"relearning ({cfg.mode})")
    if cfg.mode not in ("lora", "full"):
        raise AttackError(f"relearning mode must be 'lora' or 'full', got {cfg.mode!r}")
    eval_at = cfg.checked_eval_steps()
    train = train.head(cfg.n_train) if cfg.n_train else train
    if len(train) == 0 or len(heldout) == 0:
        raise AttackError("relearning needs athletes to train on and held-out athletes to test")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    n_f = len(train)
    data = _answer_examples(model, sport_prompts(list(train.athlete), list(train.sport)).prompts
                            + sport_prompts(list(maintain.athlete), list(maintain.sport)).prompts,
                            list(train.sport) + list(maintain.sport))
    start = first_trainable_layer(decoder_parameter_names(model, cfg.layers)) if cfg.layers else 0
    prefix = prefix_hidden(model.hf, data["input_ids"], data["attention_mask"], start)
    text = general_text_batch(model, general_text, cfg.lm_batch * 4, cfg.lm_context) if cfg.lm_coef > 0 else None
    text_prefix = None if text is None else prefix_hidden(model.hf, text["input_ids"], text["attention_mask"], start)
    res = RelearnResult([], [], [], asdict(cfg))
    t0 = time.perf_counter()
    ctx = (lora_adapter(model, cfg.lora_rank, cfg.lora_alpha, cfg.layers) if cfg.mode == "lora"
           else full_finetune(model, cfg.layers))
    with ctx as params:
        res.n_trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        bar = tqdm(range(cfg.steps + 1), desc=f"relearn {cfg.mode}", disable=not progress, leave=False)
        for step in bar:
            if step in eval_at:  # both halves in one pass
                p = athlete_p_true(model, pd.concat([heldout, train], ignore_index=True)).to_numpy()
                res.steps.append(step)
                res.forget_p_true.append(float(p[:len(heldout)].mean()))
                res.train_p_true.append(float(p[len(heldout):].mean()))
            if step == cfg.steps:
                break
            f_idx = rng.choice(n_f, min(cfg.batch_size, n_f), replace=False)
            m_idx = n_f + rng.choice(len(maintain), min(cfg.maintain_batch, len(maintain)), replace=False) \
                if len(maintain) and cfg.maintain_coef > 0 else np.array([], dtype=int)
            lp = _logp_answers(model, data, torch.as_tensor(np.r_[f_idx, m_idx]), start, prefix)
            loss = forget_loss(lp[:len(f_idx)], "edit")
            if len(m_idx):
                loss = loss + cfg.maintain_coef * forget_loss(lp[len(f_idx):], "edit")
            if text is not None:
                t_idx = torch.as_tensor(rng.choice(len(text["input_ids"]), cfg.lm_batch, replace=False))
                loss = loss + cfg.lm_coef * lm_loss(model, {k: v[t_idx] for k, v in text.items()}, start,
                                                    None if text_prefix is None else text_prefix[t_idx])
            if not torch.isfinite(loss):
                raise AttackError(f"relearning loss became {loss.item()} at step {step}: lower lr ({cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            res.losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    res.seconds = time.perf_counter() - t0
    return res


# =========================================================================== soft prompt

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


def _soft_loss(model, b: dict, idx, soft) -> torch.Tensor:
    h = last_token_hidden(model, b["input_ids"][idx], b["attention_mask"][idx], b["last_index"][idx], soft=soft)
    return -torch.log_softmax(unembed(model, h).float(), -1).gather(1, b["answers"][idx][:, None]).mean()


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
    b = _answer_examples(model, sport_prompts(list(train.athlete), list(train.sport)).prompts, list(train.sport))
    weight = model.hf.get_input_embeddings().weight
    rng = np.random.default_rng(cfg.seed)
    best, t0 = None, time.perf_counter()
    restart_losses = []
    for r in range(cfg.restarts):
        g = torch.Generator().manual_seed(cfg.seed + r)
        init = torch.randint(0, weight.shape[0], (cfg.n_tokens,), generator=g)
        soft = project_norm_(weight[init.to(weight.device)].detach().clone().float(), cfg.norm_bound)
        soft.requires_grad_(True)
        opt = torch.optim.Adam([soft], lr=cfg.lr)
        losses = []
        for _ in tqdm(range(cfg.steps), desc=f"soft prompt {r + 1}/{cfg.restarts}", disable=not progress, leave=False):
            idx = torch.as_tensor(rng.choice(len(train), min(cfg.batch_size, len(train)), replace=False))
            loss = _soft_loss(model, b, idx, soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project_norm_(soft.data, cfg.norm_bound)
            losses.append(loss.item())
        with torch.no_grad():
            final = _soft_loss(model, b, torch.arange(len(train)), soft).item()
        restart_losses.append(final)
        if best is None or final < best.train_loss:
            best = SoftPrompt(soft.detach().clone(), final, [], losses, asdict(cfg))
    best.restart_losses = restart_losses
    best.seconds = time.perf_counter() - t0
    return best


# =========================================================================== alternative formats

def formats_p_true(model, athletes: pd.DataFrame, names=tuple(ALT_FORMATS)) -> dict:
    """{format: forget p_true} for the alternative formats."""
    return {name: format_p_true(model, athletes, name)["p"] for name in names}


def format_p_true(model, athletes: pd.DataFrame, name: str, answer_col: str = "sport") -> dict:
    """Forget accuracy in one of `ALT_FORMATS` (or 'normal')."""
    if name == "normal":
        return sports_p_true(model, athletes, answer_col=answer_col)
    if name not in ALT_FORMATS:
        raise AttackError(f"unknown format {name!r}; choose from {['normal', *ALT_FORMATS]}")
    return sports_p_true(model, athletes, answer_col=answer_col, **ALT_FORMATS[name])


# =========================================================================== quantization

def quantize_codes(w: torch.Tensor, bits: int, group_size: int | None = None):
    """Symmetric round-to-nearest codes of a 2-D weight, one scale per output row (per group of
    `group_size` input columns when given). Returns (codes int, scales) with
    ``w ~= codes * scales`` (scales broadcast over each row / group)."""
    if w.dim() != 2:
        raise AttackError(f"quantization expects a 2-D weight matrix, got shape {tuple(w.shape)}")
    if bits not in (2, 3, 4, 8):
        raise AttackError(f"bits must be one of 2, 3, 4, 8; got {bits}")
    qmax = 2 ** (bits - 1) - 1
    x = w.detach().float()
    if group_size:
        if x.shape[1] % group_size:
            raise AttackError(f"group_size {group_size} does not divide the {x.shape[1]} input columns")
        x = x.reshape(x.shape[0], -1, group_size)
    scales = x.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.clamp(torch.round(x / safe), -qmax, qmax)
    codes = torch.where(scales > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scales


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-trip `w` through `bits`-bit symmetric per-row (per-group) quantization."""
    codes, scales = quantize_codes(w, bits, group_size)
    return (codes.float() * scales).reshape(w.shape).to(w.dtype)


def quant_param_names(model, scope, edited_names: list[str] | None = None) -> list[str]:
    """'edited': the localization's matrices; 'all': every linear weight of the decoder layers."""
    if scope == "edited":
        if not edited_names:
            raise AttackError("scope 'edited' needs the names of the edited matrices")
        return list(edited_names)
    if scope == "all":
        return [n + ".weight" for n in decoder_linear_names(model)]
    raise AttackError(f"quantization scope must be 'edited' or 'all', got {scope!r}")


@contextlib.contextmanager
def quantized(model, param_names: list[str], bits: int, group_size: int | None = None):
    """Quantize the named weights in place for the block; the exact weights come back after."""
    saved = snapshot(model, param_names)
    named = dict(model.hf.named_parameters())
    try:
        with torch.no_grad():
            for n in param_names:
                named[n].copy_(fake_quantize(named[n], bits, group_size))
        yield model
    finally:
        restore(model, saved)


QUANT_SETTINGS = {  # name -> (bits, group_size, scope)
    "int8": (8, None, "edited"), "int4": (4, None, "edited"),
    "int8_all": (8, None, "all"), "int4_all": (4, None, "all"),
}


def parse_quant(name: str) -> tuple[int, int | None, str]:
    """'int8', 'int4', 'int8_all', 'int4_g64', 'int4_g64_all' -> (bits, group_size, scope)."""
    if name in QUANT_SETTINGS:
        return QUANT_SETTINGS[name]
    parts = name.split("_")
    try:
        bits = int(parts[0].removeprefix("int"))
        group = next((int(p[1:]) for p in parts[1:] if p.startswith("g")), None)
    except ValueError:
        raise AttackError(f"cannot read quantization setting {name!r}; use e.g. int8, int4, int8_all, int4_g64") from None
    rest = [p for p in parts[1:] if not p.startswith("g")]
    if not parts[0].startswith("int") or rest not in ([], ["all"]):
        raise AttackError(f"cannot read quantization setting {name!r}; use e.g. int8, int4, int8_all, int4_g64")
    return bits, group, "all" if rest else "edited"


def quant_attack(model, athletes: pd.DataFrame, settings: list[str], edited_names: list[str] | None) -> dict:
    """{setting: forget p_true with the weights round-tripped through that quantization}."""
    out = {}
    for name in settings:
        bits, group, scope = parse_quant(name)
        with quantized(model, quant_param_names(model, scope, edited_names), bits, group):
            out[name] = sports_p_true(model, athletes)["p"]
    return out


def edit_survival(base: dict, edited_w: dict, bits: int, group_size: int | None = None) -> dict:
    """How much of an edit survives quantization: among weights the edit changed, the fraction
    whose quantized code equals the base model's (the edit is rounded away), and the mean
    |edit| in units of the quantization step."""
    changed = same = 0
    steps = []
    for n, w0 in base.items():
        w1 = edited_w[n].detach()
        c0, s0 = quantize_codes(w0, bits, group_size)
        c1, _ = quantize_codes(w1, bits, group_size)
        diff = (w1 != w0).reshape(c0.shape)
        changed += int(diff.sum())
        same += int(((c0 == c1) & diff).sum())
        delta = (w1.float() - w0.float()).abs().reshape(c0.shape)
        steps.append(float((delta / s0.clamp_min(1e-12))[diff].mean()) if diff.any() else 0.0)
    return {"erased_frac": same / changed if changed else 1.0, "edit_in_steps": float(np.mean(steps)),
            "n_changed": changed}


# =========================================================================== other languages

def load_language_templates(path=None) -> pd.DataFrame:
    """data/multilingual_templates.csv, indexed by language code (fr, de, es)."""
    path = Path(path) if path else LANGUAGE_CSV
    if not path.exists():
        raise AttackError(f"language templates not found: {path}")
    df = pd.read_csv(path, keep_default_na=False)
    need = {"language", "template", *SPORT_COLUMNS}
    if need - set(df.columns):
        raise AttackError(f"{path} lacks column(s) {sorted(need - set(df.columns))}")
    bad = df[~df.template.str.contains("{athlete}", regex=False)]
    if len(bad):
        raise AttackError(f"{path}: template of {list(bad.language)} lacks '{{athlete}}'")
    empty = [(r.language, s) for r in df.itertuples() for s in SPORT_COLUMNS if not str(getattr(r, s)).strip()]
    if empty:
        raise AttackError(f"{path}: empty answer word(s) {empty}")
    if df.language.duplicated().any():
        raise AttackError(f"{path}: duplicate language rows {sorted(df.language[df.language.duplicated()])}")
    df["template"] = df.template.str.replace("\\n", "\n", regex=False)
    return df.set_index("language")


def language_row(templates: pd.DataFrame, language: str) -> pd.Series:
    if language not in templates.index:
        raise AttackError(f"no template for language {language!r} in {LANGUAGE_CSV.name}; "
                          f"available: {', '.join(templates.index)} (add a row to the CSV)")
    return templates.loc[language]


def answer_token_ids(model, words: list[str], multi_token: str = "first") -> list[int]:
    """The token each answer word is scored by: its only token, or (``multi_token='first'``) the
    first of several; ``'reject'`` raises on a multi-token word. First tokens must differ."""
    if multi_token not in ("first", "reject"):
        raise AttackError(f"multi_token must be 'first' or 'reject', got {multi_token!r}")
    ids = []
    for w in words:
        toks = model.tokenizer(" " + str(w).strip(), add_special_tokens=False).input_ids
        if len(toks) > 1 and multi_token == "reject":
            pieces = [model.tokenizer.decode([t]) for t in toks]
            raise AttackError(f"answer {w!r} is {len(toks)} tokens for {model.name} ({pieces}); "
                              "use multi_token='first' to score its first token, or a one-token word")
        ids.append(toks[0])
    if len(set(ids)) < len(ids):
        dup = [w for w, i in zip(words, ids) if ids.count(i) > 1]
        raise AttackError(f"answers {dup} start with the same token for {model.name}: first-token "
                          "scoring cannot tell them apart; choose other words")
    return ids


def languages_p_true(model, templates: pd.DataFrame, languages: list[str], athletes: pd.DataFrame,
                     answer_col: str = "sport") -> dict:
    """{language: forget p_true} (every language checked before any model call)."""
    for lang in languages:
        language_row(templates, lang)
    return {lang: language_p_true(model, templates, lang, athletes, answer_col)["p"] for lang in languages}


def language_p_true(model, templates: pd.DataFrame, language: str, athletes: pd.DataFrame,
                    answer_col: str = "sport", multi_token: str = "first", soft=None) -> dict:
    """Forget accuracy (normalized p of `answer_col`) with the one-shot prompt of `language`."""
    row = language_row(templates, language)
    if len(athletes) == 0:
        raise AttackError("no athletes to evaluate: the set is empty")
    ids = answer_token_ids(model, [row[s] for s in SPORT_COLUMNS], multi_token)
    prompts = [row.template.format(athlete=a) for a in athletes.athlete]
    correct = [list(SPORT_COLUMNS).index(s) for s in athletes[answer_col]]
    return _summary(candidate_scores(model, prompts, [ids] * len(prompts), correct, soft))


# =========================================================================== summary

def attack_records(results: dict, baseline: dict, prefix: str = "") -> list[dict]:
    """Rows for `recovery_table` from ``{(task, method): {attack: p_after_attack}}`` and
    ``{(task, method): p_after_edit}`` (the same athletes, the edited model without attack)."""
    return [dict(task=t, method=m, attack=prefix + a, p_attack=float(p), p_edit=float(baseline[t, m]))
            for (t, m), row in results.items() if m != "base" for a, p in row.items()]


def recovery_table(records: pd.DataFrame) -> pd.DataFrame:
    """Rows (task, method), columns attack: forget p_true after the attack minus after the edit.

    `records` columns: task, method, attack, p_attack, p_edit (both on the same athletes)."""
    r = records.assign(recovered=records.p_attack - records.p_edit)
    return r.pivot_table(index=["task", "method"], columns="attack", values="recovered", sort=False)


def attack_verdicts(records: pd.DataFrame, flu: str = "flu", rivals=("ap", "ct"), margin: float = 0.05) -> pd.DataFrame:
    """Per (task, attack): does FLU's edit hold better than the rivals' (lower forget p(true) after
    the attack, by at least `margin`)? The verdict rule of notebook 07 (`results.claim_verdict`)."""
    from mechunlearn_utils.workbook.results import claim_verdict

    rows = []
    for (task, attack), g in records.groupby(["task", "attack"], sort=False):
        values = dict(zip(g.method, g.p_attack))
        verdict, words = claim_verdict(values, flu, rivals, lower_is_better=True, margin=margin)
        others = ", ".join(f"{m} {p:.3f}" for m, p in values.items() if m not in (flu, *rivals))
        rows.append(dict(task=task, attack=attack, verdict=verdict,
                         numbers=words + (f" (also {others})" if others else "")))
    return pd.DataFrame(rows, columns=["task", "attack", "verdict", "numbers"])


def relearn_curve_frame(results: dict) -> pd.DataFrame:
    """Long table (task, method, variant, step, forget_p_true, train_p_true) from
    {(task, method, variant): RelearnResult}: the held-out half and the half relearning trained on."""
    rows = [dict(task=t, method=m, variant=v, step=s, forget_p_true=p, train_p_true=q)
            for (t, m, v), r in results.items() for s, p, q in zip(r.steps, r.forget_p_true, r.train_p_true)]
    return pd.DataFrame(rows)


def control_check(curves: pd.DataFrame, control: str = "extraction", variant: str = "relearn_lora",
                  min_gain: float = 0.2) -> dict:
    """Positive control of the relearning attack, per task: does the control localization's edit
    (an extraction-stage edit, which the paper's account predicts is shallow) come back on the
    held-out half? ``{task: {"start", "end", "gain", "attack_has_power", "line"}}``. When no edit,
    the control included, regains `min_gain`, the attack may be too weak to tell localizations apart.
    Tasks without the control give ``attack_has_power=None``."""
    out = {}
    for task, g in curves[curves.variant == variant].groupby("task", sort=False):
        c = g[g.method == control].sort_values("step")
        if c.empty:
            out[task] = dict(start=None, end=None, gain=None, attack_has_power=None,
                             line=f"{task}: no {control!r} edit, so the attack has no positive control here")
            continue
        start, end = float(c.forget_p_true.iloc[0]), float(c.forget_p_true.iloc[-1])
        gain = end - start
        best = g.groupby("method").apply(lambda d: d.sort_values("step").forget_p_true.iloc[-1]
                                         - d.sort_values("step").forget_p_true.iloc[0], include_groups=False)
        power = bool(best.max() >= min_gain)
        line = (f"{task}: the control ({control}) goes from {start:.3f} to {end:.3f} held-out p(true) "
                f"({gain:+.3f}); largest regain of any edit {best.max():+.3f} ({best.idxmax()}). ")
        line += ("The attack can bring an edit back, so a low curve means the edit resisted it."
                 if power else f"No edit regains {min_gain}: the attack may be too weak here to tell the "
                 "localizations apart, so read the relearning rows with that caveat.")
        out[task] = dict(start=start, end=end, gain=gain, attack_has_power=power, line=line)
    return out


def plot_relearn_curves(curves: pd.DataFrame, title: str = ""):
    """One panel per relearning variant: forget p_true against step, a line per method; solid the
    held-out half, dashed the half relearning trained on."""
    import seaborn as sns

    long = curves.melt(id_vars=["task", "method", "variant", "step"], value_vars=["forget_p_true", "train_p_true"],
                       var_name="half", value_name="p_true")
    long["half"] = long.half.map({"forget_p_true": "held-out", "train_p_true": "trained on"})
    grid = sns.relplot(long, x="step", y="p_true", hue="method", style="half", col="variant", row="task",
                       kind="line", marker="o", height=3, facet_kws=dict(sharex=False))
    grid.set(ylim=(0, 1), ylabel="forget p(true)")
    grid.set_titles("{row_name}: {col_name}")
    grid.figure.suptitle(title, y=1.04)
    return grid.figure


def plot_recovery(table: pd.DataFrame, title: str = ""):
    """Heatmap of recovered forget p_true (method x attack)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * table.shape[1], 0.6 + 0.45 * table.shape[0]))
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in table.index]
    sns.heatmap(table.set_axis(labels), annot=True, fmt=".2f", cmap="RdBu_r", center=0, vmin=-1, vmax=1, ax=ax)
    ax.set(title=title or "forget p(true) recovered by each attack", xlabel="attack", ylabel="")
    return fig
