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
# # 02 · Localization: which weights hold a fact?
#
# Before we edit or unlearn a fact (notebook 03) we must choose *which* weight matrices to
# train. The paper compares localizations:
#
# * **Output-tracing (OT) methods** score components by how much they matter for the output:
#   **causal tracing (CT)** (noise the subject, restore one component at a time) and
#   **attribution patching (AP)** (a gradient-based, linear estimate of activation patching).
# * **Fact lookup (FLU, "manual")**: find *where the attribute is looked up*. Linear probes show
#   at which layer the sport becomes readable from the athlete's name alone; the paper's FLU is
#   the contiguous range of early MLPs that ends there. Path patching finds the *extraction
#   heads* that carry the sport to the answer and checks that the FLU MLPs feed them.
# * **Baselines**: random matrices, random MLP layers, all MLPs, and everything (nonlocalized);
#   and a positive control, **extraction**: as many MLPs as FLU, from the extraction heads' layer on.
#
# All methods are **parameter-matched** to FLU: OT methods rank layers and add whole units
# (attention: q, k, v, o; MLP: gate, up, down) until they hold as many parameters as the FLU MLPs.
# Every method follows the authors' code (github.com/magikarp01/mechanistic-unlearning; each
# library function names the file); the workbook's earlier choices stay available as variants
# (`ap_abs`, `ct_abs`, `ct_few`, `flu_pp`), and section 8 shows how far each choice moves the
# localization. The paper finds FLU in early MLPs and OT methods in late layers; here we check
# that on a 270M-parameter model.
#
# **You will learn** to
# * read where a fact becomes decodable with linear probes, and what a probe can and cannot prove;
# * localize with attribution patching (exercise: write its score for one site) and causal tracing;
# * find extraction heads and lookup MLPs with path patching;
# * match localizations by parameter count and see how far each design choice moves them.
#
# **Time:** about 60 minutes with the exercise; the run takes about 2-10 minutes on a 2-core CPU
# (causal tracing of 80 facts dominates). Terms: [glossary](../docs/glossary.md).

# %% tags=["parameters"]
MODEL = "gemma-3-270m"
DEVICE = "auto"
DTYPE = "float32"  # exact: 00-02 decide which facts are known and where they sit (README: Precision)
SEED = 0
SMOKE = False  # True: few facts, one noise sample (CI)
RESULTS_DIR = ""  # "" -> <repo>/results
TASKS = ["sports", "counterfact"]
N_FACTS = 80  # facts per task for AP (the paper: 80 athletes), balanced over the sports
FLU_FACTS = 24  # the first facts of those, for path patching (a row per MLP and fact)
CT_FACTS = 80  # the first facts, for causal tracing (the paper's 80; ~4.5 min per task, section 4)
CT_FEW_FACTS = 2  # the `ct_few` variant: CT from only the first facts of those
CT_NOISE_SAMPLES = 1  # the paper: one noise draw
CT_NOISE_SCALE = 3.0
CT_NOISE_RULE = "paper_sqrt"  # noise sd sqrt(3 x std), the paper's code; "scale_std": 3 x std
TRACE_FACT = 0  # the fact of the first task traced token by token, ROME style (end of section 4)
TRACE_LAYERS = 0  # layers in that trace, evenly spaced (0: every layer; SMOKE: 2)
PROBE_FACTS = 0  # athletes for the probes (0: every known athlete)
AGREEMENT_FACTS = 12  # AP vs real activation patching: facts ...
AGREEMENT_COMPONENTS = 12  # ... and components compared
FLU_START = 2  # first FLU MLP: the paper's Gemma models start at MLP 2
SATURATION_RULE = "plateau"  # where the name-only probe saturates: "plateau" or "max" (section 2)
SATURATION_TOL = 0.02  # plateau: a gain below this over the next 2 layers; max: distance to the best
FLU_THRESHOLD = 0.05  # flu_pp: an MLP is selected when its path-patching effect reaches this
HEAD_THRESHOLD = 0.05  # a head is an extraction head when its direct effect reaches this
FLU_LAYERS = None  # hand-given FLU MLP layers, e.g. {"sports": [2, 3, 4]} (skips the search)
BACKEND = "tl"  # "tl" (TransformerLens hooks) or "nnsight": same numbers, see section 6
BATCH_SIZE = 32
WIDGET_METHOD = "flu"  # what the static rendering of the widget shows
SOLUTIONS = True  # False: write the exercises yourself (fill the ... stubs)

# %%
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import display

from mechunlearn_utils import load_model
from mechunlearn_utils import localize as lz
from mechunlearn_utils.data.datasets import balanced_sample
from mechunlearn_utils.workbook.notebook import known_athletes, known_facts, start
from mechunlearn_utils.evaluate.probes import cv_probe_accuracy, plot_probe_curves, residuals_at
from mechunlearn_utils.viz.circuits_plots import plot_token_trace
from mechunlearn_utils.workbook.results import MissingResultsError, read_metrics, save_figure, write_metrics

