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
# # 01 · How does the model recall "Michael Jordan plays the sport of ... basketball"?
#
# Before we can *unlearn* a fact we should know where it lives. This notebook opens up
# factual recall in the model with four standard tools, each asking a different question:
#
# | tool | question |
# |---|---|
# | **logit lens** | at which layer does the answer become readable at the final token? |
# | **direct logit attribution (DLA)** | which heads and MLPs *write* the answer into the output? |
# | **activation patching** | which (layer, position) activations *carry* the fact? |
# | **attention to the subject** | which heads *move* information from the athlete's name to the final token? |
#
# The paper (Guo et al. 2024) builds on a two-stage story of factual recall: early/mid **MLPs at
# the subject's tokens look up** the attribute (the fact-lookup, FLU, mechanism) and later
# **attention heads extract** it to the final token. Output-tracing methods mostly find the
# second stage; the paper's robust edits target the first. We check that story on our model.
#
# Everything heavy lives in `mechunlearn_utils.interp` (lens, patching, heads; plots in
# `viz.circuits_plots`), tested on a tiny model; the cells
# here are short on purpose. Run notebook 00 first: it chooses the athletes the model knows.
#
# **You will learn** to
# * read a model's residual stream with the logit lens (exercise: write it with `run_with_cache`);
# * split the output into per-component contributions (DLA) and say what it cannot see;
# * patch activations between a clean and a corrupted prompt (exercise: write the hook), and read
#   where a fact is looked up and where it is moved;
# * find candidate extraction heads from attention, DLA and head patching together.
#
# **Time:** about 60 minutes with the exercises; the run takes about 2 minutes on a 2-core CPU.
# Terms: [glossary](../docs/glossary.md).

# %% tags=["parameters"]
MODEL = "gemma-3-270m"
DEVICE = "auto"
DTYPE = "float32"  # exact: 00-02 decide which facts are known and where they sit (README: Precision)
SEED = 0
SMOKE = False  # True: a handful of athletes, for CI
RESULTS_DIR = ""  # "" -> <repo>/results
N_ATHLETES = 60  # how many known athletes to analyse (SMOKE uses 6)
SOLUTIONS = True  # False: write the exercises yourself (fill the ... stubs)

# %%
import time

import numpy as np
import pandas as pd

from mechunlearn_utils import interp as C
from mechunlearn_utils.viz import circuits_plots as V
from mechunlearn_utils import load_model
from mechunlearn_utils.workbook.notebook import known_athletes, start
from mechunlearn_utils.data.prompts import SPORTS, sport_prompt
from mechunlearn_utils.workbook.results import save_figure, write_metrics

STEM = "01_factual_recall_circuits"
t_start = time.perf_counter()
RESULTS_DIR = start(SEED, RESULTS_DIR)
model = load_model(MODEL, DEVICE, dtype=DTYPE)
metrics = {"model": MODEL, "seed": SEED, "smoke": SMOKE,
           "n_layers": model.n_layers, "n_heads": model.n_heads}

# %% [markdown]
# ## 1 · The athletes, and one example
# We take athletes the model knows (from notebook 00), balanced over the three sports, with
# Michael Jordan first: he is our running example. `N_GRID` of them also get the full
# layer x position patching sweep, the most expensive analysis here.

# %%
n_athletes = 6 if SMOKE else N_ATHLETES
N_GRID = 2 if SMOKE else 12
known = known_athletes(RESULTS_DIR)
athletes = C.select_athletes(known, n_athletes, seed=SEED)
sport_ids = {s: model.answer_token_id(" " + s) for s in SPORTS}
prompts = [sport_prompt(a) for a in athletes.athlete]
answers = [sport_ids[s] for s in athletes.sport]
others = [[i for i in sport_ids.values() if i != a] for a in answers]
print(f"{len(athletes)} athletes:", athletes.sport.value_counts().to_dict())
athletes.head(6)

# %% [markdown]
# The prompt is the paper's one-shot format. Here it is token by token: note the `<bos>` token
# (Gemma needs it) and that the athlete's name is several tokens.

