# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02b · Depth sweep: where you edit decides what the edit does
#
# Notebook 02 compared localizations that differ in many ways at once: which layers, which
# matrices, how many weights. Here **only depth varies**. We slide a window of `K` consecutive
# MLP layers down the model, edit the same facts by training only that window's MLP matrices,
# and measure, for every window, what the paper measures for every method.
#
# **Learning objectives.** After this notebook you can
#
# * explain why a *parameter-matched* sliding window isolates depth from every other design
#   choice of a localization;
# * choose a learning rate per window by the paper's rule (the smallest rate whose edit takes
#   on the training split), and say why a window must be judged *after* its edit took;
# * read generalization (unseen formats, other languages), robustness (relearning) and side
#   effects (maintain, LM loss) against depth, and place the curves against the two stages of
#   factual recall: the **lookup** MLPs (until the name-only probe saturates) and the
#   **extraction** heads (notebooks 01-02);
# * write the edit loss the sweep trains with (exercise).
#
# **Time:** about 30 minutes to read and do the exercises; the run takes 6-11 minutes on a 2-core
# CPU with native bf16 (5 windows; measured 5.5 min on an AMX Xeon with tcmalloc), 15 in fp32. Terms: [glossary](../docs/glossary.md).
#
# This goes beyond the paper (compare *Layer-Targeted Multilingual Knowledge Erasure*, which
# also asks which layers to edit). The task is notebook 03's `athletes_to_sport`: each of
# `N_FACTS` athletes gets another sport.

# %% tags=["parameters"]
MODEL = "gemma-3-270m"
DEVICE = "auto"
DTYPE = "auto"  # bf16 (fp32 masters) where native and measured faster, else fp32; "float32": exact (README: Precision)
SEED = 0
SMOKE = False  # True: 2 windows, few steps and athletes (CI)
RESULTS_DIR = ""  # "" -> <repo>/results
K = 4  # MLP layers per window (every MLP matrix of each: gate, up, down)
STRIDE = 4  # first layers 0, 4, 8, 12 and always the deepest (14): 5 windows (section 3: the cost)
LRS = [1e-5, 3e-5, 1e-4, 3e-4]  # the paper's grid is 1e-5..1e-4; 3e-4 is our extension for deep windows
FORGET_TARGET = 0.1  # the edit took: training-format forget p(true) on the training split at most this
N_FACTS = 16  # athletes edited (notebook 03's athletes_to_sport)
N_MAINTAIN = 64  # athletes kept (half trained on, half evaluated)
N_HELDOUT_TEXT = 16  # held-out general-text paragraphs for the LM-loss side effect
STEPS = 20  # edit steps (notebook 03's)
BATCH_SIZE = 16
LM_BATCH = 2
RELEARN_STEPS = 20  # LoRA relearning, as notebook 05 (evaluated at 0, the middle and the end)
LORA_RANK = 64
LORA_ALPHA = 32
LORA_LR = 2e-4
LANGUAGES = ["fr", "de", "es"]
THREADS = 0  # torch CPU threads (0: automatic; 1 when the machine is busier than its cores)
SOLUTIONS = True  # False: write the exercises yourself (fill the ... stubs)

# %% [markdown]
# Imports and setup. SMOKE mode keeps two windows (the first and the deepest) and a few steps.

# %%
import time

import pandas as pd

from mechunlearn_utils import attacks as A
from mechunlearn_utils.attacks import depth as D
from mechunlearn_utils import load_model
from mechunlearn_utils.data.datasets import load_general_text
from mechunlearn_utils.edit.train import EditConfig
from mechunlearn_utils.workbook.notebook import known_athletes, start
from mechunlearn_utils.workbook.results import MissingResultsError, read_metrics, save_figure, write_metrics
from mechunlearn_utils.data.tasks import make_task

STEM = "02b_depth_sweep"
t_start, seconds = time.perf_counter(), {}
RESULTS_DIR = start(SEED, RESULTS_DIR, threads=THREADS or "auto")  # auto: 1 thread on a busy machine
if SMOKE:
    STEPS, RELEARN_STEPS, N_FACTS, N_MAINTAIN, N_HELDOUT_TEXT, LRS = 8, 2, 8, 16, 4, [1e-4, 3e-4]

