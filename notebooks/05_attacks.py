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
# # 05 · Attacks: does the forgotten fact come back?
#
# An edit that sets "Michael Jordan plays the sport of" to *baseball* may only have changed one
# road to the answer. The paper attacks every edited model and asks how much of the **true**
# answer returns:
#
# * **Relearning**: fine-tune on the true answers of *half* the forgotten athletes; does the
#   *other* half come back too? (LoRA, as the paper; also its earlier 2-athlete variant, and full
#   fine-tuning with `RELEARN_MODES = ["lora", "full"]`.) If the old fact still sits in the
#   weights, a little training on related facts reconnects it.
# * **Soft prompt**: learn a few input vectors that make the model say the true sport on one half,
#   then test them on the other half.
# * **Other formats**: question, multiple choice and three phrasings no edit trained on.
#
# and, beyond the paper:
#
# * **Quantization** (*Catastrophic Failure of LLM Unlearning via Quantization*, 2025): rounding
#   the weights to int8 / int4 may round a small edit away.
# * **Other languages** (*Layer-Targeted Multilingual Knowledge Erasure*, 2026): ask in French,
#   German, Spanish.
#
# Throughout, **forget p(true)** is the probability of the true sport normalized over
# basketball / baseball / football / golf (lower = the edit holds; the base model is high).
# The paper's claim: FLU edits (fact-lookup MLPs) resist relearning better than output-tracing
# localizations (AP, CT).
#
# **You will learn** to
# * attack an edit by relearning (LoRA; full fine-tuning as an option) and by a soft prompt, and read the
#   *held-out* half, not the trained one;
# * test unseen formats and languages;
# * quantize weights and predict when rounding erases an edit (exercise: write the round trip).
#
# **Time:** about 45 minutes with the exercise; the run takes 8-18 minutes on a 2-core Xeon with
# AMX (measured on two such hosts, bf16; 8 with tcmalloc), about 12 on a 2-core AVX512-BF16 CPU
# (estimated), about 20 in fp32
# (relearning on two tasks; each split beyond the first in `RELEARN_SPLITS` adds 2.5-4 minutes in
# bf16 for the three compared methods of `SPLIT_METHODS`).
# Terms: [glossary](../docs/glossary.md).

# %% tags=["parameters"]
MODEL = "gemma-3-270m"
DEVICE = "auto"
DTYPE = "auto"  # bf16 (fp32 masters) where native and measured faster, else fp32; "float32": exact (README: Precision)
SEED = 0
SMOKE = False
RESULTS_DIR = ""  # "" -> <repo>/results
TASKS = ["athletes_to_sport"]  # sports tasks notebook 03 edited (sport_to_golf, unlearn_sport also work)
RELEARN_TASKS = ["athletes_to_sport", "sport_to_golf"]  # relearning on both, as the paper; other attacks: TASKS
PROTOCOL = "scaled"  # "scaled": the sizes below (CPU budget); "paper": the paper's relearning and soft prompt
PAPER_SOFT_PROMPT = False  # True: also run the paper's soft-prompt adversary under the scaled protocol
PAPER_SP_STEPS = 128  # the adversary of the paper: AdamW lr 1e-5, 15 vectors, norm at most 6 ...
PAPER_SP_RUNS = 4  # ... and 4 runs averaged
METHODS = ["flu", "ap", "ct", "random", "extraction"]  # [] -> every saved edit; extraction: the positive control
RELEARN_STEPS = 20  # LoRA, evaluated at 0, RELEARN_STEPS // 2, RELEARN_STEPS: the paper's 0, 10, 20
RELEARN_MODES = ["lora"]  # the paper's attack; add "full" (every decoder weight, beyond the paper): ~2.5 min more;
# "2ath": the paper's earlier variant (below; ~1.5-2 min more)
RELEARN_SPLITS = 3  # splits of the forget set into trained / held-out halves for the LoRA verdict (seeds SEED, SEED+1, ...)
SPLIT_METHODS = ["flu", "ap", "ct"]  # relearned again on every split: the methods the verdict compares ([]: every one)
# per edited model, about 40 s here; the paper protocol uses 3
FULL_STEPS = 10  # full fine-tuning costs more per step; evaluated at 0, 5, 10
LORA_RANK = 64  # the paper: 512 on 3072-4096-wide models; gemma-3-270m is 640 wide
LORA_ALPHA = 32
LORA_LR = 2e-4  # the paper's
FULL_LR = 3e-6  # full fine-tuning of every decoder weight; 2e-5 already diverges in one step
EARLY_STEPS = 10  # the paper's earlier variant ("2ath" in RELEARN_MODES): 2 athletes, 10 steps, rank 64, lr 1e-4
EARLY_LR = 1e-4
SOFT_PROMPT_TOKENS = 15
SOFT_PROMPT_BOUND = 6.0  # per vector, raw embedding units (a token's raw norm is about 1)
SOFT_PROMPT_LR = 1e-2
SOFT_PROMPT_STEPS = 16  # the paper: 128 at lr 1e-5; at lr 1e-2 the training loss is near 0 by 16
RESTARTS = 1  # the paper: 4
QUANT = ["int8", "int4", "int8_all"]  # see attacks.parse_quant; suffix _all: every linear weight
LANGUAGES = ["fr", "de", "es"]
LANG_BASE_PER_SPORT = 20  # known athletes per sport for the base model's recall per language
THREADS = 0  # torch CPU threads (0: automatic; 1 when the machine is busier than its cores)
SOLUTIONS = True  # False: write the exercises yourself (fill the ... stubs)