# %%
EXAMPLE = athletes.athlete.iloc[0]
example_prompt = prompts[0]
example_tokens = C.token_labels(model, model.encode(example_prompt))
print(example_prompt)
print(list(enumerate(example_tokens)))
print("subject positions:", model.subject_positions(example_prompt, EXAMPLE))

# %% [markdown]
# ## 2 · Logit lens: when does the answer appear?
# The residual stream at the final token is the model's running "draft" of its next-token
# prediction. The logit lens decodes it after every block with the model's own final norm and
# unembedding, as if the remaining blocks were skipped. We track the probability of the right
# sport (over the whole 262k vocabulary) and normalized over the three sports (chance = 1/3).

# %%
lens = C.logit_lens(model, prompts, answers, list(sport_ids.values()))
by_layer = lens.groupby("layer").agg(p_correct=("p_correct", "mean"), p_norm=("p_norm", "mean"),
                                     top1=("rank_correct", lambda r: (r == 0).mean()),
                                     candidate_acc=("candidate_top", "mean"),
                                     median_rank=("rank_correct", "median"))
by_layer.round(3).T

# %% [markdown]
# What does the lens read for our example at each layer? (`top_token` is the single most likely
# next token if we stopped after that layer.)

# %%
lens[lens.prompt == 0][["layer", "top_token", "rank_correct", "p_correct", "p_norm"]].round(3).T

# %%
fig = V.plot_logit_lens(lens, highlight=lens[lens.prompt == 0], label=EXAMPLE)
save_figure(fig, RESULTS_DIR, STEM, "logit_lens")
first_top1 = next((int(l) for l, v in by_layer.top1.items() if v >= 0.5), -1)
print(f"first layer where the right sport is the top-1 token for >= half the athletes: {first_top1}")
print(f"final layer: p_norm {by_layer.p_norm.iloc[-1]:.3f}, p_correct {by_layer.p_correct.iloc[-1]:.3f}; "
      f"p_correct peaks at layer {by_layer.p_correct.idxmax()} ({by_layer.p_correct.max():.3f})")
mid = model.n_layers // 2
print(f"middle layer {mid}: median rank of the right sport {by_layer.median_rank[mid]:.0f}, "
      f"p_norm {by_layer.p_norm[mid]:.2f} (chance 0.33)")

# %% [markdown]
# ### Exercise · a logit lens with `run_with_cache`
# Write `my_logit_lens(model, prompt, answer_id)`: an array with, for every layer, the probability
# (softmax over the whole vocabulary) of `answer_id` when the residual stream after that block
# (`blocks.{l}.hook_resid_post`) at the **final** token is decoded as if it were the last layer.
# The check compares it with `C.logit_lens` on our example.
#
# *Hint:* `_, cache = model.tl.run_with_cache(ids)` with `ids = torch.tensor([model.encode(prompt)])`.
# The model's own decoding is its final norm `model.hf.model.norm`, then the unembedding
# (`unembed(model, x)` from `mechunlearn_utils.core.logits`: `lm_head` with Gemma's soft-cap).
# Forgetting the norm is the classic mistake: try it and see what the check says.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_logit_lens(model, prompt, answer_id):
#     ids = torch.tensor([model.encode(prompt)], device=model.device)
#     with torch.no_grad():
#         _, cache = model.tl.run_with_cache(ids)
#         resid = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1] for l in range(model.n_layers)])
#         logits = unembed(model, model.hf.model.norm(resid)).float()
#     return torch.softmax(logits, -1)[:, answer_id].cpu().numpy()
# ```
# </details>

# %%
import torch  # noqa: E402

from mechunlearn_utils.core.logits import unembed  # noqa: E402,F401 - for your solution
from mechunlearn_utils.workbook.exercises import check_logit_lens, check_patch_hook  # noqa: E402


def my_logit_lens(model, prompt, answer_id):
    ...  # your code: an array [n_layers] of p(answer)


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_logit_lens as my_logit_lens
check_logit_lens(my_logit_lens, model, example_prompt, answers[0])