# %% [markdown]
# ## 1 · Model, facts, task
# The athletes notebook 00 found the model knows; the task is built exactly as notebook 03
# builds it (same seed, same sizes), so the two notebooks edit the same athletes.

# %%
model = load_model(MODEL, DEVICE, dtype=DTYPE)
athletes = known_athletes(RESULTS_DIR)
task = make_task("athletes_to_sport", athletes=athletes, n=N_FACTS, seed=SEED, n_maintain=N_MAINTAIN)
text = load_general_text()
train_text, heldout_text = text[:64], text[-N_HELDOUT_TEXT:]
templates = A.load_language_templates()
print(task.describe())
task.train_forget[["athlete", "sport", "target"]].head(8)

# %% [markdown]
# ## 2 · Where the two stages sit (from notebook 02)
# Notebook 02 measured at which layer a probe on the **name alone** reads the sport (the
# lookup is done there) and where the **extraction heads** sit. These become vertical marks
# on the figure. If 02's results are missing we say what to run and draw no marks.

# %%
try:
    loc_metrics = read_metrics(RESULTS_DIR, "02_localization")
except MissingResultsError as err:
    loc_metrics = None
    print(err)
marks, notes = D.depth_marks(loc_metrics)
for note in notes:
    print("NOTE:", note)
marks

# %% [markdown]
# ## 3 · The windows
# Every window trains all MLP matrices of `K` consecutive layers, so every window has the same
# number of weights. The stride is a CPU budget: one window costs one edit per learning rate
# tried, the evaluations, and a relearning attack on the whole model. Measured while
# writing this notebook (gemma-3-270m, full mode, one torch thread, CPU seconds): an edit
# trial 80 s for MLPs 0-3, 75 s for MLPs 4-7, 47 s for MLPs 12-15 (the frozen prefix saves
# less than one would hope: the 262k-token unembedding costs the same at every depth), the
# evaluations 18 s, relearning 45 s. MLPs 0-3 took at the first rate (145 s for the window),
# MLPs 4-7 and 12-15 needed three trials (290 s, 215 s). With `STRIDE = 4` (5 windows) the
# notebook needs about 20 CPU minutes (estimated: 12-13 minutes on two free cores);
# `STRIDE = 3` (6 windows) about 15. Each run's own times: `window.<start>.seconds` and
# `.cpu_seconds` in the metrics.

# %%
starts = D.window_starts(model.n_layers, K, STRIDE)
if SMOKE:
    starts = [starts[0], starts[-1]]
names = D.window_params(model, starts[0], K)
n_params = D.n_weights(model, names)
decoder = sum(p.numel() for n, p in model.named_parameters().items() if ".layers." in n)
print(f"{len(starts)} windows of {K} MLP layers, first layers {starts}")
print(f"each trains {len(names)} matrices, {n_params / 1e6:.2f}M weights "
      f"= {n_params / decoder:.1%} of the decoder layers")
names[:3]

# %% [markdown]
# ## 4 · The unedited model
# The reference for every curve: forget p(true) in each format and language (the athletes'
# true sport, normalized over basketball / baseball / football / golf), maintain p(true), and
# the general-text LM loss.

# %%
cfg = D.DepthConfig(k=K, lrs=tuple(LRS), forget_target=FORGET_TARGET, languages=tuple(LANGUAGES), seed=SEED,
                    edit=EditConfig(steps=STEPS, batch_size=BATCH_SIZE, lm_batch=LM_BATCH, seed=SEED),
                    relearn=A.RelearnConfig(mode="lora", steps=RELEARN_STEPS, lr=LORA_LR, lora_rank=LORA_RANK,
                                            lora_alpha=LORA_ALPHA, seed=SEED))
t0 = time.perf_counter()
base = D.base_measures(model, task, heldout_text, templates, cfg)
seconds["base"] = time.perf_counter() - t0
pd.Series(base).round(3)