STEM = "02_localization"
t_start = time.perf_counter()
RESULTS_DIR = start(SEED, RESULTS_DIR)
if SMOKE:
    N_FACTS, FLU_FACTS, CT_FACTS, CT_FEW_FACTS, CT_NOISE_SAMPLES = 8, 8, 2, 1, 1
    AGREEMENT_FACTS, AGREEMENT_COMPONENTS, PROBE_FACTS, TRACE_LAYERS = 6, 6, 45, 2
metrics = {"model": MODEL, "seed": SEED, "smoke": SMOKE, "backend": BACKEND}

# %% [markdown]
# ## 1 · Model and facts
# We localize only facts the model knows (notebook 00 saved them): athletes in the paper's
# one-shot format (balanced over basketball / baseball / football) and CounterFact facts.

# %%
model = load_model(MODEL, DEVICE, dtype=DTYPE)
athletes, cf = known_athletes(RESULTS_DIR), known_facts(RESULTS_DIR)
facts = {"sports": lz.sports_facts(model, athletes, n=N_FACTS, seed=SEED),
         "counterfact": lz.counterfact_facts(model, cf, n=N_FACTS)}
facts = {t: facts[t] for t in TASKS}
for t, f in facts.items():
    metrics[f"{t}.n_facts"] = len(f)
    print(f"{t}: {len(f)} facts, e.g. {f.prompts[0]!r} -> {f.candidates[0][f.correct[0]]!r}")

# %% [markdown]
# ## 2 · Probes: where does the sport become readable?
# A logistic-regression probe per layer reads the sport from the residual stream at the
# athlete's **last token**, cross-validated. Two inputs: the full prompt, and the name alone
# (BOS + name): with no "plays the sport of" in context, the sport must come from the name's
# tokens. A name-only probe that succeeds fits the MLPs *looking the sport up*, but it does not
# prove it: attention also gathers the name's tokens onto the last one, and a probe may read
# sport-correlated features of the tokens themselves. Two baselines below bound this: a probe on
# the name's token embeddings (no block at all) and the name-only probe with shuffled labels.
# The paper: the name-only probe is near perfect by layers 3-4 of Gemma-7B, and its FLU range for
# Gemma-7B is MLPs 2-7.

# %%
probe_set = athletes if not PROBE_FACTS else balanced_sample(athletes, PROBE_FACTS, "sport", SEED)
folds = max(2, min(5, int(probe_set.sport.value_counts().min())))
probe_facts = lz.sports_facts(model, probe_set)
t0, probe_counter = time.perf_counter(), lz.PassCounter()
full = residuals_at(model, probe_facts.prompts, [p[-1] for p in probe_facts.subject_pos],
                    BATCH_SIZE, BACKEND, probe_counter)
names = list(probe_set.athlete)
name_only = residuals_at(model, names, [len(model.encode(n)) - 1 for n in names], BATCH_SIZE,
                         BACKEND, probe_counter)
probe_acc = {"full prompt": cv_probe_accuracy(full, probe_set.sport, folds, seed=SEED),
             "name only": cv_probe_accuracy(name_only, probe_set.sport, folds, seed=SEED)}
probe_seconds = time.perf_counter() - t0

# %%
fig = plot_probe_curves(probe_acc, chance=1 / 3, title=f"{MODEL}: sport probes ({len(names)} athletes, "
                        f"{folds}-fold CV)")
saturation = lz.probe_saturation_layer(probe_acc["name only"], SATURATION_TOL, SATURATION_RULE)
fig.axes[0].axvline(saturation, ls="--", c="k", lw=1)
save_figure(fig, RESULTS_DIR, STEM, "probe_accuracy")
pd.DataFrame(probe_acc).T.round(2)

# %% [markdown]
# The baselines: what a probe reads from the name's token embeddings alone (their mean: no block,
# no attention), and the best layer of the name-only probe with shuffled labels (how high a probe
# scores on nothing: the noise level of these curves).

# %%
emb = model.hf.get_input_embeddings()
with torch.no_grad():
    bag = np.stack([emb(torch.tensor(model.encode(n), device=model.device)).mean(0).float().cpu().numpy()
                    for n in names])
shuffled = np.random.default_rng(SEED).permutation(probe_set.sport.to_numpy())
probe_baselines = {"name-token embeddings": float(cv_probe_accuracy(bag[None], probe_set.sport, folds, seed=SEED)[0]),
                   "name only, shuffled labels (best layer)": float(cv_probe_accuracy(name_only, shuffled, folds,
                                                                                      seed=SEED).max())}
print({k: round(v, 2) for k, v in probe_baselines.items()},
      f"| name-only probe: layer 0 {probe_acc['name only'][0]:.2f}, best {max(probe_acc['name only']):.2f}")

