"""Notebook 06: how few weights does an edit need? Learned weight masks, binarized at N weights.

Each weight W of a localization gets a mask value m in [0, 1]; the model runs with m * W (so a
weight can only move between 0 and its original value, as in the paper). The masks train with the
editing loss of `edit` (forget CE to the injected answer or log(1 - p), maintain CE, general-text
LM loss) plus ``l1_coef x sum(1 - m)``: each weight pays for being changed. Then the mask is
**binarized**: the N most-changed weights (smallest m) are set to zero, every other weight keeps
its original value, and the edit is evaluated for a sweep of N.

The masks are `torch.nn.utils.parametrize` parametrizations on the HF modules: the stored weights
are never written, and `masked` removes the parametrizations on exit, leaving the original
parameter objects (bit-identical) in place.

* `masked(model, masks)`     context manager running the model with m * W on the named weights
* `MaskConfig`, `train_mask` learn a continuous mask (SGD or Adam, projected onto [0, 1])
* `top_changed`, `binary_masks`  the N most-changed weights as 0/1 masks
* `sweep_n`, `smallest_n`    evaluate the binarized edit for every N; the smallest N that forgets
* `plot_mask_sweep`, `mask_widget`  the figure and the explore-by-N widget
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from mechunlearn_utils.core.paths import STEMS
from mechunlearn_utils.edit.loop import EditError, edit_terms, train_loop
from mechunlearn_utils.edit.train import edit_data

STEM = STEMS["masking"]
DEFAULT_N_GRID = (10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)


class MaskError(ValueError):
    """A mask cannot be trained or applied as asked; the message says why."""


# --------------------------------------------------------------------------- applying masks

class _Mask(torch.nn.Module):
    """Parametrization W -> clamp(mask, 0, 1) * W (the mask is a parameter or a fixed buffer)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        if isinstance(mask, torch.nn.Parameter):
            self.mask = mask
        else:
            self.register_buffer("mask", mask)

    def forward(self, weight):
        return self.mask.clamp(0.0, 1.0) * weight


def owners(model, names: list[str]) -> dict[str, tuple[torch.nn.Module, str]]:
    """{HF parameter name: (module holding it, attribute)}; clear errors for unknown or empty lists."""
    from mechunlearn_utils.localize import canonical_name

    if not names:
        raise MaskError("the localization names no parameters: nothing to mask")
    found = {}
    for mod_name, mod in model.hf.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            full = canonical_name(f"{mod_name}.{attr}" if mod_name else attr)
            if full in names and full not in found:
                found[full] = (mod, attr)
    missing = [n for n in names if n not in found]
    if missing:
        raise MaskError(f"{len(missing)} parameter(s) not in {model.name} (or already masked), e.g. "
                        f"{missing[:2]}: was this localization made for another model?")
    return found


@contextlib.contextmanager
def masked(model, masks: dict[str, torch.Tensor]):
    """Run `model` with weight m * W for every named weight, inside the block only.

    `masks[name]` has the weight's shape (a `torch.nn.Parameter` to train it, or a fixed tensor).
    On exit the parametrizations are removed and the original parameter objects put back unchanged.
    """
    where = owners(model, list(masks))
    done = []
    try:
        for name, mask in masks.items():
            mod, attr = where[name]
            w = getattr(mod, attr)
            if mask.shape != w.shape:
                raise MaskError(f"mask for {name} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
            parametrize.register_parametrization(mod, attr, _Mask(mask.to(w.device, w.dtype)
                                                                   if not isinstance(mask, torch.nn.Parameter)
                                                                   else mask), unsafe=True)
            done.append((mod, attr))
        yield model
    finally:
        for mod, attr in reversed(done):
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)


# --------------------------------------------------------------------------- training

@dataclass
class MaskConfig:
    steps: int = 50
    lr: float = 0.05
    optimizer: str = "adam"  # "adam" or "sgd"
    l1_coef: float = 1e-6  # penalty per unit of (1 - m), summed over weights
    forget_coef: float = 1.0
    maintain_coef: float = 1.0
    lm_coef: float = 1.0
    batch_size: int = 16
    lm_batch: int = 2
    lm_context: int = 64
    frozen_prefix: bool = True
    seed: int = 0


@dataclass
class MaskResult:
    param_names: list[str]
    config: dict
    scores: dict  # {name: 1 - m}, the change of each weight (0 = untouched, 1 = zeroed)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    n_weights: int = 0

    @property
    def n_changed(self) -> int:
        """Weights the continuous mask moved at all (m < 1)."""
        return int(sum((s > 0).sum().item() for s in self.scores.values()))