# %% [markdown]
# ### Exercise · the edit loss
# Every window trains the same objective on the forget set: move each athlete to its new sport,
# i.e. minimize the cross-entropy of the injected answer, `-log p(new)`, averaged over the batch
# (plus maintain and general-text terms that keep the rest in place). Write
# `my_edit_loss(logp_new)`: given the log-probabilities of the new answer per example (a tensor
# `[batch]`), return the loss as a scalar tensor. The check compares it with
# `edit.loop.forget_loss(..., mode="edit")` on a few batches.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_edit_loss(logp_new):
#     return -logp_new.mean()
# ```
# </details>

# %%
from mechunlearn_utils.workbook.exercises import check_edit_loss  # noqa: E402


def my_edit_loss(logp_new):
    ...  # your code: a scalar tensor


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_edit_loss as my_edit_loss
check_edit_loss(my_edit_loss)

# %% [markdown]
# ## 5 · Predict, then run
# Before running the sweep, write down your predictions:
#
# 1. Which windows need the largest learning rate before the edit takes, shallow or deep ones?
# 2. After editing in the training format only, will the **question** format and **French**
#    forget as well for a window in the lookup stage as for one in the extraction stage?
# 3. After LoRA relearning on *half* the athletes, which windows let the *other* half's true
#    sport come back?
#
# The next cell runs every window: for each, learning rates in ascending order until the edit
# takes, then every measure, then relearning; the base weights are put back and checked bit
# for bit before the next window. This is the long cell of the notebook.

# %%
t0 = time.perf_counter()
frame = D.sweep_windows(model, starts, task, train_text, heldout_text, base["lm_loss"], templates, cfg)
seconds["sweep"] = time.perf_counter() - t0
seconds["per_window"] = seconds["sweep"] / len(starts)
print(f"{seconds['sweep']:.0f} s for {len(starts)} windows; per window: "
      + ", ".join(f"{s}: {t:.0f} s" for s, t in frame.seconds.items()))

# %% [markdown]
# The learning rate each window needed (trials in ascending order, training-split forget after
# each), and whether any rate on the grid took.

# %%
frame[["lr", "took", "trial_lrs", "trial_forget", "train_maintain", "seconds_edit", "seconds", "cpu_seconds"]].round(3)

# %% [markdown]
# Every measure per window (rows: the window's first layer; lower forget = forgotten).

# %%
cols = ["forget_normal", "target_normal", *[c for c in frame if c.startswith("forget_") and c != "forget_normal"],
        "maintain", "lm_loss_delta", "relearn_heldout_before", "relearn_heldout", "relearn_train"]
pd.concat([pd.DataFrame([base], index=["base"])[[c for c in cols if c in base]], frame[cols]]).round(3)

# %% [markdown]
# ## 6 · The figure
# Each panel against the window's centre layer (tick labels: the window and its learning rate).
# Dashed horizontals: the unedited model. Dotted vertical: the name-only probe saturates (the
# lookup is done); dash-dotted: the first layer with an extraction head. Hollow markers: the
# edit never took at any learning rate, so that window's other numbers say little.

# %%
fig = D.plot_depth_sweep(frame, base, marks, K, title=f"{MODEL}: editing a window of {K} MLP layers "
                         f"({len(task.eval_forget)} athletes -> another sport)")
save_figure(fig, RESULTS_DIR, STEM, "depth_sweep")

# %% [markdown]
# ## 7 · Reading guide, computed from this run
# Compare with your predictions. Each sentence below is computed from the numbers above
# (`depth.reading_guide`); nothing is typed in advance.

# %%
for line in D.reading_guide(frame, base, marks, K):
    print("-", line)

# %% [markdown]
# ## 8 · Exercise: the learning-rate rule
# Write `my_choose_lr(rows, target)`: given trial rows `{"lr", "forget_p_true"}`, return the
# smallest `lr` whose forget p(true) is at most `target`, or, if none, the `lr` with the lowest
# forget. The check compares it with `depth.choose_lr` on every window's trials of this run.

# %%
def my_choose_lr(rows, target):
    took = [r for r in rows if r["forget_p_true"] <= target]
    return min(took, key=lambda r: r["lr"])["lr"] if took else min(rows, key=lambda r: r["forget_p_true"])["lr"]