# %% [markdown]
# Imports and setup: seed every random generator, choose the CPU threads, and shrink everything
# in SMOKE mode (one step per attack, the methods the SMOKE run of notebook 03 edited).

# %%
import time

import pandas as pd
import seaborn as sns

from mechunlearn_utils import attacks as A
from mechunlearn_utils import load_model
from mechunlearn_utils.data.datasets import load_general_text
from mechunlearn_utils.workbook.notebook import known_athletes, start
from mechunlearn_utils.core.reproducibility import assert_weights_restored, weight_digests
from mechunlearn_utils.workbook.results import load_paper_results, metrics_long, save_figure, side_by_side, write_metrics
from mechunlearn_utils.data.tasks import make_task
from mechunlearn_utils.evaluate.verdicts import ci_metrics

STEM = "05_attacks"
t_start, seconds = time.perf_counter(), {}
RESULTS_DIR = start(SEED, RESULTS_DIR, threads=THREADS or "auto")  # auto: 1 thread on a busy machine
if SMOKE:
    METHODS, RELEARN_STEPS, FULL_STEPS, EARLY_STEPS, SOFT_PROMPT_STEPS, RESTARTS = [], 1, 1, 1, 3, 1
    QUANT, LANG_BASE_PER_SPORT = ["int8", "int4"], 4
    PAPER_SP_STEPS, PAPER_SP_RUNS = 2, 1
    RELEARN_TASKS = TASKS  # notebook 03's smoke run edits one task
    RELEARN_SPLITS = 2  # exercises the split-pooled verdict
    RELEARN_MODES = ["lora", "full", "2ath"]  # exercises full fine-tuning and the earlier variant too
assert PROTOCOL in ("scaled", "paper"), f"PROTOCOL must be 'scaled' or 'paper', got {PROTOCOL!r}"
if PROTOCOL == "paper" and not SMOKE:
    RELEARN_SPLITS = max(RELEARN_SPLITS, 3)

# %% [markdown]
# ## 1 · The model and the edited models of notebook 03
# Notebook 03 saved every edit as the changed matrices only. We rebuild each task from the
# edit's own record (same seed, same size), so the forget athletes are exactly the edited ones.
# A missing edit raises an error naming the notebook to run.

# %%
model = load_model(MODEL, DEVICE, dtype=DTYPE)
digests = weight_digests(model)  # every base weight, checked bit for bit after all the attacks
athletes = known_athletes(RESULTS_DIR)
edits = A.find_edits(RESULTS_DIR, TASKS, METHODS)
relearn_edits = A.find_edits(RESULTS_DIR, list(dict.fromkeys([*TASKS, *RELEARN_TASKS])), METHODS)
tasks = {t: make_task(t, athletes=athletes, **A.task_kwargs(A.edit_info(RESULTS_DIR, t, m))) for t, m in relearn_edits}
train_text = load_general_text()[:64]
print({t: task.describe() for t, task in tasks.items()})
print("edited models:", sorted(edits), "| relearning also on:", sorted(set(relearn_edits) - set(edits)))

# %% [markdown]
# Each task's forget athletes are split in two halves (fixed by `SEED`): relearning and the soft
# prompt train on the first and are scored on the **held-out** second half.

# %%
halves = {t: A.split_forget(task.eval_forget, SEED) for t, task in tasks.items()}
pd.DataFrame({t: {"attack-train half": ", ".join(a.athlete), "held-out half": ", ".join(b.athlete)}
              for t, (a, b) in halves.items()}).T

# %% [markdown]
# ## 2 · Where each edited model starts
# Forget p(true) on all forget athletes and on the held-out half, before any attack (notebook
# 03 reports the maintain side). Every attack below is compared with these numbers.

# %%
def after_edit(t, m):  # the held-out half scored on its own, as the attacks score it (bit-equal at step 0)
    return {"forget": A.athlete_p_true(model, tasks[t].eval_forget).mean(),
            "heldout": A.athlete_p_true(model, halves[t][1]).mean()}


