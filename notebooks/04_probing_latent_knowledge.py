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
# # 04 · Probing latent knowledge: is the old fact still inside the edited model?
#
# An edit can make the model *say* "Michael Jordan plays golf" while the residual stream still
# carries "basketball" in the middle layers, only rerouted before the output. The paper tests this
# with **linear probes** (its Figure 4), and so do we, in two ways:
#
# 1. **The paper's protocol** (the main reading): for each **edited** model, train one
#    logistic-regression probe per layer on *that model's* residual stream of the athletes the
#    edit did not forget (its maintain athletes), at the final token, and test it on the forgotten
#    athletes against their **true** and their **injected** sport. Two controls: the same probes
#    trained on shuffled labels (what reads by chance) and their cross-validated accuracy on the
#    maintain athletes (the probe works on that model at all).
# 2. **Base-model probes** (the workbook's first reading, next to it): probes trained once on the
#    **base** model, applied unchanged to every edited model, at the last subject token (where the
#    fact-lookup MLPs write the attribute) and at the final token.
#
# If the true sport stays decodable in the middle layers, the knowledge is latent (the paper finds
# this after AP edits: 1.00 at the middle layer); if the probe reads the injected sport, the edit
# changed the representation itself (after FLU edits: 0.87 injected, 0.03 true at the middle layer).
#
# **You will learn** to
# * train one linear probe per layer and read its held-out accuracy across layers (exercise);
# * probe each edited model as the paper does, with a chance control and a maintain control;
# * apply probes trained on the base model to edited models, against the true and the new answer;
# * tell an edit that rewrote the representation from one that only rerouted the output.
#
# **Time:** about 30 minutes with the exercise; the run takes under a minute on a 2-core CPU.
# Terms: [glossary](../docs/glossary.md).

# %% tags=["parameters"]
MODEL = "gemma-3-270m"
DEVICE = "auto"
DTYPE = "auto"  # bf16 (fp32 masters) where native and measured faster, else fp32; "float32": exact (README: Precision)
SEED = 0
SMOKE = False
RESULTS_DIR = ""  # "" -> <repo>/results
TASKS = ["athletes_to_sport", "sport_to_golf"]  # sports tasks whose edits notebook 03 saved
METHODS = []  # [] -> every method notebook 03 saved an edit for
PROBE_C = 0.1  # inverse L2 strength of the logistic-regression probes
BATCH_SIZE = 32
SOLUTIONS = True  # False: write the exercises yourself (fill the ... stubs)

# %% [markdown]
# Imports, seeding, and where results go. SMOKE keeps to the one task notebook 03's smoke run edits.

# %%
import time

import pandas as pd

from mechunlearn_utils import load_model
from mechunlearn_utils.edit.storage import edit_paths, task_from_edit
from mechunlearn_utils.evaluate.latent import (flat_metrics, latent_curves, paper_latent_verdict, plot_latent_curves,
                                               probe_table, probe_widget, summary)
from mechunlearn_utils.workbook.notebook import known_athletes, known_facts, start
from mechunlearn_utils.workbook.results import save_figure, write_metrics

STEM = "04_probing_latent_knowledge"
t_start = time.perf_counter()
RESULTS_DIR = start(SEED, RESULTS_DIR)
if SMOKE:
    TASKS = ["athletes_to_sport"]

# %% [markdown]
# ## 1 · Model, athletes, and the edits notebook 03 saved
# Each edit is stored as only its changed matrices; we put it on the base model, read the
# residual stream, and take it off again. The task (which athletes were edited, to what) is rebuilt
# from the metadata saved with the edits, so the split is exactly notebook 03's. A missing edit
# raises an error that says to run notebook 03.

# %%
model = load_model(MODEL, DEVICE, dtype=DTYPE)
athletes, facts = known_athletes(RESULTS_DIR), known_facts(RESULTS_DIR)
paths = {name: edit_paths(RESULTS_DIR, name, METHODS or None) for name in TASKS}
tasks = {name: task_from_edit(p, athletes, facts) for name, p in paths.items()}
for name, task in tasks.items():
    print(task.describe(), "| edited models:", ", ".join(paths[name]))

# %% [markdown]
# Who is probed, and who trains the probes. The probed athletes are each task's evaluation forget
# set (for `sport_to_golf`, the held-out half the edit never trained on). The probes train on every
# *other* known athlete: on each edited model (the paper's protocol) and on the base model (ours). For `sport_to_golf` every athlete of the forgotten sport
# is "forget", so the probe learns that sport from the trained half; and since no athlete in the
# data plays golf, a 3-way probe cannot read "golf": that task has true-label curves only.

# %%
pd.DataFrame({name: {"probed": len(t.eval_forget), "probe training": len(athletes) - len(t.eval_forget),
                     "injected labels": ", ".join(sorted(set(t.eval_forget.target)))}
              for name, t in tasks.items()}).T