def train_mask(model, param_names: list[str], task, general_text: list[str], config: MaskConfig | None = None,
               progress: bool = True) -> MaskResult:
    """Learn a [0, 1] mask over `param_names` with the editing loss + L1 on (1 - m). Weights untouched."""
    cfg = config or MaskConfig()
    if cfg.steps < 1:
        raise MaskError("steps must be at least 1")
    if cfg.optimizer not in ("adam", "sgd"):
        raise MaskError(f"unknown optimizer {cfg.optimizer!r}; choose 'adam' or 'sgd'")
    where = owners(model, list(param_names))
    thetas = {n: torch.nn.Parameter(torch.ones_like(getattr(m, a))) for n, (m, a) in where.items()}
    data = edit_data(model, param_names, task, general_text, cfg)
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)(list(thetas.values()), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    n_weights = sum(t.numel() for t in thetas.values())
    result = MaskResult(list(param_names), asdict(cfg), {}, n_weights=n_weights)

    def loss_fn(step):
        loss, terms = edit_terms(model, data, rng, task.mode, cfg)
        l1 = sum((1 - t.clamp(0, 1)).sum() for t in thetas.values())
        return loss + cfg.l1_coef * l1, {**terms, "changed": l1}

    @torch.no_grad()
    def project():
        for t in thetas.values():
            t.clamp_(0.0, 1.0)  # projected: the mask stays in [0, 1]

    def diverged(step, value):
        return EditError(f"mask loss became {value} at step {step}: lower the learning rate")

    t0 = time.perf_counter()
    with masked(model, thetas):
        result.history = train_loop(list(thetas.values()), loss_fn, opt, cfg.steps, on_nonfinite=diverged,
                                    after_step=project, desc=f"mask ({task.name})", progress=progress)
    result.scores = {n: (1 - t.detach()).clamp(0, 1) for n, t in thetas.items()}
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- binarizing

def top_changed(scores: dict[str, torch.Tensor], n_max: int) -> list[tuple[str, torch.Tensor]]:
    """The `n_max` most-changed weights, most changed first: [(name, flat index)] in rank order
    (only weights that changed at all; fewer when fewer changed)."""
    if n_max < 1:
        raise MaskError(f"the number of masked weights must be positive, got {n_max} (N = 0 is the base model)")
    if not scores:
        raise MaskError("no mask scores: the localization is empty")
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float() for n in names])
    k = min(n_max, int((flat > 0).sum()))
    if k == 0:
        raise MaskError("the trained mask changed no weight: raise the learning rate or lower l1_coef")
    vals, idx = torch.topk(flat, k)
    bounds = np.cumsum([0] + [scores[n].numel() for n in names])
    which = np.searchsorted(bounds, idx.numpy(), side="right") - 1
    return [(names[w], int(i - bounds[w])) for w, i in zip(which, idx.numpy())]


def binary_masks(scores: dict[str, torch.Tensor], ranked: list[tuple[str, int]], n: int) -> dict[str, torch.Tensor]:
    """0/1 masks zeroing the first `n` weights of `ranked` (from `top_changed`); only masked
    matrices appear."""
    if n < 1:
        raise MaskError(f"the number of masked weights must be positive, got {n} (N = 0 is the base model)")
    if n > len(ranked):
        raise MaskError(f"asked to mask {n} weights but only {len(ranked)} changed")
    out: dict[str, torch.Tensor] = {}
    for name, i in ranked[:n]:
        if name not in out:
            out[name] = torch.ones_like(scores[name]).flatten()
        out[name][i] = 0.0
    return {k: v.view_as(scores[k]) for k, v in out.items()}


@torch.no_grad()
def edit_measures(model, task, formats=("normal", "question"), maintain_formats=("normal",),
                  batch_size: int = 32) -> dict:
    """The sports measures of `evaluate_task` the sweep needs (a view of the suite's
    `sports_measure`, one forward per prompt set): ``forget.<fmt>.p_true`` and ``.p_target`` (the
    same prompts scored for both answers) for every format, ``maintain.<fmt>.p_true`` for
    `maintain_formats`. The same numbers as `evaluate_task`."""
    from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES, sports_measure

    if task.kind != "sports":
        raise MaskError(f"weight masking is set up for the sports tasks, not {task.name!r} ({task.kind})")
    out = {}
    edit = task.mode == "edit" and "target" in task.eval_forget
    for fmt in formats:
        r = sports_measure(model, task.eval_forget, ["sport", "target"] if edit else ["sport"], fmt,
                           EDIT_CANDIDATES, batch_size)
        out[f"forget.{fmt}.p_true"] = r["sport"]["p"]
        if edit:
            out[f"forget.{fmt}.p_target"] = r["target"]["p"]
    for fmt in maintain_formats:
        out[f"maintain.{fmt}.p_true"] = sports_measure(model, task.eval_maintain, "sport", fmt, EDIT_CANDIDATES,
                                                       batch_size)["p"]
    return out