start_rows = A.over_edits(model, relearn_edits, after_edit, include_base=True, desc="edited models")
table = lambda rows: pd.DataFrame(rows).T.rename_axis(["task", "method"])  # noqa: E731
start_table = table(start_rows)
start_table.round(3)

# %% [markdown]
# ## 3 · Base-model recall in each language, first
# A low forget p(true) in French means nothing if the base model cannot answer in French. So we
# first measure the **unedited** model on known athletes (`LANG_BASE_PER_SPORT` per sport), per
# language, with the one-shot templates of `data/multilingual_templates.csv` (answers as the
# model says them; an answer of several tokens, e.g. *football américain*, is scored by its
# first token).

# %%
templates = A.load_language_templates()
t0 = time.perf_counter()
sample = athletes.groupby("sport").head(LANG_BASE_PER_SPORT)
lang_base = {lang: A.language_p_true(model, templates, lang, sample) for lang in LANGUAGES}
lang_base["en (normal)"] = A.sports_p_true(model, sample)
seconds["lang_base"] = time.perf_counter() - t0
display(templates.loc[LANGUAGES, ["template", *A.EDIT_CANDIDATES]])
pd.DataFrame(lang_base).T.round(3)

# %% [markdown]
# ## 4 · Relearning
# Fine-tune each edited model on the true sports of the attack-train half (+ maintain athletes
# + general text, as in the paper) and score the held-out half at step 0, the middle and the
# end, on both sports tasks (`RELEARN_TASKS`, as the paper): in `athletes_to_sport` each held-out
# athlete was moved to its own other sport, in `sport_to_golf` all of them share one sport, so
# relearning the trained half teaches the held-out half's answer directly. **LoRA** (peft) on every linear layer of the decoder (rank `LORA_RANK`: the paper's 512
# would be nearly full rank on this 640-wide model) and, when `RELEARN_MODES` has "full", **full** fine-tuning of
# every decoder weight; the adapter is removed and the weights restored exactly after each run. The paper's
# earlier variant (arXiv v1; "2ath" in `RELEARN_MODES`, not in the default since the paper's final
# protocol replaced it) trains on only **2** athletes for `EARLY_STEPS` steps.

# %%
settings = {"lora": dict(steps=RELEARN_STEPS, lr=LORA_LR), "full": dict(mode="full", steps=FULL_STEPS, lr=FULL_LR),
            "2ath": dict(steps=EARLY_STEPS, eval_steps=(0, EARLY_STEPS), n_train=2, lora_rank=64, lr=EARLY_LR)}
assert "lora" in RELEARN_MODES and set(RELEARN_MODES) <= set(settings), RELEARN_MODES
shared = dict(mode="lora", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, seed=SEED)
variants = {f"relearn_{mode}": A.RelearnConfig(**{**shared, **settings[mode]}) for mode in RELEARN_MODES}
if PROTOCOL == "paper":  # rank 512, dropout 0.05, cosine lr 2e-4, no clipping, 32/32/16 sequences, 20 steps
    variants["relearn_lora"] = A.RelearnConfig.paper(seed=SEED, steps=RELEARN_STEPS)
print(PROTOCOL, "protocol:", {v: (c.lora_rank, c.lr, c.steps) for v, c in variants.items()})


def relearn_with(cfg):
    def run(t, m):
        train, heldout = halves[t]
        return A.relearn(model, train, heldout, tasks[t].train_maintain, train_text, cfg, progress=False)
    return run


# %% [markdown]
# Run every variant on every edited model (the longest part of the notebook).

# %%
t0 = time.perf_counter()
relearned = {(t, m, v): r for v, cfg in variants.items()
             for (t, m), r in A.over_edits(model, relearn_edits, relearn_with(cfg), desc=v).items()}
seconds["relearn"] = time.perf_counter() - t0
curves = A.relearn_curve_frame(relearned)
curves.pivot_table(index=["task", "method"], columns=["variant", "step"], values="forget_p_true").round(3)

# %% [markdown]
# Held-out forget p(true) along relearning, one line per method (lower = more robust). The
# paper's athletes table after 10 / 20 LoRA steps: FLU .26 / .20, AP .74 / .82, CT .35 / .47.

# %%
fig = A.plot_relearn_curves(curves, title=f"{MODEL}: relearning on half the forget set")
save_figure(fig, RESULTS_DIR, STEM, "relearn_curves")

# %% [markdown]
# **Positive control.** If no edit ever came back, we could not tell "the edit is robust" from
# "the attack is too weak". The `extraction` localization (notebook 02: MLPs from the extraction
# heads' layer on, matched to FLU's size) edits where the fact is *extracted*, which the paper's
# account predicts is shallow. *Predict:* does its held-out p(true) climb back?

# %%
control = A.control_check(curves, control="extraction", variant="relearn_lora")
for task, c in control.items():
    print(c["line"])