# %% [markdown]
# *Predict:* at which depth (first third, middle, last third) do you expect the right sport to
# become readable at the final token? Will the last layers raise or lower its probability?
#
# **Reading it.** Compare with the printouts above. Where the middle layer's median rank is in
# the hundreds and its p_norm near 1/3, whatever the model knows about the athlete is not yet *at
# the final token* in a form the unembedding can read. The first layer where the right sport is
# top-1 marks its arrival; if the final p_correct is below the peak, the last layers *lower* the
# probability again (calibration rather than recall). The logit lens cannot say where the fact
# was looked up, only when it arrives at the output position; the next tools can.

# %% [markdown]
# ## 3 · Direct logit attribution: who writes the answer?
# The final residual is a sum of the embeddings, every attention head's output and every
# MLP's output, so the logit difference (right sport minus the mean of the other two) splits
# into one number per component. Gemma-3 normalizes each attention / MLP output (a post-norm)
# and the final sum (final RMSNorm); we freeze those norm scales at their values on this run,
# which makes the split exact at this input (the check below) but measures *direct* effects
# only: a component that helps through later layers gets no credit here.

# %%
dla = C.direct_logit_attribution(model, prompts, answers, others)
gap = (dla.groupby("prompt").dla.sum() - dla.groupby("prompt").logit_diff.first()).abs().max()
print(f"mean logit difference {dla.groupby('prompt').logit_diff.first().mean():.2f}; "
      f"components sum to it within {gap:.1e}")
dla_mat = C.dla_matrix(dla)
fig = V.plot_layer_by_head(dla_mat, f"DLA (mean over {len(prompts)} athletes)", "logit diff", center=0)
save_figure(fig, RESULTS_DIR, STEM, "dla_heatmap")

# %% [markdown]
# The largest direct writers, averaged over athletes:

# %%
top_dla = (dla.groupby("component").dla.agg(["mean", "std"]).sort_values("mean", key=abs, ascending=False))
top_dla.head(8).round(3)

# %%
parts = dla_mat[["attn", "mlp"]].abs()
late_share = parts[parts.index >= max(first_top1, 0)].to_numpy().sum() / parts.to_numpy().sum()
print(f"share of |direct effect| from layer {first_top1} (answer readable) on: {late_share:.0%}; "
      f"most negative component {top_dla['mean'].idxmin()} ({top_dla['mean'].min():.2f}); "
      f"MLPs 0-3 together {dla_mat['mlp'].iloc[:4].sum():.2f}")

# %% [markdown]
# *Predict:* will the early MLPs, where the paper says the fact is looked up, have a large direct
# effect on the output?
#
# **Reading it.** Check the printout: if most of the direct effect comes from the layers where
# the logit lens saw the answer appear, and a few heads dominate the table, the answer is written
# late. A negative component pushes *against* the answer, which would fit a drop in probability
# over the last layers. If the early MLPs write little directly, they can still matter
# *indirectly*, through later layers: that is what patching measures.