# %% [markdown]
# **The paper's FLU range.** The FLU MLPs run from FLU_START (the paper's Gemma start, MLP 2: the
# first blocks' attention gathers the name's tokens first) to the layer where the name-only probe
# *saturates* (dashed line above), inclusive; the probe reads the residual stream *after* each
# block, so that layer's MLP has already written there. Saturation, precisely
# (`lz.probe_saturation_layer`): with SATURATION_RULE = "plateau", the first layer at least
# halfway from layer 0's accuracy to the best one after which the probe gains less than
# SATURATION_TOL over the next two layers (where the early rise stops); with "max", the first
# layer within SATURATION_TOL of the best accuracy. They differ when the curve rises twice: on
# gemma-3-270m the name-only probe climbs again at the extraction layers, which "max" would
# fold into the lookup range. Both are printed.

# %%
flu_range = lz.flu_range(probe_acc["name only"], FLU_START, SATURATION_TOL, SATURATION_RULE)
acc_no = probe_acc["name only"]
sat_max = lz.probe_saturation_layer(acc_no, SATURATION_TOL, "max")
print(f"name-only probe: best {max(acc_no):.2f}; saturates ({SATURATION_RULE}) at layer {saturation} "
      f"({acc_no[saturation]:.2f}); FLU MLPs {flu_range}"
      + (" (saturated before FLU_START: one MLP)" if saturation < FLU_START else "")
      + f"; the 'max' rule would say layer {sat_max}")

# %% [markdown]
# CounterFact has one relation per handful of facts and many distinct answers, too few examples
# per class for a probe, so FLU on CounterFact rests on path patching alone (as below).
#
# ## 3 · Attribution patching (AP)
# For each batch: one clean forward+backward and one forward with the subject's tokens replaced
# by random ASCII tokens that keep the prompt's tokenized length (as the paper's
# `create_masks.py`). Score of a component (each head's q, k, v and output; each MLP's input
# and output; the gate activations too, for the `ap_abs` variant) = gradient x (corrupted - clean
# activation), summed over positions, normalized by the drop in logit difference (right answer
# minus the other candidates). Three passes per batch, however many components we score.

# %%
ap = {t: lz.attribution_patching(model, f, BATCH_SIZE, BACKEND, SEED, progress=True)
      for t, f in facts.items()}
for t, r in ap.items():
    print(f"{t}: {r.info['n_facts']} facts, {r.seconds:.1f} s, {r.passes}; logit diff clean "
          f"{r.info['ld_clean']:.2f} -> corrupted {r.info['ld_corrupt']:.2f}; prompts whose corruption "
          f"changed the tokenized length: {r.info['corruption_stats']['n_length_mismatch']}")

# %% [markdown]
# ### Exercise · attribution patching for one site
# Activation patching would run the model once per component. AP replaces each run by a linear
# estimate: LD(patched) - LD(clean) ~ grad . (a_corrupt - a_clean), with `grad` the gradient of
# the logit difference at the clean run with respect to the activation `a`. Write
# `my_attribution(grad, clean_act, corrupt_act)` (each `[fact, position, d]`) returning that
# estimate per fact, summed over positions and features. The check captures the MLP output at
# layer FLU_START (before Gemma's post-norm) on a few facts, with the same random-token
# corruption, and compares with `lz.attribution_patching` before its normalization.
#
# *Hint:* one line; mind the sign of the difference.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_attribution(grad, clean_act, corrupt_act):
#     return (grad * (corrupt_act - clean_act)).sum(dim=(1, 2))
# ```
# </details>

# %%
from mechunlearn_utils.workbook.exercises import check_attribution  # noqa: E402


def my_attribution(grad, clean_act, corrupt_act):
    ...  # your code: a tensor [fact]


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_attribution as my_attribution
ex_facts = facts[TASKS[0]].subset(range(min(8, len(facts[TASKS[0]]))))
check_attribution(my_attribution, model, ex_facts, layer=FLU_START, seed=SEED)

# %% [markdown]
# Is the linear estimate any good? We patch a handful of components for real (half the
# largest |AP| scores, half at random) and compare.

# %%
agreement = {}
for t, f in facts.items():
    idx = range(min(AGREEMENT_FACTS, len(f)))  # AP of these facts comes from the run above
    agreement[t] = lz.ap_agreement(model, f.subset(idx), ap[t].subset(idx), AGREEMENT_COMPONENTS, 64,
                                   BACKEND, SEED)
    print(f"{t}: Pearson r = {agreement[t]['pearson']:.2f}, Spearman = {agreement[t]['spearman']:.2f} "
          f"over {len(agreement[t]['components'])} components, {len(idx)} facts")
pd.concat({t: pd.DataFrame({"AP": a["ap"], "patching": a["patching"]}, index=a["components"])
           for t, a in agreement.items()}, axis=1).round(3)