def mask_eval(model, task, masks: dict[str, torch.Tensor], formats=("normal", "question")) -> dict:
    """`edit_measures` of the model with the given masks applied (removed after)."""
    with masked(model, masks):
        return edit_measures(model, task, formats)


def sweep_n(model, task, result: MaskResult, n_grid=DEFAULT_N_GRID, formats=("normal", "question"),
            progress: bool = True) -> pd.DataFrame:
    """Evaluate the binarized mask at every N of `n_grid` below min(max(n_grid), number of weights the
    mask changed), plus that minimum itself (the largest binarized edit). One row per N."""
    n_grid = sorted({int(n) for n in n_grid})
    if not n_grid or n_grid[0] < 1:
        raise MaskError(f"N values must be positive, got {n_grid} (N = 0 is the base model)")
    ranked = top_changed(result.scores, max(n_grid[-1], 1))
    ns = [n for n in n_grid if n < len(ranked)] + [len(ranked)]
    rows = []
    for n in tqdm(ns, desc="N sweep", disable=not progress, leave=False):
        rows.append(dict(N=n, **mask_eval(model, task, binary_masks(result.scores, ranked, n), formats)))
    return pd.DataFrame(rows)


def smallest_n(curve: pd.DataFrame, column: str = "forget.normal.p_true", threshold: float = 0.5) -> int | None:
    """The smallest N whose `column` is below `threshold` (None when no N reaches it)."""
    hit = curve[curve[column] < threshold]
    return None if hit.empty else int(hit.N.min())


# --------------------------------------------------------------------------- figures and widget

def plot_mask_sweep(curves: pd.DataFrame, base: dict, gen_fmt: str, threshold: float = 0.5, title: str = ""):
    """Forget (training format), maintain, and forget in `gen_fmt` against N, one line per localization."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    panels = [("forget.normal.p_true", "forget p(true), training format"),
              ("maintain.normal.p_true", "maintain p(true), training format"),
              (f"forget.{gen_fmt}.p_true", f"forget p(true), {gen_fmt} format")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), sharex=True)
    for ax, (col, label) in zip(axes, panels):
        sns.lineplot(curves, x="N", y=col, hue="method", marker="o", ax=ax, legend=ax is axes[-1])
        if col in base:
            ax.axhline(base[col], ls="--", c="gray", lw=1)
        ax.set(xscale="log", ylim=(-0.03, 1.03), ylabel=label, xlabel="N masked weights (log)")
    axes[0].axhline(threshold, ls=":", c="red", lw=1)
    if axes[-1].get_legend():
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def mask_widget(model, task, results: dict, formats=("normal", "question")):
    """Pick a localization and N; evaluate the binarized mask (the base weights are restored). It
    opens showing the result of the first localization at the default N. The result is an HTML
    widget's value, not an Output widget's capture (nbclient's Output handling can stall papermill)."""
    import html

    import ipywidgets as w

    method = w.Dropdown(options=list(results), description="localization")
    n = w.IntText(value=1000, description="N weights")
    button, out = w.Button(description="evaluate"), w.HTML()

    def run(_):
        try:
            r = results[method.value]
            ranked = top_changed(r.scores, n.value)
            note = (f"<p>N={n.value} asked: only {len(ranked)} weights changed, all of them zeroed</p>"
                    if len(ranked) < n.value else "")
            masks = binary_masks(r.scores, ranked, len(ranked))
            table = pd.Series(mask_eval(model, task, masks, formats)).round(3).to_frame(f"N={len(ranked)}")
            out.value = f"<b>{html.escape(method.value)}</b>{note}{table.to_html()}"
        except MaskError as err:
            out.value = f"<pre>{html.escape(str(err))}</pre>"

    button.on_click(run)
    run(None)  # the default's result, shown before any click
    return w.VBox([w.HBox([method, n, button]), out])