# %% [markdown]
# ## 4 · Activation patching: where is the fact carried?
# Run the model on a **corrupt** prompt (another athlete, of another sport, whose name has as
# many tokens), then copy one activation from the **clean** run into it. If that single
# activation brings back the clean answer, it carries the fact. We report the normalized logit
# difference: 0 = the corrupt run's behaviour, 1 = the clean run's. Positions before the name
# are identical in both prompts, so patching them does exactly nothing (shown as 0).
#
# <details><summary>Patching variants: which one is this, and what the others test</summary>
#
# * **Denoising vs noising.** *Denoising* (here) copies a clean activation into the corrupted run
#   and asks whether it is *sufficient* to bring the answer back. *Noising* copies a corrupted
#   activation into the clean run and asks whether the component is *necessary* (does breaking it
#   break the answer?). They can disagree: a fact spread over redundant components survives
#   noising any one of them, and no single one restores it under denoising. `direction="noise"`
#   runs the other one; notebook 02 checks attribution patching against it.
# * **Three corruptions.** (1) *Another athlete* of another sport with as many tokens (here): a
#   natural input, the answer changes to a real alternative. (2) *Gaussian noise* on the subject's
#   embeddings (causal tracing, notebook 02; ROME's choice): no real input looks like this, so
#   it can overstate effects, but it needs no partner prompt. (3) *Random tokens* in place of
#   the subject (attribution patching in the paper's code): destroys the name without choosing a
#   new sport.
# * **Causal tracing vs ROME's per-token trace.** The workbook's CT (notebook 02) restores one
#   component's output at *every* position at once, so it scores a layer; ROME restores one
#   (layer, token) at a time, which is the per-position heatmap below (with another athlete
#   instead of noise), and is what shows the last subject token. Notebook 02 (end of section 4)
#   draws ROME's trace itself, with the Gaussian noise (`localize.causal_trace_tokens`).
# * **MLP0.** In Gemma-like models the first MLP behaves like an extension of the embedding: it
#   transforms each token on its own. Restoring MLP0 at the subject's tokens restores the name
#   itself, so a large MLP0 score says "the subject's tokens matter", not "MLP0 looks the sport up".
# </details>

# %%
pairs = C.corruption_pairs(model, athletes, pool=known, seed=SEED)
print(f"{len(pairs)} clean/corrupt pairs ({pairs.attrs['n_unpaired']} athletes without a partner "
      "of equal token length)")
pairs[["athlete", "sport", "corrupt_athlete", "corrupt_sport", "n_tokens"]].head(6)

# %% [markdown]
# First the full layer x position sweep for our example, for three components: the residual
# stream entering each layer (`resid_pre`), each MLP's output and each attention layer's output.

# %%
ex = pairs.iloc[0]
ex_result = C.activation_patching(model, ex.clean_prompt, ex.corrupt_prompt, ex.answer_id, ex.other_ids,
                                  direction="denoise")  # clean into corrupt: 0 corrupt .. 1 clean
print(f"{ex.athlete} vs {ex.corrupt_athlete}: logit diff clean {ex_result.clean_logit_diff:.2f}, "
      f"corrupt {ex_result.corrupt_logit_diff:.2f}")
fig = V.plot_patching_heatmaps(ex_result.scores, ex_result.tokens,
                               f"{ex.athlete} (clean) patched into {ex.corrupt_athlete} (corrupt)")
save_figure(fig, RESULTS_DIR, STEM, "patching_example")

# %% [markdown]
# ### Exercise · a denoising hook
# Write `my_patch_hook(clean_value, position)`: it returns a TransformerLens hook
# `hook(activation, hook)` that replaces the activation at `position` (for every batch row) by
# `clean_value` at that position and returns the result. The check runs it on `resid_pre` at a
# few layers of our example pair (`model.tl.run_with_hooks(corrupt_ids, fwd_hooks=[(name, hook)])`)
# and compares the restoration with `C.activation_patching`.
#
# *Hint:* activations are `[batch, position, d_model]`; clone before writing into one.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_patch_hook(clean_value, position):
#     def hook(activation, hook):
#         activation = activation.clone()
#         activation[:, position] = clean_value[:, position]
#         return activation
#     return hook
# ```
# </details>

# %%
def my_patch_hook(clean_value, position):
    ...  # your code: return a function hook(activation, hook) -> the patched activation


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_patch_hook as my_patch_hook
check_patch_hook(my_patch_hook, model, ex.clean_prompt, ex.corrupt_prompt, ex.answer_id, list(ex.other_ids),
                 int(ex.subject_positions[-1]), layers=range(0, model.n_layers, 4))

# %% [markdown]
# The same sweep for `N_GRID` athletes, lined up by the *role* of each position (the shared
# prefix, the first / middle / last subject token, then the template words) and averaged.