# %% [markdown]
# ## 4 · Causal tracing (CT)
# Gaussian noise on the subject's embeddings destroys the fact (the paper's code draws it with
# sd sqrt(3 x std of the subject-token embeddings): CT_NOISE_RULE); restoring one component's
# clean output (each MLP, each attention head's result) recovers some of p(right answer).
# Score = (p_restored - p_noised) / (p_clean - p_noised), averaged over facts and noise samples.
#
# One noised run per (fact, sample), then one batch row per restored component: 18 x (4 heads +
# 1 MLP) = 90 rows per fact on gemma-3-270m. Restoring a component of layer l leaves layers < l as
# in the noised run, so each row starts at its layer from the noised run's residual stream there
# (`causal_tracing(start_layers=True)`): 53% of the layers of full runs, and on 16 facts the same
# scores bit for bit (1.35x faster: the unembedding and the batching do not shrink). 80 facts as
# the paper: about 3.5 minutes per task on 2 idle cores (full runs of every row took about 4.5).
# Section 8 shows how much the fact count moves CT (`ct` against `ct_few`).

# %%
ct = {t: lz.causal_tracing(model, f.subset(range(min(CT_FACTS, len(f)))), CT_NOISE_SCALE, CT_NOISE_SAMPLES,
                           64, BACKEND, SEED, progress=True, noise_rule=CT_NOISE_RULE) for t, f in facts.items()}
for t, r in ct.items():
    print(f"{t}: {r.seconds:.1f} s, {r.passes}; p clean {r.info['p_clean']:.3f} -> noised "
          f"{r.info['p_corrupt']:.3f} ({r.info['n_items_used']} items)")

# %% [markdown]
# AP (every site, per head) and CT (per MLP and per head), layer by layer:

# %%
for t in facts:
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), gridspec_kw=dict(height_ratios=[2.3, 1]))
    lz.plot_scores(ap[t].scores, f"{t}: attribution patching (normalized)", axes[0])
    lz.plot_scores(ct[t].scores, f"{t}: causal tracing (normalized indirect effect)", axes[1])
    fig.tight_layout()
    save_figure(fig, RESULTS_DIR, STEM, f"{t}_ap_ct_heatmaps")
    plt.show()

# %% [markdown]
# CT above restores a component at *every* position, so it scores a layer. ROME's own trace is
# finer: restore the clean state at **one (token, layer)** of the noised run at a time, for one
# fact, and draw p(right answer) as a [position x layer] map, for the residual stream and for
# what each MLP and attention layer adds to it (same noise as CT). Positions before the subject
# need no run: nothing differs there. Rows: 3 kinds x layers x tokens from the subject on.
#
# *Predict:* at which token does restoring the MLP outputs help most, and in which layers?

# %%
trace_task = TASKS[0]
trace_layers = (np.linspace(0, model.n_layers - 1, TRACE_LAYERS).round().astype(int).tolist()
                if TRACE_LAYERS else None)
trace = lz.causal_trace_tokens(model, facts[trace_task], TRACE_FACT, layers=trace_layers,
                               noise_scale=CT_NOISE_SCALE, seed=SEED, noise_rule=CT_NOISE_RULE, backend=BACKEND)
fig = plot_token_trace(trace, f"{trace_task}: {facts[trace_task].subjects[TRACE_FACT]}")
save_figure(fig, RESULTS_DIR, STEM, f"{trace_task}_token_trace")
plt.show()

# %% [markdown]
# Reading it, from this run's numbers: the layer where restoring one state helps most, for the
# residual stream and the MLPs at the last subject token and for attention at the final token.

# %%
last_subject, final = trace.subject_positions[-1], len(trace.labels) - 1
print(f"p clean {trace.p_clean:.3f}, noised {trace.p_noised:.3f} ({trace.seconds:.0f} s)")
for kind, pos in (("resid_pre", last_subject), ("mlp_out", last_subject), ("attn_out", final)):
    best = int(np.argmax(trace.p[kind][pos]))
    print(f"restore {kind} at {trace.labels[pos]!r} (position {pos}): best at layer "
          f"{trace.layers[best]}, p {trace.p[kind][pos, best]:.3f}")
    metrics[f"{trace_task}.token_trace.{kind}.best_layer"] = trace.layers[best]
    metrics[f"{trace_task}.token_trace.{kind}.best_p"] = float(trace.p[kind][pos, best])
metrics.update({f"{trace_task}.token_trace.{k}": v for k, v in dict(
    fact=facts[trace_task].subjects[TRACE_FACT], p_clean=trace.p_clean, p_noised=trace.p_noised,
    seconds=trace.seconds, layers=trace.layers).items()})

# %% [markdown]
# ## 5 · Path patching: extraction heads, and does it support the FLU range?
# 1. **Extraction heads**: each head's corrupted output replaces its clean output only on the
#    *direct* path to the final residual stream. Heads with effect >= HEAD_THRESHOLD move the
#    attribute to the answer position.
# 2. **Lookup MLPs**: each earlier MLP's change under corruption (corrupted minus clean output, at
#    the subject's tokens) is added to the residual stream entering the lowest extraction-head
#    layer, skipping the blocks in between. From there the run continues, so every later block
#    reads the change, not only the extraction heads: the effect measures what the MLP sends to
#    the extraction layer *and everything after it*. The MLPs with effect >= FLU_THRESHOLD are the
#    variant `flu_pp` (the workbook's earlier FLU).
#
# The FLU localization itself is the probe range of section 2 for sports (the paper's "manual"
# MLPs). CounterFact has no probe here, so its FLU is the path-patching selection (the paper also
# chose its CounterFact MLPs by path patching).