# %% [markdown]
# **How sure are we?** Each held-out number is a mean over a handful of athletes. A bootstrap
# over those athletes (2000 resamples) gives each method's 95% interval after relearning, and
# a *paired* bootstrap (the methods share the held-out athletes) gives the interval of
# (rival - FLU): the claim counts as reproduced only when that interval lies above 0 for both AP
# and CT, as not reproduced when it lies below 0 for both, and inconclusive when it covers 0.

# %%
relearn_ci = A.relearn_ci_frame(relearned)
relearn_ci_verdicts = A.relearn_ci_verdicts(relearned)
fig = A.plot_ci_bars(relearn_ci, title=f"{MODEL}: held-out p(true) after relearning, 95% bootstrap CI")
save_figure(fig, RESULTS_DIR, STEM, "relearn_ci")
display(relearn_ci_verdicts.filter(regex="^(task|variant|verdict)$|CI$"))
relearn_ci.round(3)

# %% [markdown]
# **Other splits.** One split of the forget set into halves is one draw: which athletes are held
# out can decide a verdict with 8 of them. With `RELEARN_SPLITS` > 1 the LoRA relearning runs again
# on other splits (seeds `SEED + 1`, ...), each athlete's held-out p(true) is averaged over the
# splits that held it out, and the paired bootstrap runs over those athletes.

# %%
split_runs = {}
if RELEARN_SPLITS > 1:
    t0 = time.perf_counter()
    first = {(t, m): r.heldout_by_athlete[-1] for (t, m, v), r in relearned.items() if v == "relearn_lora"}
    split_edits = {k: v for k, v in relearn_edits.items() if not SPLIT_METHODS or k[1] in SPLIT_METHODS}
    split_runs = A.relearn_over_splits(model, split_edits, tasks, range(SEED, SEED + RELEARN_SPLITS), train_text,
                                       variants["relearn_lora"], done=first)  # seed SEED: the split above
    seconds["relearn_splits"] = time.perf_counter() - t0
    split_verdicts = A.split_ci_verdicts(split_runs)
    display(split_verdicts.filter(regex=r"^(task|n_splits|n_athletes|verdict)$|mean$|CI$").round(3))
else:
    split_verdicts = pd.DataFrame()
    print("RELEARN_SPLITS = 1: the verdict above rests on one split")

# %% [markdown]
# ## 5 · Soft-prompt attack
# `SOFT_PROMPT_TOKENS` vectors inserted after BOS, trained with Adam to make the model give the
# true sport of the attack-train half; after every step each vector is projected back to norm
# <= `SOFT_PROMPT_BOUND`.
#
# *Which scale does the bound refer to?* Gemma multiplies token embeddings by sqrt(d_model)
# (25.3 here). Hugging Face's Gemma / Gemma-2 models apply that factor to `inputs_embeds` inside
# the model, so a bound on soft-prompt vectors passed as `inputs_embeds` there is on the raw
# embedding scale. Gemma-3's implementation applies it in the embedding layer instead, so its
# `inputs_embeds` are **not** scaled: we keep the vectors in raw units and multiply them by the
# scale ourselves, so the bound keeps that meaning (a raw token embedding of gemma-3-270m has
# norm about 1.0, so 6 is six token norms). We could not check which convention the paper's code
# used; with the other one (a bound after scaling) set `SOFT_PROMPT_BOUND = 6 / 25.3`.
# The paper: 15 vectors, bound 6, lr 1e-5, 128 steps, 4 restarts; we take
# fewer steps with a larger lr to fit a CPU budget. The best restart is chosen on the
# attack-train half's loss, never on the held-out half.

# %%
sp_cfg = A.SoftPromptConfig(n_tokens=SOFT_PROMPT_TOKENS, norm_bound=SOFT_PROMPT_BOUND, lr=SOFT_PROMPT_LR,
                            steps=SOFT_PROMPT_STEPS, restarts=RESTARTS, seed=SEED)


soft_each = {}  # (task, method, attack): each held-out athlete's p(true) under the attack, for the intervals


def soft_prompt(t, m):
    train, heldout = halves[t]
    sp = A.train_soft_prompt(model, train, sp_cfg, progress=False)
    each = A.athlete_p_true(model, heldout, soft=sp.vectors)  # scored once: the mean and the intervals
    soft_each[t, m, "soft_prompt"] = list(each)
    return {"forget_p_true": float(each.mean()),
            "train_p_true": A.sports_p_true(model, train, soft=sp.vectors)["p"], "train_loss": sp.train_loss}


t0 = time.perf_counter()
soft = A.over_edits(model, edits, soft_prompt, include_base=False, desc="soft prompts")
seconds["soft_prompt"] = time.perf_counter() - t0
table(soft).join(start_table.heldout.rename("heldout, no attack")).round(3)