# %%
grid_pairs = pairs.head(N_GRID)
grid = {ex.athlete: ex_result}  # computed above; the others in one batched call
grid.update(zip(grid_pairs.athlete[1:], C.activation_patching_many(model, grid_pairs.iloc[1:])))
roles = [C.position_roles(grid[p.athlete].tokens, p.subject_positions) for p in grid_pairs.itertuples()]
aligned = {c: C.align_by_role([grid[a][c] for a in grid], roles) for c in ("resid_pre", "mlp_out", "attn_out")}
subject_cols = [c for c in aligned["resid_pre"].columns if not c[0].isdigit()]
fig = V.plot_patching_heatmaps({c: t[subject_cols].to_numpy() for c, t in aligned.items()}, subject_cols,
                               f"Mean over {len(grid)} athletes, positions aligned by role")
save_figure(fig, RESULTS_DIR, STEM, "patching_aligned")

# %% [markdown]
# (Only positions from the subject on are drawn: the prefix columns are all exactly 0.)
#
# ### Per-layer restoration at the two key positions, over all athletes
# The sweep shows two hot spots: the **last subject token** and the **final token**. We patch
# just those sites for every athlete: the MLP output and the residual at the last subject
# token, and the attention output and the residual at the final token.

# %%
sites = C.patch_sites(model, pairs, precomputed=grid)
curves = {(c, s): C.restore_by_layer(sites, c, s) for c, s in C.DEFAULT_SITES}
fig = V.plot_restore_curves(sites, f"Restoration by layer ({len(pairs)} athletes)")
save_figure(fig, RESULTS_DIR, STEM, "restore_by_layer")
pd.DataFrame({f"{c} @ {s}": v for (c, s), v in curves.items()}).round(2).T

# %%
mlp_curve = curves[("mlp_out", "subject_last")]
resid_subj, resid_final = curves[("resid_pre", "subject_last")], curves[("resid_pre", "final")]
top_mlp_layers = [int(l) for l in np.argsort(-mlp_curve)[:3]]
handoff = next((l for l in range(model.n_layers) if resid_final[l] > resid_subj[l]), -1)
print(f"MLPs at the last subject token, top layers: {top_mlp_layers} "
      f"(restore {np.round(mlp_curve[top_mlp_layers], 2).tolist()})")
print(f"MLP layers restoring > 0.1 at the last subject token: {np.flatnonzero(mlp_curve > 0.1).tolist()}")
print(f"residual at the last subject token restores up to {resid_subj.max():.2f}; the final token's "
      f"residual takes over at layer {handoff} (restore there {resid_final[handoff]:.2f})")
print(f"attention output at the final token: largest at layer {int(np.argmax(curves[('attn_out', 'final')]))} "
      f"({curves[('attn_out', 'final')].max():.2f})")

# %% [markdown]
# *Predict:* if the FLU story holds, at which layers should a single MLP output at the last
# subject token restore the answer, and at which layer should the final token take over?
#
# **Reading it.** Read the printout against the FLU story. If single early MLP outputs at the
# **last subject token** restore a large share of the answer and later MLPs almost nothing, the
# attribute is looked up early, at the subject. Discount MLP0 (see the explainer above: it acts
# as an extended embedding of the name), and ask whether MLPs 1-3 still restore on their own. The
# residual at the last subject token carries the fact until the "handoff" layer, where the final
# token's residual takes over; if the attention output at the final token is largest just before
# it, that layer's attention *moves* the fact from the name to the final token.

# %% [markdown]
# ## 5 · Attention from the final token to the subject
# Which heads look at the athlete's name when the model predicts the sport? We sum each head's
# attention from the final token over the subject's tokens.

# %%
attention = C.attention_to_subject(model, prompts, list(athletes.athlete))
fig = V.plot_layer_by_head(pd.DataFrame(attention.mean(0)).rename(columns=lambda h: f"H{h}"),
                           "Attention from the final token to the subject", "attention")
save_figure(fig, RESULTS_DIR, STEM, "attention_to_subject")
best = np.unravel_index(attention.mean(0).argmax(), attention.shape[1:])
print(f"most subject-focused head: {best[0]}.{best[1]} ({attention.mean(0).max():.2f} of its attention)")

