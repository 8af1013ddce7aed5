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

# %% tags=["parameters"]
MODEL = "gemma-3-270m"
DEVICE = "auto"
SEED = 0
SMOKE = False  # True: a handful of athletes, for CI
RESULTS_DIR = ""  # "" -> <repo>/results
N_ATHLETES = 60  # how many known athletes to analyse (SMOKE uses 6)

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
model = load_model(MODEL, DEVICE)
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

# %% [markdown]
# **Reading it.** Through the early and middle layers the right sport is buried hundreds to
# thousands of ranks deep and the three-way probability sits at chance: whatever the model
# knows about the athlete is not yet *at the final token* in a form the unembedding can read.
# Then, within one or two layers (the printout above says which), the right sport jumps to rank
# 0. In gemma-3-270m the last few layers then *lower* the probability again (compare the peak
# with the final layer above): they calibrate rather than recall. The logit lens cannot say
# where the fact was looked up, only when it arrives at the output position; the next tools can.

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

# %% [markdown]
# **Reading it.** Almost all of the direct effect comes from the late layers, from the layer where
# the logit lens saw the answer appear onwards; a few attention heads dominate, and at least one
# later head pushes *against* the answer (a negative mean in the table), which fits the drop in
# probability over the last layers. Early MLPs write almost nothing directly to the output: if
# they matter, it is indirectly, which is what patching measures.

# %% [markdown]
# ## 4 · Activation patching: where is the fact carried?
# Run the model on a **corrupt** prompt (another athlete, of another sport, whose name has as
# many tokens), then copy one activation from the **clean** run into it. If that single
# activation brings back the clean answer, it carries the fact. We report the normalized logit
# difference: 0 = the corrupt run's behaviour, 1 = the clean run's. Positions before the name
# are identical in both prompts, so patching them does exactly nothing (shown as 0).

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
# **Reading it.** Patching a single early MLP output at the **last subject token** brings back a
# large share of the right answer, while the same MLPs in later layers do almost nothing: the
# attribute is looked up early, at the subject, as in the FLU story. The residual stream at the
# last subject token keeps carrying the fact through the middle layers, until, at the "handoff"
# layer printed above, the final token's residual takes over. The attention output at the final
# token just before the handoff restores almost everything on its own: that layer's attention
# *moves* the fact from the name to the final token.

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
# **Reading it.** The top of the table is a head that scores on all three counts: it attends to
# the name, writes the sport directly, and alone restores most of the answer when patched. It
# sits in the layer where the logit lens saw the answer appear and where the final-token
# attention output restored the fact: this is the extraction stage in one head.

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