# %% [markdown]
# ### The paper's soft-prompt adversary
# The paper's attack differs from the one above: no tokens are inserted; instead every token's
# embedding x becomes x + Attn(W_q x, K, V), one attention over 15 learned key and value vectors
# (norm <= 6 each) shared by all prompts, trained with AdamW at lr 1e-5; the paper averages 4
# runs. It runs when `PROTOCOL == "paper"` or `PAPER_SOFT_PROMPT` (its 128 steps x 4 runs per
# edit do not fit the scaled CPU budget).

# %%
paper_soft = {}
if PROTOCOL == "paper" or PAPER_SOFT_PROMPT:
    psp_cfg = A.PaperSoftPromptConfig(steps=PAPER_SP_STEPS, runs=PAPER_SP_RUNS, seed=SEED)

    def paper_soft_prompt(t, m):
        train, heldout = halves[t]
        sp = A.train_paper_soft_prompt(model, train, psp_cfg, progress=False)
        p = A.paper_soft_prompt_p_true(model, heldout, sp)
        soft_each[t, m, "paper_soft_prompt"] = list(p)
        lo, hi = A.bootstrap_ci(p.to_numpy())
        return {"forget_p_true": float(p.mean()), "ci_low": lo, "ci_high": hi, "seconds": sp.seconds,
                "train_p_true": float(A.paper_soft_prompt_p_true(model, train, sp).mean())}

    t0 = time.perf_counter()
    paper_soft = A.over_edits(model, edits, paper_soft_prompt, include_base=False, desc="paper soft prompts")
    seconds["paper_soft_prompt"] = time.perf_counter() - t0
    display(table(paper_soft).join(start_table.heldout.rename("heldout, no attack")).round(3))
else:
    print("the paper's soft-prompt adversary did not run (PROTOCOL='scaled', PAPER_SOFT_PROMPT=False)")

# %% [markdown]
# **How sure are we?** As for relearning: the paired bootstrap over the held-out athletes of
# (rival - FLU) under each soft-prompt attack (> 0: FLU's edit held better, the paper's side).

# %%
soft_ci_verdicts = A.per_athlete_ci_verdicts(soft_each)
soft_ci_verdicts.filter(regex="^(task|variant|verdict)$|CI$")

# %% [markdown]
# **Other splits**, as for relearning: with `RELEARN_SPLITS` > 1 the soft prompt is trained again on
# the attack-train half of each other split (seeds `SEED + 1`, ...) for the methods of
# `SPLIT_METHODS`, and scored on that split's held-out half; notebook 07's soft-prompt verdict pools them.

# %%
def soft_prompt_heldout(train, heldout, t):
    return A.athlete_p_true(model, heldout, soft=A.train_soft_prompt(model, train, sp_cfg, progress=False).vectors)


soft_split_runs, soft_split_verdicts = {}, pd.DataFrame()
if RELEARN_SPLITS > 1:
    t0 = time.perf_counter()
    soft_split_edits = {k: v for k, v in edits.items() if not SPLIT_METHODS or k[1] in SPLIT_METHODS}
    soft_split_runs = A.over_splits(model, soft_split_edits, tasks, range(SEED, SEED + RELEARN_SPLITS),
                                    soft_prompt_heldout, desc="soft prompt, split",
                                    done={(t, m): soft_each[t, m, "soft_prompt"] for t, m in soft_split_edits})
    seconds["soft_prompt_splits"] = time.perf_counter() - t0
    soft_split_verdicts = A.split_ci_verdicts(soft_split_runs)
    display(soft_split_verdicts.filter(regex=r"^(task|n_splits|n_athletes|verdict)$|mean$|CI$").round(3))

# %% [markdown]
# ## 6 · Formats the edit never trained on
# The edits trained on "Fact: X plays the sport of". Here: the question and multiple-choice
# formats of the evaluation suite and `prompts.SPORT_PARAPHRASE_TEMPLATES`, on every forget
# athlete (the base model is the reference row; MCQ is near chance on a 270M model, see 00).

# %%
t0 = time.perf_counter()
formats = A.over_edits(model, edits, lambda t, m: A.formats_p_true(model, tasks[t].eval_forget),
                       include_base=True, desc="formats")
seconds["formats"] = time.perf_counter() - t0
table(formats).join(start_table.forget.rename("normal")).round(3)

# %% [markdown]
# ## 7 · Quantization
# Round-trip weights through symmetric per-output-row int8 / int4 and ask again. `int8`, `int4`
# quantize only the matrices the edit changed; `int8_all` every linear weight of the decoder.
# If an edit is smaller than half a quantization step, rounding maps the edited and the
# original weight to the same code and the edit disappears. The base model quantized the same
# way (same matrices) is the reference: int4 is coarse enough to hurt recall on its own.
#
# ### Exercise · the quantization round trip
# Write `my_fake_quantize(w, bits)` for a 2-D weight: per output row, the scale is the row's
# largest |weight| divided by `qmax = 2 ** (bits - 1) - 1`; each weight becomes the nearest
# integer code in [-qmax, qmax] times the scale (an all-zero row stays zero). The check compares
# it with `attacks.quantize.fake_quantize` on one of the model's MLP matrices, at 8 and 4 bits.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_fake_quantize(w, bits):
#     qmax = 2 ** (bits - 1) - 1
#     scale = w.abs().amax(dim=1, keepdim=True) / qmax
#     safe = torch.where(scale > 0, scale, torch.ones_like(scale))
#     return torch.clamp(torch.round(w / safe), -qmax, qmax) * scale
# ```
# </details>