# %%
flu = {t: lz.flu_search(model, f.subset(range(min(FLU_FACTS, len(f)))), FLU_THRESHOLD, HEAD_THRESHOLD,
                        batch_size=64, backend=BACKEND, seed=SEED, layers=(FLU_LAYERS or {}).get(t),
                        progress=True) for t, f in facts.items()}
for t, r in flu.items():
    print(f"{t}: FLU MLP layers {r.layers} (threshold {r.threshold}); extraction heads "
          f"{r.extraction_heads} -> receiver layer {r.extraction_layer}; {r.seconds:.1f} s, {r.passes}")

# %% [markdown]
# Does path patching support the probe range? The share of the MLPs' positive path-patching
# effect that the FLU range holds (1 = every MLP that feeds the extraction heads is in it):

# %%
flu_layers = {t: (FLU_LAYERS or {}).get(t) or (flu_range if t == "sports" else flu[t].layers) for t in facts}
support = {t: lz.range_support(flu[t].mlp_effect, flu_layers[t]) for t in facts if not flu[t].hand_given}
pd.DataFrame(support).T.assign(flu=[str(flu_layers[t]) for t in support], flu_pp=[str(flu[t].layers) for t in support])

# %%
for t, r in flu.items():
    if not r.hand_given:
        fig = lz.plot_flu(r, f"{t}: FLU path patching")
        save_figure(fig, RESULTS_DIR, STEM, f"{t}_flu_path_patching")
        plt.show()

# %% [markdown]
# Notebook 01 looked at the same circuit with other tools (direct logit attribution, activation
# patching by position, attention to the subject). Do the two notebooks name the same
# extraction heads and lookup MLPs?

# %%
try:
    nb01 = read_metrics(RESULTS_DIR, "01_factual_recall_circuits")
    ours = [f"{l}.{h}" for l, h in flu["sports"].extraction_heads] if "sports" in flu else []
    print(f"01 extraction-head candidates {nb01.get('top_extraction_heads')}; ours (sports) {ours}")
    print(f"01 top MLPs at the last subject token {nb01.get('top_mlp_layers_subject_last')}; "
          f"FLU (sports) {flu['sports'].layers if 'sports' in flu else None}")
    metrics["sports.flu.shares_head_with_01"] = bool(set(nb01.get("top_extraction_heads", [])) & set(ours))
except MissingResultsError as err:
    print(f"no comparison: {err}")

# %% [markdown]
# ## 6 · Same numbers through nnsight
# nnsight is how a user reaches large or remote models. The same AP call through nnsight
# (``model.model.layers[l].self_attn.o_proj`` etc.), and through plain PyTorch hooks on those
# modules (``backend="hf"``), must give the same scores as the TransformerLens hooks; we check on
# a few facts.

# %%
few = facts[TASKS[0]].subset(range(4))
tl_nn = {b: lz.attribution_patching(model, few, backend=b, seed=SEED) for b in lz.BACKENDS}
tl_nn_gap = max(float(np.abs(tl_nn["tl"].scores[k] - tl_nn[b].scores[k]).max())
                for k in lz.AP_KINDS for b in lz.BACKENDS)
print(f"largest |AP score difference| between backends: {tl_nn_gap:.2e}; seconds: "
      + ", ".join(f"{b} {r.seconds:.1f}" for b, r in tl_nn.items()))

# %% [markdown]
# ## 7 · Localizations, parameter-matched to FLU
# FLU trains whole MLPs (gate, up, down) of its layers. CT and AP score a layer's attention by
# |sum of its heads' signed scores| and its MLP by |mlp_in + mlp_out_prenorm| (the MLP's own
# output, before the post-feedforward norm) (CT: |sum of head scores|,
# |MLP score|), rank the units by that and add whole units until the FLU parameter count is
# reached; "_mlp" variants rank MLPs only. `random` draws q, k, v, o, up, down matrices (no
# gate, as the paper) to the same budget; `random_mlps` as many MLP layers as FLU; `nonlocalized`
# every attention and MLP matrix (no norms). `extraction` (the positive control): as many MLPs as
# FLU, from the lowest extraction-head layer on.

# %%
ext_layer = {t: min(l for l, _ in flu[t].extraction_heads) if flu[t].extraction_heads else None for t in facts}
locs = {}
for t in facts:
    few = ct[t].subset(range(min(CT_FEW_FACTS, len(ct[t].per_item["p_clean"]))))
    flu_loc = lz.flu_localization(model, flu[t], t, layers=flu_layers[t], meta=dict(
        start=FLU_START, saturation_layer=saturation if t == "sports" else None, support=support.get(t)))
    variants = {"flu_pp": lz.flu_localization(model, flu[t], t, "flu_pp"),
                "ct_few": lz.localization_from_scores(model, "ct_few", few.layer_scores(), flu_loc.n_params, t,
                                                      meta=dict(info=few.info))}
    locs[t] = lz.all_localizations(model, t, flu_loc, ct[t], ap[t], SEED, ext_layer[t], variants)
    print(f"--- {t}: FLU = {lz.decoder_fraction(model, flu_loc):.1%} of the decoder's attention + MLP weights")
    display(lz.summary_table(locs[t]))

