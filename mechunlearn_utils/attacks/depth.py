"""Depth sweep: edit a sliding window of k consecutive MLP layers and measure what depth decides.

Beyond the paper (compare *Layer-Targeted Multilingual Knowledge Erasure*, which localizes erasure
by layer). The paper compares localizations that differ in many ways at once (which layers, which
matrices, how many weights). Here only **depth** varies: every window trains all MLP matrices of
k consecutive decoder layers (gate, up, down), so windows are parameter-matched by construction.
For each window:

1. **Learning rate per window**, as the paper chooses one per method (`select_lr`): the smallest
   rate on the grid whose edit *takes* on the training split (training-format forget p(true) at
   most ``forget_target``). Rates are tried in ascending order from the base weights and the
   search stops at the first that takes (that trial *is* the window's edit: same config, same
   steps). When none takes, the trial that forgot most is kept and the window is marked
   ``took=False``. `edit.sweep` is not used: it trains every rate and ranks by maintain, which
   is the notebook-03 rule, not "smallest that takes".
2. **Measures** (`measure_edit`): forget p(true) in the training format (and p(injected
   answer)), in formats no edit trained on (question, `prompts.SPORT_PARAPHRASE_TEMPLATES`),
   in French / German / Spanish (`attacks.language_p_true`), maintain p(true), and the change of
   general-text LM loss.
3. **Relearning** (`attacks.relearn`, LoRA as notebook 05 runs it): train on the true sports of
   one half of the forgotten athletes, score the other half (held-out) and the trained half.
4. **Restore**: the window's base weights are put back and checked bit for bit
   (`reproducibility.assert_weights_restored`: digests before and after) before the next window
   (`WeightsChangedError` otherwise).

Everything is a pure function of the model and its inputs; `plot_depth_sweep` draws the curves
and `reading_guide` turns a run's numbers into sentences.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mechunlearn_utils import attacks as A  # the package: relearning, formats, languages
from mechunlearn_utils.core.paths import STEMS
from mechunlearn_utils.core.reproducibility import assert_weights_restored, weight_digests
from mechunlearn_utils.edit.loop import EditError
from mechunlearn_utils.edit.storage import restore, select_parameters, snapshot
from mechunlearn_utils.edit.train import EditConfig, train_edit, train_split_measures
from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES, lm_loss_on_text, sports_measure
from mechunlearn_utils.evaluate.verdicts import bootstrap_ci, diff_ci, interval_text

STEM = STEMS["depth"]
LOCALIZATION_STEM = STEMS["localization"]
_MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)\.weight$")

# Measures of one window (metrics `window.<start>.<measure>`), lower = forgotten for forget_*.
FORMAT_MEASURES = ("forget_question", "forget_para1", "forget_para2", "forget_para3")


class DepthError(RuntimeError):
    """The sweep cannot run as asked (bad window, no language templates); says why."""


# --------------------------------------------------------------------------- windows

def window_starts(n_layers: int, k: int, stride: int, include_last: bool = True) -> list[int]:
    """First layers of the windows: 0, stride, 2*stride, ... (and the deepest window n_layers - k
    when `include_last`, so the sweep always reaches the last layer)."""
    if k < 1 or k > n_layers:
        raise DepthError(f"window size k={k} must lie in 1..{n_layers} (the model's layers)")
    if stride < 1:
        raise DepthError(f"stride must be at least 1, got {stride}")
    starts = list(range(0, n_layers - k + 1, stride))
    if include_last and starts[-1] != n_layers - k:
        starts.append(n_layers - k)
    return starts


def window_params(model, start: int, k: int) -> list[str]:
    """Names of every MLP weight matrix of layers start..start+k-1 (HF names, layer order)."""
    if start < 0 or start + k > model.n_layers or k < 1:
        raise DepthError(f"window {start}..{start + k - 1} lies outside the model's layers 0..{model.n_layers - 1}")
    layers = set(range(start, start + k))
    names = [n for n, p in model.named_parameters().items()
             if (m := _MLP_RE.match(n)) and int(m.group(1)) in layers and p.dim() == 2]
    found = {int(_MLP_RE.match(n).group(1)) for n in names}
    if found != layers:
        raise DepthError(f"no MLP matrices found in layer(s) {sorted(layers - found)} of {model.name}")
    return sorted(names, key=lambda n: (int(_MLP_RE.match(n).group(1)), n))


def n_weights(model, names: list[str]) -> int:
    return sum(p.numel() for p in select_parameters(model, names).values())


def window_label(start: int, k: int) -> str:
    return f"MLP {start}" if k == 1 else f"MLPs {start}-{start + k - 1}"


# --------------------------------------------------------------------------- learning rate

def choose_lr(rows: list[dict], forget_target: float) -> dict:
    """The paper's rule on trial rows ({"lr", "forget_p_true", ...}): the smallest lr whose edit took
    (forget_p_true <= forget_target); if none took, the trial that forgot most. Adds "took"."""
    if not rows:
        raise DepthError("no learning-rate trial to choose from")
    took = [r for r in rows if r["forget_p_true"] <= forget_target]
    best = min(took, key=lambda r: r["lr"]) if took else min(rows, key=lambda r: (r["forget_p_true"], r["lr"]))
    return {**best, "took": bool(took)}


def select_lr(model, names: list[str], task, general_text: list[str], lrs, config: EditConfig,
              forget_target: float, progress: bool = False) -> tuple[dict, list[dict]]:
    """Train `names` at each lr of `lrs` (ascending) from the base weights until an edit takes.

    Leaves the chosen trial's edit on the model (the caller restores the base). Returns the chosen
    row (`choose_lr`) and every trial row (lr, forget_p_true, maintain_p_true, seconds[, error])."""
    base = snapshot(model, names)
    rows, kept = [], {}
    for lr in sorted(lrs):
        restore(model, base)
        cfg = EditConfig(**{**asdict(config), "lr": lr})
        t0 = time.perf_counter()
        try:
            train_edit(model, names, task, general_text, cfg, progress=progress)
            row = dict(lr=lr, **train_split_measures(model, task))
        except EditError as err:
            row = dict(lr=lr, forget_p_true=1.0, maintain_p_true=0.0, error=str(err))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if row["forget_p_true"] <= forget_target:
            break  # the smallest lr that takes: its edit is on the model now
        best = choose_lr(rows, forget_target)
        if best["lr"] == lr:  # keep the best failed trial's weights in case none takes
            kept = snapshot(model, names)
    chosen = choose_lr(rows, forget_target)
    if not chosen["took"] and chosen["lr"] != rows[-1]["lr"]:
        restore(model, kept)
    return chosen, rows


# --------------------------------------------------------------------------- measures

@dataclass
class DepthConfig:
    """Settings of the sweep (the notebook's parameters cell fills these)."""

    k: int = 4
    lrs: tuple = (1e-5, 3e-5, 1e-4, 3e-4)  # the paper's grid is 1e-5..1e-4; 3e-4 is our extension
    forget_target: float = 0.1
    edit: EditConfig = field(default_factory=lambda: EditConfig(steps=20, batch_size=16, lm_batch=2))
    formats: tuple = ("question", "para1", "para2", "para3")
    languages: tuple = ("fr", "de", "es")
    relearn: A.RelearnConfig | None = field(default_factory=lambda: A.RelearnConfig(mode="lora", steps=20))
    seed: int = 0


def measure_edit(model, task, heldout_text: list[str], base_lm_loss: float | None, templates: pd.DataFrame | None,
                 cfg: DepthConfig) -> dict:
    """Every measure of the model as it is now (edited or not) on the task's forget / maintain sets."""
    f = sports_measure(model, task.eval_forget, ["sport", "target"], "normal", EDIT_CANDIDATES)
    out = {"forget_normal": f["sport"]["p"], "target_normal": f["target"]["p"],
           "maintain": sports_measure(model, task.eval_maintain, "sport", "normal", EDIT_CANDIDATES)["p"]}
    per = {name: A.format_athlete_p_true(model, task.eval_forget, name) for name in cfg.formats}
    out.update({f"forget_{k}": float(v.mean()) for k, v in per.items()})
    if per:  # each athlete's mean over the unseen formats: the contrast's interval resamples athletes
        out["forget_unseen_each"] = np.mean([v.to_numpy() for v in per.values()], axis=0).tolist()
    if cfg.languages:
        if templates is None:
            raise DepthError("languages asked for but no language templates given (attacks.load_language_templates)")
        out.update({f"forget_{k}": v for k, v in
                    A.languages_p_true(model, templates, list(cfg.languages), task.eval_forget).items()})
    if heldout_text:
        loss = lm_loss_on_text(model, heldout_text)
        out["lm_loss"] = loss
        if base_lm_loss is not None:
            out["lm_loss_delta"] = loss - base_lm_loss
    return out


def relearn_measures(model, task, general_text: list[str], cfg: DepthConfig) -> dict:
    """LoRA relearning on one half of the forget athletes (notebook 05's attack): the held-out and
    the trained half's forget p(true) before (`_before`) and after relearning."""
    train, heldout = A.split_forget(task.eval_forget, cfg.seed)
    r = A.relearn(model, train, heldout, task.train_maintain, general_text, cfg.relearn, progress=False)
    return {"relearn_heldout": r.forget_p_true[-1], "relearn_train": r.train_p_true[-1],
            "relearn_heldout_before": r.forget_p_true[0], "relearn_train_before": r.train_p_true[0],
            "relearn_heldout_by_step": list(r.forget_p_true), "relearn_steps": list(r.steps),
            "relearn_heldout_each": list(r.heldout_by_athlete[-1]),
            "relearn_seconds": r.seconds}


def run_window(model, start: int, task, general_text: list[str], heldout_text: list[str], base_lm_loss: float | None,
               templates: pd.DataFrame | None, cfg: DepthConfig, progress: bool = False) -> dict:
    """Edit one window at its own lr, measure it, relearn, restore the base (checked bitwise)."""
    names = window_params(model, start, cfg.k)
    digests = weight_digests(model, names)
    base = snapshot(model, names)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        chosen, trials = select_lr(model, names, task, general_text, cfg.lrs, cfg.edit, cfg.forget_target, progress)
        t_edit = time.perf_counter() - t0
        row = measure_edit(model, task, heldout_text, base_lm_loss, templates, cfg)
        if cfg.relearn is not None:
            row.update(relearn_measures(model, task, general_text, cfg))
    finally:
        restore(model, base)
    assert_weights_restored(model, digests, f"window {window_label(start, cfg.k)}")
    row.update(start=start, end=start + cfg.k - 1, centre=start + (cfg.k - 1) / 2, lr=chosen["lr"], took=chosen["took"],
               train_forget=chosen["forget_p_true"], train_maintain=chosen["maintain_p_true"],
               n_params=n_weights(model, names), n_trials=len(trials), trial_lrs=[r["lr"] for r in trials],
               trial_forget=[r["forget_p_true"] for r in trials], seconds_edit=t_edit,
               seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
    return row


def base_measures(model, task, heldout_text, templates, cfg: DepthConfig) -> dict:
    """The unedited model's measures (relearning replaced by the halves' p(true) without attack)."""
    row = {k: v for k, v in measure_edit(model, task, heldout_text, None, templates, cfg).items()
           if not k.endswith("_each")}
    row["lm_loss_delta"] = 0.0
    train, heldout = A.split_forget(task.eval_forget, cfg.seed)
    p = A.athlete_p_true(model, pd.concat([heldout, train], ignore_index=True)).to_numpy()
    row["relearn_heldout"], row["relearn_train"] = float(p[:len(heldout)].mean()), float(p[len(heldout):].mean())
    return row


def sweep_windows(model, starts: list[int], task, general_text, heldout_text, base_lm_loss, templates,
                  cfg: DepthConfig, progress: bool = True) -> pd.DataFrame:
    """`run_window` for every start; one row per window, indexed by its first layer."""
    rows = []
    bar = tqdm(starts, desc="windows", disable=not progress)
    for s in bar:
        bar.set_postfix(window=window_label(s, cfg.k))
        rows.append(run_window(model, s, task, general_text, heldout_text, base_lm_loss, templates, cfg))
    return pd.DataFrame(rows).set_index("start", drop=False)


# --------------------------------------------------------------------------- where the stages sit

def saturation_layer(acc: list[float], frac: float = 0.95) -> int:
    """First layer whose probe accuracy reaches `frac` of the way from the first layer's to the best."""
    a = np.asarray(acc, dtype=float)
    if a.size == 0:
        raise DepthError("empty probe curve")
    level = a[0] + frac * (a.max() - a[0])
    return int(np.argmax(a >= level - 1e-12))


def depth_marks(loc_metrics: dict | None) -> tuple[dict, list[str]]:
    """Where the name-only probe saturates and where the extraction heads start, from notebook 02's
    metrics (`sports.probe.saturation_layer`, `sports.extraction_heads.min_layer`), with fallbacks.

    Returns ({"probe_saturation_layer": int | None, "extraction_min_layer": int | None,
    "probe_source": str, "extraction_source": str}, notes for the reader)."""
    m = loc_metrics or {}
    marks, notes = {}, []
    run = f"`python -m mechunlearn_utils.workbook.runner --only {LOCALIZATION_STEM}` (same RESULTS_DIR)"
    if "sports.probe.saturation_layer" in m:
        marks.update(probe_saturation_layer=int(m["sports.probe.saturation_layer"]),
                     probe_source="sports.probe.saturation_layer")
    elif m.get("sports.probe.name_only"):
        marks.update(probe_saturation_layer=saturation_layer(m["sports.probe.name_only"]),
                     probe_source="fallback: 95% of the name-only probe curve")
        notes.append("sports.probe.saturation_layer is missing from 02's metrics: computed from "
                     f"sports.probe.name_only instead; rerun {run} for the notebook's own rule")
    else:
        marks.update(probe_saturation_layer=None, probe_source="missing")
        notes.append(f"no probe results from notebook 02: run {run}")
    if "sports.extraction_heads.min_layer" in m:
        marks.update(extraction_min_layer=int(m["sports.extraction_heads.min_layer"]),
                     extraction_source="sports.extraction_heads.min_layer")
    elif m.get("sports.flu.extraction_heads"):
        heads = m["sports.flu.extraction_heads"]
        layers = [int(str(h).split(".")[0]) for h in (heads if isinstance(heads, list) else [heads])]
        marks.update(extraction_min_layer=min(layers), extraction_source="fallback: sports.flu.extraction_heads")
        notes.append(f"sports.extraction_heads.min_layer is missing: using the lowest layer of "
                     f"sports.flu.extraction_heads ({heads}); rerun {run}")
    else:
        marks.update(extraction_min_layer=None, extraction_source="missing")
        notes.append(f"no extraction heads from notebook 02: run {run}")
    return marks, notes


def stage_of(start: int, k: int, marks: dict) -> str:
    """'lookup' (the window ends at or before the probe saturates), 'extraction' (it starts at or
    after the first extraction-head layer), else 'between'."""
    sat, ext = marks.get("probe_saturation_layer"), marks.get("extraction_min_layer")
    if sat is not None and start + k - 1 <= sat:
        return "lookup"
    if ext is not None and start >= ext:
        return "extraction"
    return "between"


# --------------------------------------------------------------------------- figure and reading

def unseen_columns(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(English formats the edit never saw, languages) present in `frame`."""
    fmts = [c for c in frame.columns if c in FORMAT_MEASURES]
    langs = [c for c in frame.columns if c.startswith("forget_") and c not in FORMAT_MEASURES
             and c != "forget_normal" and not c.startswith("forget_mcq") and not c.endswith("_each")]
    return fmts, langs


def plot_depth_sweep(frame: pd.DataFrame, base: dict, marks: dict, k: int, title: str = ""):
    """Four panels against the window's centre layer: English formats, languages, relearning,
    side effects (maintain; LM loss change on a twin axis); dotted verticals at the probe saturation
    and the first extraction-head layer. Hollow markers: windows whose edit did not take at any lr.
    A shaded band: the 95% bootstrap interval over the athletes, where the window kept per-athlete
    values (held-out after relearning)."""
    import matplotlib.pyplot as plt

    fmts, langs = unseen_columns(frame)
    panels = [("training format and unseen English formats", ["forget_normal", *fmts], "forget p(true)"),
              ("other languages (English-only edit)", ["forget_normal", *langs], "forget p(true)"),
              ("relearning (LoRA) on half the athletes", ["relearn_heldout", "relearn_train"],
               "p(true) after relearning"),
              ("side effects", ["maintain"], "maintain p(true)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    x = frame.centre.to_numpy()
    took = frame.took.to_numpy(bool)

    def curve(ax, c, color=None):
        line, = ax.plot(x, frame[c], "-", label=c.replace("forget_", ""), color=color)
        ax.plot(x[took], frame[c][took], "o", color=line.get_color())
        ax.plot(x[~took], frame[c][~took], "o", mfc="white", color=line.get_color())
        if f"{c}_each" in frame:  # 95% bootstrap interval over the athletes of each window's mean
            cis = np.array([bootstrap_ci(v) if isinstance(v, list) and v else (np.nan, np.nan)
                            for v in frame[f"{c}_each"]])
            ax.fill_between(x, cis[:, 0], cis[:, 1], color=line.get_color(), alpha=0.15, lw=0)
        if c in base:
            ax.axhline(base[c], color=line.get_color(), lw=0.8, ls="--", alpha=0.6)
        return line

    for ax, (name, cols, ylabel) in zip(axes.flat, panels):
        for c in [c for c in cols if c in frame]:
            curve(ax, c)
        for key, style, lab in (("probe_saturation_layer", ":", "name-only probe saturates"),
                                ("extraction_min_layer", "-.", "first extraction-head layer")):
            if marks.get(key) is not None:
                ax.axvline(marks[key], color="grey", ls=style, label=lab)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    if "lm_loss_delta" in frame:  # its own scale, on the right of the side-effects panel
        twin = axes[1, 1].twinx()
        curve(twin, "lm_loss_delta", color="tab:red").set_label("LM loss change (right)")
        twin.axhline(0, color="tab:red", lw=0.8, ls="--", alpha=0.6)
        twin.set_ylabel("general-text LM loss change (nats)")
        twin.legend(fontsize=7, loc="upper right")
    for ax in axes[1]:
        ax.set_xticks(x, [f"{s}-{s + k - 1}\nlr {lr:.0e}" for s, lr in zip(frame.start, frame.lr)], fontsize=7)
        ax.set_xlabel(f"window of {k} MLP layers (centre); dashed: unedited model")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def stage_summary(frame: pd.DataFrame, marks: dict, k: int, measures: list[str]) -> dict:
    """{f"{stage}.{measure}": mean over the windows of that stage} for stages lookup / extraction."""
    stages = frame.start.map(lambda s: stage_of(int(s), k, marks))
    out = {}
    for stage in ("lookup", "extraction"):
        sel = frame[stages == stage]
        out[f"{stage}.n_windows"] = int(len(sel))
        for c in measures:
            if len(sel) and c in sel:
                out[f"{stage}.{c}"] = float(sel[c].mean())
    return out


# Per-athlete measures of each window, and the stage-mean column each one explains.
EACH_OF = {"unseen_mean": "forget_unseen_each", "relearn_heldout": "relearn_heldout_each"}


def stage_contrast_ci(frame: pd.DataFrame, marks: dict, k: int, each_col: str, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float] | None:
    """The lookup-vs-extraction contrast with its uncertainty: per athlete, the mean of `each_col` (a
    per-athlete list per window) over the extraction windows minus over the lookup windows; the paired
    bootstrap interval of its mean over the athletes (`evaluate.verdicts.diff_ci`). > 0: lookup edits
    leave less of the old answer (the paper's side). None without windows in both stages."""
    if each_col not in frame:
        return None
    stages = frame.start.map(lambda s: stage_of(int(s), k, marks))
    look, ext = frame[stages == "lookup"][each_col].dropna(), frame[stages == "extraction"][each_col].dropna()
    if not len(look) or not len(ext):
        return None
    return diff_ci(np.mean(np.stack(ext.tolist()), 0), np.mean(np.stack(look.tolist()), 0), seed=seed, level=level)


def contrast_metrics(frame: pd.DataFrame, marks: dict, k: int) -> dict:
    """`contrast.<measure>.ci_low` / `.ci_high` for each measure with per-athlete values (`EACH_OF`)."""
    out = {}
    for measure, col in EACH_OF.items():
        ci = stage_contrast_ci(frame, marks, k, col)
        if ci is not None:
            out[f"contrast.{measure}.ci_low"], out[f"contrast.{measure}.ci_high"] = ci
    return out


def reading_guide(frame: pd.DataFrame, base: dict, marks: dict, k: int) -> list[str]:
    """Sentences computed from the run: which windows took, where each measure is lowest and
    highest, and the lookup-vs-extraction contrast (when 02's marks are known)."""
    fmts, langs = unseen_columns(frame)
    frame = frame.assign(unseen_mean=frame[fmts].mean(axis=1) if fmts else np.nan,
                         language_mean=frame[langs].mean(axis=1) if langs else np.nan)
    lab = lambda s: window_label(int(s), k)  # noqa: E731
    took = frame[frame.took]
    lines = [f"The edit took (training-format forget <= target) in {len(took)} of {len(frame)} windows; "
             "chosen lr per window: " + ", ".join(f"{lab(s)} {lr:.0e}{'' if t else ' (never took)'}"
                                                 for s, lr, t in zip(frame.start, frame.lr, frame.took)) + "."]
    for col, what in (("unseen_mean", "mean forget p(true) over unseen English formats"),
                      ("language_mean", "mean forget p(true) over French/German/Spanish"),
                      ("relearn_heldout", "held-out forget p(true) after relearning"),
                      ("relearn_train", "trained-half p(true) after relearning"),
                      ("maintain", "maintain p(true)"), ("lm_loss_delta", "general-text LM loss change")):
        s = frame[col].dropna() if col in frame else pd.Series(dtype=float)
        if len(s) == 0:
            continue
        b = base.get(col, np.nan if col not in ("unseen_mean", "language_mean") else
                     np.mean([base[c] for c in (fmts if col == "unseen_mean" else langs) if c in base] or [np.nan]))
        r = np.corrcoef(frame.loc[s.index, "centre"], s)[0, 1] if len(s) > 2 and s.std() > 0 else np.nan
        lines.append(f"{what}: lowest {s.min():.3f} ({lab(s.idxmin())}), highest {s.max():.3f} ({lab(s.idxmax())})"
                     + (f", unedited {b:.3f}" if np.isfinite(b) else "")
                     + (f"; correlation with depth {r:+.2f}" if np.isfinite(r) else "") + ".")
    summ = stage_summary(frame, marks, k, ["unseen_mean", "language_mean", "relearn_heldout", "maintain"])
    if summ["lookup.n_windows"] and summ["extraction.n_windows"]:
        lines.append(
            f"Lookup windows (ending by the probe's saturation, layer {marks['probe_saturation_layer']}; "
            f"{summ['lookup.n_windows']}) vs extraction windows (from layer {marks['extraction_min_layer']}; "
            f"{summ['extraction.n_windows']}): unseen formats {summ['lookup.unseen_mean']:.3f} vs "
            f"{summ['extraction.unseen_mean']:.3f}, languages {summ.get('lookup.language_mean', np.nan):.3f} vs "
            f"{summ.get('extraction.language_mean', np.nan):.3f}, held-out after relearning "
            f"{summ['lookup.relearn_heldout']:.3f} vs {summ['extraction.relearn_heldout']:.3f} "
            "(lower = the edit generalized / held).")
        cis = {m: stage_contrast_ci(frame, marks, k, c) for m, c in EACH_OF.items()}
        words = {"unseen_mean": "unseen formats", "relearn_heldout": "held-out after relearning"}
        if any(ci is not None for ci in cis.values()):
            lines.append("95% bootstrap interval over the athletes of extraction minus lookup (> 0: the lookup "
                         "edit generalized / held better, the paper's side): " + "; ".join(
                             f"{words[m]} {interval_text(lo, hi)} ("
                             + ("lookup lower" if lo > 0 else "extraction lower" if hi < 0 else "covers 0") + ")"
                             for m, ci in cis.items() if ci is not None for lo, hi in [ci]) + ".")
    else:
        lines.append("Lookup-vs-extraction contrast not computed: no window lies wholly in one of the stages "
                     f"(marks: {marks.get('probe_saturation_layer')}, {marks.get('extraction_min_layer')}).")
    return lines


def window_metrics(frame: pd.DataFrame) -> dict:
    """Flat metrics `window.<start>.<measure>` (numbers, bools, lists) for `results.write_metrics`."""
    out = {}
    for s, row in frame.iterrows():
        for c, v in row.items():
            if c == "start":
                continue
            if isinstance(v, (list, tuple, np.ndarray)):
                out[f"window.{s}.{c}"] = [float(x) for x in v]
            elif isinstance(v, (bool, np.bool_)):
                out[f"window.{s}.{c}"] = bool(v)
            elif v is not None and np.isfinite(v):
                out[f"window.{s}.{c}"] = int(v) if c in ("end", "n_params", "n_trials") else float(v)
    return out