# %% [markdown]
# ### Exercise · a probe across layers
# Before the library does it for every edit: train one probe per layer yourself. Write
# `my_probe_curve(train_x, train_y, test_x, test_y)`: the features are residual streams
# `[layer, athlete, d_model]` (final token, base model) and the labels the athletes' sports; for
# every layer fit a probe on the training half and return its accuracy on the held-out half (an
# array `[layer]`). The check compares it with `evaluate.probes.fit_probes` + `probe_accuracy`.
#
# *Hint:* the library's probe is `make_pipeline(StandardScaler(), LogisticRegression(C=0.1,
# max_iter=2000, random_state=0))` from scikit-learn; use the same to match exactly.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_probe_curve(train_x, train_y, test_x, test_y):
#     acc = []
#     for layer in range(train_x.shape[0]):
#         probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=0))
#         probe.fit(train_x[layer], train_y)
#         acc.append((probe.predict(test_x[layer]) == test_y).mean())
#     return np.array(acc)
# ```
# </details>

# %%
import numpy as np  # noqa: E402,F401 - for your solution
from sklearn.linear_model import LogisticRegression  # noqa: E402,F401
from sklearn.pipeline import make_pipeline  # noqa: E402,F401
from sklearn.preprocessing import StandardScaler  # noqa: E402,F401

from mechunlearn_utils.workbook.exercises import check_probe_curve  # noqa: E402


def my_probe_curve(train_x, train_y, test_x, test_y):
    ...  # your code: an array [layer] of held-out accuracy


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_probe_curve as my_probe_curve
check_probe_curve(my_probe_curve, model, athletes, n=24 if SMOKE else 48, seed=SEED)

# %% [markdown]
# *Predict:* on the base model, at which layers should a sport probe at the final token be near
# chance, and where near perfect? (Notebook 01's logit lens is a hint.)

# %% [markdown]
# ## 2 · Probes on every edited model (the paper's) and on the base model (ours)
# One batched forward per batch of prompts gives the residual stream after every block at both
# positions (the activations of the base model are read once). Per edited model we read its
# residuals of the training athletes (for its own probes) and of the probed ones. Every edit is
# checked to change the probed residual stream, and the base weights to come back bit for bit.

# %%
results = {name: latent_curves(model, task, athletes, paths[name], C=PROBE_C, seed=SEED,
                               batch_size=BATCH_SIZE) for name, task in tasks.items()}
for name, res in results.items():
    print(f"{name}: relative change of the final-token residual at the last layer "
          + ", ".join(f"{m} {v[-1]:.3f} (from layer {res.first_layer[m]})" for m, v in res.change.items())
          + f"; weights bit-identical afterwards: {res.weights_restored}, base residuals re-read within "
          + f"{res.restore_rel_diff:.1g} (relative)")

# %% [markdown]
# ## 3 · The paper's Figure 4: probe accuracy by layer, one line per method
# First the paper's protocol at the final token. Columns: accuracy against the **true** sport and
# against the **injected** one on the forgotten athletes, then the two controls (probes fit on
# shuffled labels, scored against the true sport: chance on these athletes; and the probes'
# 5-fold accuracy on the model's own maintain athletes). `base` is the unedited model. The dotted
# line is chance (1/3).

# %%
for name, res in results.items():
    fig = plot_latent_curves(res.curves, title=f"{MODEL}: {name} (the paper's probes, one per model)",
                             chance=1 / 3, protocol="paper", positions=("final",))
    save_figure(fig, RESULTS_DIR, STEM, f"paper_probe_curves_{name}")

# %% [markdown]
# Next to it, the base-model probes at both positions (rows: the final token and the last
# subject token), applied unchanged to every edited model.

# %%
for name, res in results.items():
    fig = plot_latent_curves(res.curves, title=f"{MODEL}: {name} (base-model probes)", chance=1 / 3)
    save_figure(fig, RESULTS_DIR, STEM, f"probe_curves_{name}")

# %% [markdown]
# The same in numbers: accuracy at the middle layer (the paper's headline number), averaged over
# the back half of the layers, and the best layer.

# %%
mid = model.n_layers // 2
table = pd.concat({name: summary(res.curves, model.n_layers, protocol=None) for name, res in results.items()},
                  names=["task"])
print(f"middle layer = {mid} of 0..{model.n_layers - 1}")
table.round(2).unstack("label")

# %% [markdown]
# ## 4 · What it shows
# We print, for every task and method, how much of the true and the injected sport the probes read
# at the middle layer: the paper's probes at the final token, the base-model probes at the subject
# token, next to the paper's numbers (Gemma-7B class models: FLU edits 0.87 injected / 0.03 true;
# AP edits 1.00 true). Then the latent claim with its uncertainty: a paired bootstrap over the
# probed athletes of (rival - FLU) true-sport hits of the paper's probes (> 0: FLU leaves less).