# %% [markdown]
# What each method trains, side by side (rows: matrix kind; columns: layer):

# %%
for t in facts:
    fig, axes = plt.subplots(len(locs[t]), 1, figsize=(10, 1.9 * len(locs[t])), sharex=True)
    for ax, loc in zip(axes, locs[t].values()):
        lz.plot_localization(loc, model.n_layers, ax)
    fig.tight_layout()
    save_figure(fig, RESULTS_DIR, STEM, f"{t}_localizations")
    plt.show()

# %% [markdown]
# Overlap (Jaccard, weighted by parameter count) between the localizations:

# %%
fig, axes = plt.subplots(1, len(facts), figsize=(6.5 * len(facts), 5.2))
for ax, t in zip(np.atleast_1d(axes), facts):
    sns.heatmap(lz.overlap_matrix(locs[t], model), annot=True, fmt=".2f", cmap="viridis", vmin=0,
                vmax=1, ax=ax, cbar=False)
    ax.set_title(f"{t}: Jaccard overlap")
fig.tight_layout()
save_figure(fig, RESULTS_DIR, STEM, "overlap")
plt.show()

# %% [markdown]
# ## 8 · How far does each design choice move the localization?
# Each panel: the per-layer score a choice ranks by, for the default (the paper's) and the
# variant (the workbook's earlier choice), each scaled to its maximum; squares: the layers each
# one trains. AP aggregation (|signed sum| vs sum of |score|), CT from CT_FACTS vs CT_FEW_FACTS
# facts, FLU from the probe range vs the path-patching threshold. The reading under it is
# computed from the localizations.

# %%
PAIRS = {"AP aggregation": ("ap", "ap_abs"), "CT aggregation": ("ct", "ct_abs"), "CT facts": ("ct", "ct_few"),
         "FLU selection": ("flu", "flu_pp"), "OT vs FLU (AP)": ("flu", "ap"), "control vs FLU": ("flu", "extraction")}
t = TASKS[0]
L_, ls = locs[t], {m: locs[t][m].scores["layer_scores"] for m in ("ap", "ap_abs", "ct", "ct_few")}
curves = {"AP: MLP score": {"ap": ls["ap"]["mlp"], "ap_abs": ls["ap_abs"]["mlp"]},
          "AP: attention score": {"ap": ls["ap"]["attn"], "ap_abs": ls["ap_abs"]["attn"]},
          "CT: MLP score": {f"ct ({CT_FACTS} facts)": ls["ct"]["mlp"], f"ct_few ({CT_FEW_FACTS})": ls["ct_few"]["mlp"]},
          "FLU: probe vs path patching": {"name-only probe": np.asarray(probe_acc["name only"]) - 1 / 3,
                                          "MLP path patching": np.zeros(1) if flu[t].hand_given else flu[t].mlp_effect}}
sel = {"AP: MLP score": {"ap": L_["ap"].mlp_layers, "ap_abs": L_["ap_abs"].mlp_layers},
       "AP: attention score": {"ap": L_["ap"].attn_layers, "ap_abs": L_["ap_abs"].attn_layers},
       "CT: MLP score": {k: L_[m].mlp_layers for k, m in zip(curves["CT: MLP score"], ("ct", "ct_few"))},
       "FLU: probe vs path patching": {"name-only probe": L_["flu"].mlp_layers, "MLP path patching": L_["flu_pp"].mlp_layers}}
fig = lz.plot_design_choices(curves, sel, model.n_layers, f"{t}: how far each design choice moves the localization")
save_figure(fig, RESULTS_DIR, STEM, "design_choices")
plt.show()

# %%
design = {t: lz.compare_localizations(PAIRS, locs[t], model.n_layers, model) for t in facts}
for t in facts:
    print(f"--- {t}\n" + "\n".join(lz.design_choice_reading(design[t], model.n_layers)))
design[TASKS[0]].round(2)

# %% [markdown]
# ## 9 · Explore: what does a method localize?
# Pick a method and a fact set. (Under papermill the default renders statically.)

# %%
def show_localization(method=WIDGET_METHOD, task=TASKS[0]):
    lz.plot_localization(locs[task][method], model.n_layers)
    plt.show()


show_localization()
display(widgets.interactive(show_localization, method=widgets.Dropdown(options=list(locs[TASKS[0]]), value=WIDGET_METHOD),
                            task=widgets.Dropdown(options=list(facts), value=TASKS[0])))