for s, row in frame.iterrows():
    trials = [dict(lr=lr, forget_p_true=f) for lr, f in zip(row.trial_lrs, row.trial_forget)]
    assert my_choose_lr(trials, FORGET_TARGET) == D.choose_lr(trials, FORGET_TARGET)["lr"] == row.lr, s
print("my_choose_lr agrees with depth.choose_lr on", len(frame), "windows")

# %% [markdown]
# ## 9 · Metrics
# `RESULTS_DIR/02b_depth_sweep/metrics.json` (flat):
#
# * `window.<start>.<measure>` per window (`<start>` its first layer): `lr` (chosen), `took`,
#   `forget_normal` (training format), `target_normal` (p of the injected sport),
#   `forget_question`, `forget_para1..3`, `forget_<fr|de|es>`, `maintain`, `lm_loss`,
#   `lm_loss_delta`, `relearn_heldout` / `relearn_train` (after relearning; `_before`: at step 0),
#   `relearn_heldout_by_step`, `relearn_steps`, `train_forget` / `train_maintain` (training split,
#   chosen trial), `trial_lrs` / `trial_forget` (every trial), `n_trials`, `n_params`, `end`,
#   `centre`, `seconds_edit`, `seconds` (the whole window, wall clock), `cpu_seconds` (process CPU
#   time, every thread: less sensitive to a busy machine), `relearn_seconds`
# * `base.<measure>`: the unedited model (`relearn_*`: the halves without an attack)
# * `curve.<measure>`: the same per-window values as lists in `window_starts` order
# * `marks.probe_saturation_layer`, `marks.extraction_min_layer` (null when 02 lacks them),
#   `marks.probe_source`, `marks.extraction_source`
# * `summary.<lookup|extraction>.<measure>`: mean over the windows of each stage, `.n_windows`
# * `contrast.<unseen_mean|relearn_heldout>.ci_low` / `.ci_high`: 95% paired bootstrap interval over the
#   athletes of (extraction - lookup) (> 0: the lookup edit generalized / held better);
#   `window.<start>.forget_unseen_each` / `.relearn_heldout_each`: the per-athlete values it resamples
# * settings: `k`, `stride`, `lrs`, `forget_target`, `steps`, `relearn_steps`, `lora_rank`,
#   `n_forget`, `n_params_per_window`, `decoder_share`, `window_starts`;
#   `seconds.base`, `seconds.sweep`, `seconds.per_window`, `seconds_total`

# %%
CURVES = ["lr", "took", "forget_normal", "target_normal", "forget_question", "forget_para1", "forget_para2",
          "forget_para3", *[f"forget_{l}" for l in LANGUAGES], "maintain", "lm_loss_delta", "relearn_heldout",
          "relearn_train", "seconds"]
metrics = {"model": MODEL, "seed": SEED, "smoke": SMOKE, "k": K, "stride": STRIDE, "lrs": LRS,
           "forget_target": FORGET_TARGET, "steps": STEPS, "relearn_steps": RELEARN_STEPS, "lora_rank": LORA_RANK,
           "n_forget": len(task.eval_forget), "n_params_per_window": n_params, "decoder_share": n_params / decoder,
           "window_starts": starts, **D.window_metrics(frame)}
metrics.update({f"base.{k}": float(v) for k, v in base.items()})
metrics.update({f"curve.{c}": [float(v) for v in frame[c]] for c in CURVES})
metrics.update({f"marks.{k}": v for k, v in marks.items()})
summary = D.stage_summary(frame, marks, K, [c for c in CURVES if c not in ("lr", "took", "seconds")])
metrics.update({f"summary.{k}": v for k, v in summary.items()})
metrics.update(D.contrast_metrics(frame, marks, K))
metrics.update({f"seconds.{k}": v for k, v in seconds.items()}, seconds_total=time.perf_counter() - t_start)
write_metrics(RESULTS_DIR, STEM, metrics)
print(f"{len(metrics)} metrics; {metrics['seconds_total']:.0f} s in total")