# %%
def finding(name, method, protocol, pos):
    s = table.loc[(name, protocol)]
    true = s.loc[(method, pos, "true"), "mid"]
    edit = s.loc[(method, pos, "edit"), "mid"] if (method, pos, "edit") in s.index else float("nan")
    extra = (f", shuffled-label control {s.loc[(method, pos, 'shuffled'), 'mid']:.2f}, maintain CV "
             f"{s.loc[(method, pos, 'maintain_cv'), 'mid']:.2f}") if protocol == "paper" else ""
    return f"[{name}] {method:>12} {protocol:>5} probes, {pos:>7} token: true {true:.2f}, injected {edit:.2f}{extra}"


for name, res in results.items():
    for method in res.features:
        print(finding(name, method, "paper", "final"))
        print(finding(name, method, "ours", "subject"))
    verdict, cis = paper_latent_verdict(res)
    print(f"[{name}] latent claim, the paper's probes: {verdict}; "
          + ", ".join(f"{r} - flu [{lo:+.2f}, {hi:+.2f}]" for r, (lo, hi) in cis.items()))

# %% [markdown]
# *Predict:* after an FLU edit (early MLPs), will the probe at the subject token read the true
# sport, the injected one, or neither?
#
# How to read the lines: a method whose **true** accuracy at the subject token stays near the
# `base` line changed only the extraction of the fact, not its lookup; a method whose probe reads
# the **injected** sport there rewrote the representation the lookup MLPs produce. No edit can
# change the residual stream below its lowest trained layer (checked: `resid_change_by_layer` is 0
# there), so its curves equal the base curves up to that layer.
#
# What to compare with the paper: FLU edits rewrite the representation early (the injected sport
# is readable at the middle layer, the true one is not), while an edit that trains only late
# layers leaves the true sport readable up to them. On a small model the OT localizations of
# notebook 02 need not be late (check `first_edited_layer` above): the probe then separates the
# methods by *how early* they train. The README's Results section records the reference run.

# %% [markdown]
# ## 5 · Explore: what the probe reads for each athlete
# Pick a task, an edited model, a position and a layer: the table shows, per edited athlete, the
# true and injected sport and what the base-trained probe reads (with its confidence). Below, the
# static default (first task, FLU if it was edited, subject token, middle layer).

# %%
first = next(iter(results.values()))
demo_method = "flu" if "flu" in first.features else list(first.features)[-1]
display(probe_table(first, demo_method, "subject", mid))
probe_widget(results)

# %% [markdown]
# ## 6 · Metrics
# `RESULTS_DIR/04_probing_latent_knowledge/metrics.json` keys, for each `<task>` and `<method>`
# (every edited model, plus `base`, the unedited model), `<pos>` in `final` / `subject`:
#
# * `<task>.<method>.<pos>.true_acc_by_layer` / `.edit_acc_by_layer`: base-model probe accuracy per
#   layer (list of n_layers) against the true / the injected sport (`edit_*` absent for
#   sport_to_golf: the probes cannot output golf);
# * `<task>.<method>.paper.<pos>.<label>_acc_by_layer` (and `.mid` / `.back_half` / `.max`), label in
#   true / edit / shuffled / maintain_cv: the paper's protocol (probes fit on that model's maintain
#   athletes) and its two controls; `<task>.<method>.paper.final.true_correct_mid`: per probed
#   athlete, 1 where the middle-layer probe reads the true sport; `verdict_ci.latent_paper.<task>`
#   and `<task>.latent_paper.ci.<rival>_minus_flu_low/high`: the latent claim from those hits;
# * `<task>.<method>.<pos>.true_acc.mid` / `.back_half` / `.max` (and `edit_acc.*`): the middle
#   layer (n_layers // 2), the mean over layers >= the middle, the best layer;
# * `<task>.<method>.resid_change_by_layer` / `.resid_change`: relative change of the final-token
#   residual per layer / at the last layer (0 below the edit's lowest trained layer
#   `<task>.<method>.first_edited_layer`, > 0 from it on), `<task>.weights_restored` (every weight
#   bit-identical after the edits), `<task>.restore_rel_diff` (base residuals re-read: <= EVAL_ATOL),
#   `<task>.n_probed`, `<task>.methods`;
# * `model`, `seed`, `smoke`, `n_layers`, `mid_layer`, `tasks`, `seconds_total`.

# %%
metrics = {"model": MODEL, "seed": SEED, "smoke": SMOKE, "n_layers": model.n_layers, "mid_layer": mid,
           "tasks": list(results)}
for res in results.values():
    metrics.update(flat_metrics(res, model.n_layers))
metrics["seconds_total"] = time.perf_counter() - t_start
write_metrics(RESULTS_DIR, STEM, metrics)