# %% [markdown]
# ## 6 · Candidate extraction heads
# An extraction head should (a) attend from the final token to the subject and (b) write the
# right answer into the output (positive DLA). As causal evidence we also patch each head's
# output at the final token alone (clean into corrupt), for every athlete.

# %%
head_restore = C.head_patching_many(model, pairs)  # [athlete, layer, head]
heads = C.extraction_heads(dla, attention, head_restore)
fig = V.plot_layer_by_head(pd.DataFrame(head_restore.mean(0)).rename(columns=lambda h: f"H{h}"),
                           "Patching one head's output at the final token", "restore", center=0)
save_figure(fig, RESULTS_DIR, STEM, "head_patching")
heads.head(8).round(3)

# %% [markdown]
# *Predict:* should the best extraction head sit before, at or after the handoff layer above?
#
# **Reading it.** Look at the top of the table: does one head score on all three counts (attends
# to the name, writes the sport directly, restores much of the answer alone when patched)? Is its
# layer the one where the logit lens saw the answer appear and where the final-token attention
# output restored the fact? If so, the extraction stage is largely one head; section 8 prints it.

# %% [markdown]
# ## 7 · Explore: pick an athlete
# The dropdown runs the patching sweep for any athlete (a few seconds each) and draws the same
# heatmaps. Under papermill only the default athlete (already computed above) is drawn.

# %%
V.athlete_heatmap_widget(model, pairs, precomputed=grid)

# %% [markdown]
# ## 8 · Compared with the paper
# First the numbers this comparison rests on, from the runs above:

# %%
lookup = np.flatnonzero(mlp_curve > 0.1).tolist()
print(f"lookup: MLPs at the last subject token restoring > 0.1 alone: layers {lookup} of {model.n_layers}")
print(f"handoff to the final token: layer {handoff}; answer readable (logit lens) from layer {first_top1}")
if len(heads[heads.candidate]):
    h = heads[heads.candidate].iloc[0]
    print(f"extraction: head {h.head_name} (attention to subject {h.attention_to_subject:.2f}, "
          f"DLA {h.mean_dla:.2f} of a mean logit diff {dla.logit_diff.mean():.2f}, patched alone "
          f"restores {h.patch_restore:.2f})")

# %% [markdown]
# * **Lookup (FLU).** The paper's FLU MLPs were early layers: 2-7 of Gemma-7B (28 layers), 2-6 of
#   Gemma-2-9B (42), 1-4 of Llama-3-8B (32) for the sports facts. In gemma-3-270m (18 layers)
#   the MLPs that restore the answer at the last subject token are likewise among the first
#   layers (printed above): the same early lookup, at the same place (the subject's last token).
#   MLP0 is the exception to read with care: it acts as an extended embedding (the paper's FLU
#   ranges, too, start at MLP 1 or 2, not 0).
# * **Extraction.** The paper finds later attention heads (and MLPs) moving the attribute to the
#   output; output-tracing localizations landed in late layers (e.g. Gemma-7B attribution
#   patching: MLPs 21-27). Here one attention layer, and within it mainly one head, does most of
#   the moving, in the layer where the logit lens first reads the answer.
# * **Why it matters for unlearning.** DLA and final-token patching (output-tracing views) point
#   at the extraction head and the late layers; only patching at the subject's position points
#   at the early MLPs. Notebook 02 compares these localizations, and 03 edits each.