# %% [markdown]
# ## 10 · Save for notebook 03
# One JSON file per task and method (the defaults and the variants, so METHODS in 03-05 can name
# any of them) under `RESULTS_DIR/02_localization/localizations/<task>/`:
# parameter names, count, the scores and how it was made. `Localization.load(RESULTS_DIR, task,
# method, model)` checks the file against the model before training.

# %%
saved = [loc.save(RESULTS_DIR) for t in facts for loc in locs[t].values()]
for t in facts:
    back = lz.load_localizations(RESULTS_DIR, t, model)
    assert {m: b.n_params for m, b in back.items()} == {m: l.n_params for m, l in locs[t].items()}
print(f"saved {len(saved)} localizations under {saved[0].parent.parent}")

# %% [markdown]
# ## 11 · How this compares with the paper
# The paper (Gemma-7B, Gemma-2-9B, Llama-3-8B) finds the lookup in early/mid MLPs (Gemma-7B
# layers 2-7, about 7-25% of depth) and OT localizations in late layers (Gemma-7B AP MLPs
# 21-27). Mean layer of each localization's matrices as a fraction of depth (0 = first layer,
# 1 = last), over all its matrices, its MLP matrices and its attention matrices:

# %%
depth = {t: lz.depth_table({m: locs[t][m] for m in ("flu", "ct", "ap", "ct_mlp", "ap_mlp", "random", "extraction")},
                           model.n_layers) for t in facts}
pd.concat(depth, axis=1).round(2)

# %% [markdown]
# The paper's claims, checked on these numbers (True = reproduced here): FLU sits in the first
# half; AP / CT (and their MLP-only variants) sit later than FLU; OT methods train the attention
# of the extraction layers (the paper's explanation of why OT edits do not generalize). Where the
# faithful methods land on this model:

# %%
for t in facts:
    print(f"{t}: " + "; ".join(f"{m} MLPs {lz._ranges(locs[t][m].mlp_layers)} attn {lz._ranges(locs[t][m].attn_layers)}"
                               for m in ("flu", "ap", "ct", "ap_mlp", "ct_mlp", "extraction")))

# %%
claims = {}
for t in facts:
    d, ext = depth[t], {l for l, _ in flu[t].extraction_heads}
    claims[t] = {"flu_first_half": d.loc["flu", "mlp"] < 0.5,
                 "ap_later_than_flu": d.loc["ap", "all"] > d.loc["flu", "all"],
                 "ct_later_than_flu": d.loc["ct", "all"] > d.loc["flu", "all"],
                 "ap_mlp_later_than_flu": d.loc["ap_mlp", "mlp"] > d.loc["flu", "mlp"],
                 "ct_mlp_later_than_flu": d.loc["ct_mlp", "mlp"] > d.loc["flu", "mlp"],
                 "ot_trains_extraction_attention": bool(ext & set(locs[t]["ap"].attn_layers
                                                                  + locs[t]["ct"].attn_layers))}
pd.DataFrame(claims)

# %% [markdown]
# *Predict:* on a model of 18 layers, will AP's and CT's localizations sit later than FLU's?
#
# **How to read it against the paper.** The paper's FLU MLPs sit early (Gemma-7B: 2-7) and its OT
# localizations land late (Gemma-7B AP MLPs 21-27). Check, in the `claims` table above: is FLU's
# mean depth below the OT methods'? Do AP/CT train the extraction layers' attention (the heads
# of section 5)? Do the *MLP-only* OT variants sit later than FLU, or do they pick the early
# lookup MLPs too (CT restores the answer by patching them, so it often does on a small model)?
# And how well does AP agree with real patching (`agreement`): a linear estimate can miss the
# early lookup MLPs, which is exactly what FLU picks. The README's Results section records what
# the reference run on gemma-3-270m found.