# %%
import torch  # noqa: E402,F401 - for your solution

from mechunlearn_utils.workbook.exercises import check_fake_quantize  # noqa: E402


def my_fake_quantize(w, bits):
    ...  # your code: a tensor shaped like w


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_fake_quantize as my_fake_quantize
check_fake_quantize(my_fake_quantize, model.layers[0].mlp.down_proj.weight)

# %% [markdown]
# *Predict:* an edit moved a weight by 0.1% of its row's largest weight. Does int8 keep it? int4?
#
# Now every edited model, quantized:

# %%
def quant(t, m):
    names = None if m == "base" else A.edit_info(RESULTS_DIR, t, m)["param_names"]
    return A.quant_attack(model, tasks[t].eval_forget, [q for q in QUANT if m != "base" or q.endswith("_all")], names)


t0 = time.perf_counter()
quants = A.over_edits(model, edits, quant, include_base=True, desc="quantization")
base_quant = {(t, m): A.quant_attack(model, tasks[t].eval_forget, [q for q in QUANT if not q.endswith("_all")],
                                     A.edit_info(RESULTS_DIR, t, m)["param_names"]) for t, m in edits}
seconds["quant"] = time.perf_counter() - t0
table(quants).join(table(base_quant).add_prefix("base model, ")).round(3)

# %% [markdown]
# How much of each edit survives rounding: among the weights the edit changed, the fraction whose
# quantized code equals the base model's (the edit is rounded away), and the mean edit size in
# quantization steps.

# %%
survival = {}
for (t, m), path in edits.items():
    base_w, edit_w = A.edit_weights(model, path)
    for q in [q for q in QUANT if not q.endswith("_all")]:
        bits, group, _ = A.parse_quant(q)
        survival[t, m, q] = A.edit_survival(base_w, edit_w, bits, group)
pd.DataFrame(survival).T.round(3)

# %% [markdown]
# ## 8 · Other languages
# The edits trained only on English prompts. Forget p(true) per language on every forget
# athlete; compare with the base row (section 3 measured the base on all athletes).

# %%
t0 = time.perf_counter()
langs = A.over_edits(model, edits, lambda t, m: A.languages_p_true(model, templates, LANGUAGES, tasks[t].eval_forget),
                     include_base=True, desc="languages")
seconds["languages"] = time.perf_counter() - t0
lang_table = table(langs).join(start_table.forget.rename("en (normal)"))
lang_table.round(3)

# %% [markdown]
# The same as a plot: a method whose bars stay low in every language erased the fact across
# languages; bars near the base model's mean the edit only holds in English.

# %%
frame = lang_table.reset_index().melt(id_vars=["task", "method"], var_name="language", value_name="forget p(true)")
grid = sns.catplot(frame, x="language", y="forget p(true)", hue="method", col="task", kind="bar", height=3.2, aspect=1.6)
grid.set(ylim=(0, 1))
save_figure(grid.figure, RESULTS_DIR, STEM, "languages")

# %% [markdown]
# ## 9 · Summary: how much forgotten knowledge each attack recovers
# Forget p(true) after the attack minus after the edit, on the same athletes (held-out half for
# relearning and the soft prompt, every forget athlete otherwise). Positive = the fact came
# back; the base model's own number under each attack bounds what can come back.

# %%
records = [dict(task=t, method=m, attack=v, p_attack=r.forget_p_true[-1], p_edit=r.forget_p_true[0])
           for (t, m, v), r in relearned.items()]
records += A.attack_records({k: {"soft_prompt": v["forget_p_true"]} for k, v in soft.items()}, start_table.heldout)
records += A.attack_records({k: {"paper_soft_prompt": v["forget_p_true"]} for k, v in paper_soft.items()},
                            start_table.heldout)
for prefix, res in (("format.", formats), ("quant_", quants), ("lang.", langs)):
    records += A.attack_records(res, start_table.forget, prefix)
recovery = A.recovery_table(pd.DataFrame(records))
fig = A.plot_recovery(recovery, title=f"{MODEL}: forget p(true) recovered by each attack")
save_figure(fig, RESULTS_DIR, STEM, "recovery")
recovery.round(3)