# %% [markdown]
# ## 9 · Metrics
# Keys written to `RESULTS_DIR/01_factual_recall_circuits/metrics.json` ("by_layer" lists have
# one value per layer; restore = normalized logit difference, 0 corrupt, 1 clean; means over
# athletes):
#
# * `n_layers`, `n_heads`, `n_athletes` (analysed), `n_pairs` (with a corrupt partner), `n_grid_athletes`
# * `logit_lens_p_norm_by_layer`, `logit_lens_p_correct_by_layer`, `logit_lens_top1_frac_by_layer`
#   (fraction of athletes whose right sport is the top-1 token), `logit_lens_candidate_acc_by_layer`
#   (right sport beats the other two); `logit_lens_first_layer_top1` (first layer where the top-1
#   fraction >= 0.5, -1 if never); `logit_lens_final_p_norm`, `logit_lens_final_p_correct`
# * `dla_logit_diff_mean`, `dla_decomposition_max_error` (|sum of components - logit diff|),
#   `dla_embed_mean`, `dla_attn_by_layer`, `dla_mlp_by_layer`, `dla_top_components` (5 names, by |mean|)
# * `mlp_subject_last_restore_by_layer`, `resid_subject_last_restore_by_layer`,
#   `attn_final_token_restore_by_layer`, `resid_final_token_restore_by_layer`;
#   `top_mlp_layers_subject_last` (3 layers, best first); `resid_handoff_layer` (first layer where
#   the final-token residual restores more than the last-subject-token residual)
# * `clean_logit_diff_mean`, `corrupt_logit_diff_mean` (of the patching pairs)
# * `attention_to_subject_max` (largest mean attention of a head from the final token to the subject),
#   `attention_to_subject_argmax` ("L.H")
# * `top_extraction_heads` (3 candidates "L.H", best first), `top_extraction_head_dla`,
#   `top_extraction_head_attention`, `top_extraction_head_patch_restore`, `head_patch_restore_max`
# * `seconds_total`

# %%
metrics.update({
    "n_athletes": len(athletes), "n_pairs": len(pairs), "n_grid_athletes": len(grid),
    "logit_lens_p_norm_by_layer": by_layer.p_norm.tolist(),
    "logit_lens_p_correct_by_layer": by_layer.p_correct.tolist(),
    "logit_lens_top1_frac_by_layer": by_layer.top1.tolist(),
    "logit_lens_candidate_acc_by_layer": by_layer.candidate_acc.tolist(),
    "logit_lens_first_layer_top1": first_top1,
    "logit_lens_final_p_norm": by_layer.p_norm.iloc[-1], "logit_lens_final_p_correct": by_layer.p_correct.iloc[-1],
    "dla_logit_diff_mean": dla.groupby("prompt").logit_diff.first().mean(),
    "dla_decomposition_max_error": gap, "dla_embed_mean": dla[dla.kind == "embed"].dla.mean(),
    "dla_attn_by_layer": dla_mat["attn"].tolist(), "dla_mlp_by_layer": dla_mat["mlp"].tolist(),
    "dla_top_components": top_dla.index[:5].tolist(),
})

# %%
top = heads[heads.candidate].head(3)
metrics.update({
    "mlp_subject_last_restore_by_layer": mlp_curve.tolist(),
    "resid_subject_last_restore_by_layer": resid_subj.tolist(),
    "attn_final_token_restore_by_layer": curves[("attn_out", "final")].tolist(),
    "resid_final_token_restore_by_layer": resid_final.tolist(),
    "top_mlp_layers_subject_last": top_mlp_layers, "resid_handoff_layer": handoff,
    "clean_logit_diff_mean": sites.clean_logit_diff.mean(), "corrupt_logit_diff_mean": sites.corrupt_logit_diff.mean(),
    "attention_to_subject_max": attention.mean(0).max(), "attention_to_subject_argmax": f"{best[0]}.{best[1]}",
    "top_extraction_heads": top.head_name.tolist(),
    "top_extraction_head_dla": top.mean_dla.iloc[0] if len(top) else 0.0,
    "top_extraction_head_attention": top.attention_to_subject.iloc[0] if len(top) else 0.0,
    "top_extraction_head_patch_restore": top.patch_restore.iloc[0] if len(top) else 0.0,
    "head_patch_restore_max": head_restore.mean(0).max(),
})
metrics["seconds_total"] = time.perf_counter() - t_start
write_metrics(RESULTS_DIR, STEM, metrics)
print(f"done in {metrics['seconds_total']:.0f} s")