# %% [markdown]
# ## 12 · Metrics
# Keys written to `RESULTS_DIR/02_localization/metrics.json` (`<task>` is `sports` or
# `counterfact`; `<method>` one of flu, ct, ap, ct_mlp, ap_mlp, random, random_mlps, all_mlps,
# nonlocalized, extraction and the variants flu_pp, ap_abs, ct_abs, ct_few):
#
# * `<task>.<method>.mlp_layers` / `.attn_layers` (lists: the layers a method trains), `.n_params`, `.n_matrices`,
#   `.seconds`, `.forward_passes`, `.backward_passes`, `.forward_sequences` (cost of making it:
#   0 for baselines; FLU = path patching, probes counted separately)
# * `<task>.n_facts` (AP), `<task>.ct.n_facts`, `<task>.ct.noise_samples`, `<task>.ct.noise_scale`,
#   `<task>.ct.p_clean`, `<task>.ct.p_corrupt`, `<task>.ap.n_facts`, `<task>.ap.ld_clean`,
#   `<task>.ap.ld_corrupt`, `<task>.flu.n_facts`
# * `<task>.ap.agreement.pearson` / `.spearman` / `.n_components` / `.components` (AP vs real
#   activation patching)
# * `<task>.ct.layer_attn` / `.layer_mlp`, `<task>.ap.layer_attn` / `.layer_mlp` (per-layer
#   scores the ranking uses, the paper's |signed sum|) and `<task>.ap_abs.*` / `<task>.ct_abs.*`
#   (sum of |score|); `<task>.ct.noise_rule`, `<task>.ap.corruption_length_mismatch`
# * `sports.probe.saturation_layer` (where the name-only probe saturates, by
#   `sports.probe.saturation_rule` with `sports.probe.saturation_tol`; section 2),
#   `sports.probe.saturation_layer_max_rule`, `sports.flu.start`, `<task>.flu.decoder_fraction`
#   (FLU parameters / all attention + MLP matrices), `<task>.flu.support.share_of_positive` /
#   `.effect_inside` / `.effect_outside` (path patching of the FLU range),
#   `<task>.extraction_heads.min_layer` (lowest layer holding an extraction head; also
#   `sports.extraction_heads.min_layer`)
# * `<first task>.token_trace.fact` / `.p_clean` / `.p_noised` / `.seconds` / `.layers` and
#   `.<kind>.best_layer` / `.best_p` (ROME's per-token trace of one fact, end of section 4; kind
#   resid_pre and mlp_out at the last subject token, attn_out at the final token)
# * `<task>.design.<choice>.jaccard` / `.depth_shift` (section 8; choice names with spaces as `_`)
# * `<task>.flu.threshold`, `.head_threshold`, `.extraction_layer`, `.extraction_heads` ("l.h"),
#   `.mlp_effect`, `.hand_given`, `<task>.budget` (= FLU parameter count)
# * `<task>.depth.<method>.all` / `.mlp` / `.attn` (mean layer of the localization's matrices /
#   (n_layers - 1); flu, ct, ap, ct_mlp, ap_mlp, random)
# * `<task>.claim.<name>` (booleans, section 10): `flu_first_half` (FLU's mean MLP depth < 0.5),
#   `ap_later_than_flu` / `ct_later_than_flu` (all matrices), `ap_mlp_later_than_flu` /
#   `ct_mlp_later_than_flu`, `ot_trains_extraction_attention` (AP or CT trains the attention of
#   a layer holding an extraction head)
# * `sports.probe.full_prompt`, `sports.probe.name_only` (accuracy per layer),
#   `sports.probe.n_athletes`, `sports.probe.folds`, `sports.probe.seconds`,
#   `sports.probe.forward_passes`, `sports.probe.forward_sequences`
# * `ratio_ct_over_ap.<task>.seconds` / `.forward_sequences` (as run: CT on fewer facts) and
#   `.seconds_per_fact` / `.forward_sequences_per_fact`, `tl_vs_nnsight.ap_max_abs_diff`
#   (largest AP score difference between the TL, nnsight and plain-hook paths),
#   `sports.flu.shares_head_with_01` (only when notebook 01's metrics exist), `n_layers`,
#   `seconds_total`

# %%
for t in facts:
    metrics.update(lz.task_metrics(t, locs[t], ap[t], ct[t], flu[t], agreement[t]))
    metrics[f"{t}.flu.head_threshold"] = HEAD_THRESHOLD
    metrics[f"{t}.flu.n_facts"] = min(FLU_FACTS, len(facts[t]))
    metrics.update({f"{t}.depth.{m}.{b}": float(v) for m, row in depth[t].iterrows()
                    for b, v in row.items() if np.isfinite(v)})
    metrics.update({f"{t}.claim.{k}": bool(v) for k, v in claims[t].items()})
    metrics[f"{t}.flu.decoder_fraction"] = lz.decoder_fraction(model, locs[t]["flu"])
    metrics.update({f"{t}.flu.support.{k}": v for k, v in support.get(t, {}).items()})
    metrics[f"{t}.extraction_heads.min_layer"] = ext_layer[t]
    for choice, r in design[t].iterrows():
        key = f"{t}.design.{choice.replace(' ', '_')}"
        metrics.update({f"{key}.jaccard": float(r["jaccard"]), f"{key}.depth_shift": float(r["depth shift"])})

# %%
metrics.update({"sports.probe.full_prompt": probe_acc["full prompt"], "sports.probe.name_only": probe_acc["name only"],
                "sports.probe.n_athletes": len(names), "sports.probe.folds": folds,
                "sports.probe.saturation_layer": saturation, "sports.probe.saturation_tol": SATURATION_TOL,
                "sports.probe.saturation_rule": SATURATION_RULE, "sports.probe.saturation_layer_max_rule": sat_max,
                "sports.flu.start": FLU_START,
                "sports.probe.seconds": probe_seconds, "sports.probe.forward_passes": probe_counter.forward,
                "sports.probe.forward_sequences": probe_counter.forward_sequences,
                "tl_vs_nnsight.ap_max_abs_diff": tl_nn_gap, "n_layers": model.n_layers,
                "seconds_total": time.perf_counter() - t_start})
write_metrics(RESULTS_DIR, STEM, metrics)
print(f"{len(metrics)} metrics written; total {metrics['seconds_total']:.0f} s")