# %% [markdown]
# ## 10 · Side by side with the paper
# The paper's athletes table (16/64 athletes -> another sport, Gemma-7B / Gemma-2-9B /
# Llama-3-8B): normal-format forget p(true) after 10 / 20 relearning steps and after the soft
# prompt. Ours: LoRA relearning at the middle / last step, and the soft prompt, held-out half.

# %%
ours = {f"{t}.{m}.{k}": v for (t, m, var), r in relearned.items() if var == "relearn_lora"
        for k, v in (("relearn10.normal.p_true", r.forget_p_true[len(r.steps) // 2]),
                     ("relearn20.normal.p_true", r.forget_p_true[-1]))}
ours.update({f"{t}.{m}.soft_prompt.p_true": v["forget_p_true"] for (t, m), v in soft.items()})
paper_table = side_by_side(metrics_long(ours), load_paper_results())
paper_table.pivot_table(index="method", columns="measure", values=["ours", "paper"]).round(3) if len(paper_table) else paper_table

# %% [markdown]
# In words: for every attack, does FLU's edit hold better than AP's and CT's (lower forget
# p(true) after the attack, by at least 0.05; the rule notebook 07 uses)? Other methods are
# listed for context.

# %%
verdicts = A.attack_verdicts(pd.DataFrame(records))
with pd.option_context("display.max_colwidth", 200):
    display(verdicts)

# %% [markdown]
# **Reading the numbers.** The paper's robustness ordering (FLU recovers least under relearning,
# AP most) comes from 7-9B models whose edits train 50 steps on 16-64 athletes. On gemma-3-270m
# with the smaller budgets here, compare the held-out curves above and the recovery table: where
# FLU's curve sits below AP's and CT's the claim reproduces; the printed verdict says which. The
# soft prompt is trained on only half the forget set, so it can only generalize through what
# the athletes share (their sport labels). Quantization recovers an edit only when the edit is
# smaller than a quantization step (the survival table says how small each edit is). The
# language rows must be read against the base row: the edit trained in English only.

# %% [markdown]
# Every attack ran on an edited model put on the base weights and taken off again (LoRA adapters
# removed, fine-tuned and quantized weights copied back). Checked on the weights, bit for bit:

# %%
assert_weights_restored(model, digests, "the edits and attacks of this notebook")
print("base weights bit-identical after every attack:", True)

# %% [markdown]
# ## 11 · Metrics
# `RESULTS_DIR/05_attacks/metrics.json` (flat; `<t>` a task, `<m>` a method, `base` the unedited model):
#
# * `<t>.<m|base>.edit.forget_p_true`, `.edit.heldout_p_true`: after the edit, no attack
# * `<t>.<m>.relearn_lora.forget_p_true_by_step` (list; also `relearn_full`, `relearn_2ath`), with
#   `.steps` (the steps), `.train_p_true_by_step` (the attack-train half), `.seconds`
# * `<t>.<m>.<variant>.heldout_ci_low` / `.heldout_ci_high`: 95% bootstrap CI over the held-out
#   athletes of the held-out p(true) at the last relearning step; `verdict_ci.<variant>.<t>`
#   (and `verdict_ci.relearn_lora_splits.<t>`, `<t>.relearn_lora_splits.ci.*`, `.n_splits`, `.n_athletes`,
#   `<t>.<m>.relearn_lora_splits.heldout_mean`: the LoRA verdict pooled over `RELEARN_SPLITS` splits;
#   the same keys with `soft_prompt_splits`: the soft-prompt verdict pooled over them, and
#   `soft_prompt_split_methods`)
#   (reproduced / not reproduced / mixed / inconclusive) and `<t>.<variant>.ci.<rival>_minus_flu_low`
#   / `_high` (the paired CI of rival - FLU)
# * `<t>.<m>.paper_soft_prompt.forget_p_true` / `.ci_low` / `.ci_high` / `.train_p_true` / `.seconds`:
#   the paper's adversary (only when `PROTOCOL == "paper"` or `PAPER_SOFT_PROMPT`); `protocol`
# * `<t>.control.start` / `.end` / `.gain` / `.attack_has_power`: the positive control (the
#   `extraction` edit under LoRA relearning; None when that edit is absent)
# * `<t>.<m>.relearn10.normal.p_true` / `relearn20.normal.p_true` (LoRA, middle / last step) and
#   `<t>.<m>.soft_prompt.p_true`: the paper's measure names (`data/paper_results.csv`)
# * `<t>.<m>.soft_prompt.forget_p_true` (held-out half), `.soft_prompt.train_p_true`, `.soft_prompt.train_loss`
# * `<t>.<m|base>.format.<question|mcq|para1|para2|para3>.forget_p_true`
# * `<t>.<m|base>.quant_<setting>.forget_p_true` (`int8`, `int4`: edited matrices; `int8_all`: every
#   linear weight), `<t>.<m>.quant_<setting>.base_p_true` (the base with the same matrices
#   quantized), `<t>.<m>.quant_<setting>.erased_frac` / `.edit_in_steps`
# * `<t>.<m|base>.lang.<fr|de|es>.forget_p_true`; `base.lang.<lang>.accuracy` / `.p_true` / `.n`
#   (the base model on `LANG_BASE_PER_SPORT` known athletes per sport)
# * `<t>.<m>.recovered.<attack>`: after attack minus after edit (the summary table)
# * `verdict.<attack>.<t>`: "reproduced" / "mixed" / "not reproduced" / "not measured": does FLU's
#   edit hold better than AP's and CT's under that attack (section 10)
# * `seconds.<section>`, `seconds_total`, and the settings (`relearn_steps`, `lora_rank`, ...);
#   `weights_restored` (every base weight bit-identical after all attacks)

# %%
metrics = {"model": MODEL, "seed": SEED, "smoke": SMOKE, "relearn_steps": RELEARN_STEPS, "lora_rank": LORA_RANK,
           "lora_lr": LORA_LR, "full_lr": FULL_LR, "soft_prompt_steps": SOFT_PROMPT_STEPS, "restarts": RESTARTS,
           "methods": sorted({m for _, m in edits}), "weights_restored": True, **ours}  # checked above
metrics.update({f"{r.task}.{r.method}.{r.variant}.heldout_ci_{k}": getattr(r, f"ci_{k}")
                for r in relearn_ci.itertuples() for k in ("low", "high")})
for r in pd.concat([relearn_ci_verdicts, soft_ci_verdicts]).itertuples():  # relearning and soft prompts
    metrics.update(ci_metrics(r.task, r.variant, r.verdict, r.cis))
pooled = {"relearn_lora_splits": split_verdicts, "soft_prompt_splits": soft_split_verdicts}
for variant, frame in pooled.items():  # the LoRA and soft-prompt verdicts pooled over RELEARN_SPLITS splits
    for r in frame.to_dict("records"):
        metrics.update(ci_metrics(r["task"], variant, r["verdict"], r["cis"]))
        metrics[f"{r['task']}.{variant}.n_splits"] = r["n_splits"]
        metrics[f"{r['task']}.{variant}.n_athletes"] = r["n_athletes"]
        metrics.update({f"{r['task']}.{k[:-5]}.{variant}.heldout_mean": v for k, v in r.items() if k.endswith(".mean")})
metrics["relearn_splits"] = RELEARN_SPLITS
metrics["split_methods"] = sorted({m for _, m in split_runs})  # relearned on every split
metrics["soft_prompt_split_methods"] = sorted({m for _, m in soft_split_runs})
metrics.update({f"{t}.{m}.paper_soft_prompt.{k}": v for (t, m), row in paper_soft.items() for k, v in row.items()})
metrics["protocol"] = PROTOCOL
metrics.update({f"{t}.control.{k}": v for t, c in control.items() for k, v in c.items() if k != "line"})
for (t, m), row in start_rows.items():
    metrics.update({f"{t}.{m}.edit.{k}_p_true": v for k, v in row.items()})
for (t, m, v), r in relearned.items():
    metrics.update({f"{t}.{m}.{v}.forget_p_true_by_step": r.forget_p_true, f"{t}.{m}.{v}.steps": r.steps,
                    f"{t}.{m}.{v}.train_p_true_by_step": r.train_p_true, f"{t}.{m}.{v}.seconds": r.seconds})
for (t, m), row in soft.items():
    metrics.update({f"{t}.{m}.soft_prompt.{k}": v for k, v in row.items()})
for prefix, res in (("format.", formats), ("quant_", quants), ("lang.", langs)):
    metrics.update({f"{t}.{m}.{prefix}{k}.forget_p_true": v for (t, m), row in res.items() for k, v in row.items()})
metrics.update({f"{t}.{m}.quant_{q}.base_p_true": v for (t, m), row in base_quant.items() for q, v in row.items()})
metrics.update({f"{t}.{m}.quant_{q}.{k}": v for (t, m, q), row in survival.items() for k, v in row.items()
                if k != "n_changed"})
metrics.update({f"base.lang.{lang}.{k}": r[v] for lang, r in lang_base.items() if lang in LANGUAGES
                for k, v in (("accuracy", "acc"), ("p_true", "p"), ("n", "n"))})
metrics.update({f"{t}.{m}.recovered.{a}": float(v) for (t, m), row in recovery.iterrows() for a, v in row.dropna().items()})
metrics.update({f"verdict.{r.attack}.{r.task}": r.verdict for r in verdicts.itertuples()})
metrics.update({f"seconds.{k}": v for k, v in seconds.items()}, seconds_total=time.perf_counter() - t_start)
write_metrics(RESULTS_DIR, STEM, metrics)
print(f"{len(metrics)} metrics; {metrics['seconds_total']:.0f} s in total")
