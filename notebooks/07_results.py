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
# # 07 · Results: this workbook next to the paper, claim by claim
#
# Everything here is read from the `metrics.json` files the earlier notebooks wrote, so this
# notebook runs in seconds and works just as well on results produced on a GPU box with a
# bigger model. The paper's numbers come from `data/paper_results.csv` (transcribed from the
# authors' released result files; see `data/README.md`).
#
# The paper's claims, tested one by one:
# 1. **FLU edits generalize** to other formats (MCQ) better than output-tracing (AP, CT) edits.
# 2. **FLU edits resist relearning** better.
# 3. **FLU edits change the latent representation** (probes in the middle layers).
# 4. **FLU edits have fewer side effects** (maintain accuracy, general language modelling).
#
# **You will learn** to
# * put every number of the workbook next to the paper's, measure by measure;
# * read forget-vs-maintain and robustness-vs-side-effect plots (which corner is good);
# * turn a table into a verdict per claim by a fixed rule (exercise).
#
# **Time:** about 20 minutes with the exercise; the run takes seconds (no model is loaded).
# Terms: [glossary](../docs/glossary.md).

# %% tags=["parameters"]
MODEL = "gemma-3-270m"  # only recorded: nothing is loaded
DEVICE = "auto"
DTYPE = "float32"  # only recorded: nothing is loaded
SEED = 0
SMOKE = False
RESULTS_DIR = ""  # "" -> <repo>/results
MARGIN = 0.05  # FLU must beat a rival by this much to count as better
SOLUTIONS = True  # False: write the exercises yourself (fill the ... stubs)

# %%
import pandas as pd
import seaborn as sns

from mechunlearn_utils.workbook.notebook import start
from mechunlearn_utils.viz.plotting import pareto_plot
from mechunlearn_utils.evaluate.verdicts import spread_table
from mechunlearn_utils.workbook.results import (WHOLE_SPORT_POOLED, MissingResultsError, attach_cis, claim_verdict,
                                               latent_position, load_paper_results, metrics_long, notebook_dir,
                                               paper_by_task, paper_numbers, per_fact_cis, per_fact_values,
                                               pool_whole_sport, read_metrics, robustness_vs_side_effects,
                                               save_figure, side_by_side, write_metrics)

STEM = "07_results"
RESULTS_DIR = start(SEED, RESULTS_DIR)
setup = read_metrics(RESULTS_DIR, "00_setup")
edits = read_metrics(RESULTS_DIR, "03_editing_and_unlearning")
pooled = pool_whole_sport(edits)  # the paper's whole-sport table is a mean over its three sport splits
edits.update(pooled)
print(f"{WHOLE_SPORT_POOLED}: the mean over 03's per-sport tasks" if pooled else
      "no pooled whole-sport task: 03 ran fewer than two of basketball_to_golf, football_to_golf, baseball_to_golf")
ours = metrics_long(edits)
print(f"model {edits['model']}, {ours.task.nunique()} tasks, {ours.method.nunique()} methods "
      f"(incl. base), smoke={edits['smoke']}")

# %% [markdown]
# ## 1 · Every method, every measure, next to the paper
# `ours` is this workbook's number, `paper` the paper's mean over Gemma-7B, Gemma-2-9B and
# Llama-3-8B. Forget columns: lower = the old answer is gone.

# %%
paper = load_paper_results()
table = side_by_side(ours, paper)
table.to_csv(notebook_dir(RESULTS_DIR, STEM) / "side_by_side.csv", index=False)
wide = table.pivot_table(index=["task", "method"], columns="measure", values=["ours", "paper"]).round(3)
wide

# %% [markdown]
# ## 2 · Claim 1: generalization to formats the edit never saw
# The paper measures it in A-D multiple choice. Notebook 00 checked whether this model can do
# multiple choice at all; when it cannot (near 1/4 accuracy), an MCQ number after editing says
# nothing, and we judge generalization in the **question** format (sports) or on
# **paraphrases** (CounterFact) instead, and say so.

# %%
def gen_measure(task):
    if setup["mcq_usable"]:
        return "forget.mcq.p_true"
    return "forget.paraphrase.p_true" if task == "counterfact" else "forget.question.p_true"


def values(task, measure, frame=ours):
    rows = frame[(frame.task == task) & (frame.measure == measure) & (frame.method != "base")]
    return dict(zip(rows.method, rows.value))


verdicts = []
for task in sorted(ours.task.unique()):
    verdict, words = claim_verdict(values(task, gen_measure(task)), margin=MARGIN)
    verdicts.append(dict(id="generalizes", claim="1 generalizes (unseen format)", task=task, measure=gen_measure(task),
                         verdict=verdict, numbers=words))
pd.DataFrame(verdicts)

# %% [markdown]
# ## 3 · Claim 4: side effects
# Change of the LM loss on held-out general text (lower = less damage) and maintain accuracy in
# the training format (higher = better).

# %%
for task in sorted(ours.task.unique()):
    base_loss = ours[(ours.task == task) & (ours.method == "base") & (ours.measure == "side.lm_loss")].value
    if len(base_loss):
        deltas = {m: v - float(base_loss.iloc[0]) for m, v in values(task, "side.lm_loss").items()}
        verdict, words = claim_verdict(deltas, margin=0.01)
        verdicts.append(dict(id="side_effects_lm", claim="4 fewer side effects (LM loss change)", task=task,
                             measure="side.lm_loss - base", verdict=verdict, numbers=words))
    train_fmt = "prompt" if task == "counterfact" else "normal"
    verdict, words = claim_verdict(values(task, f"maintain.{train_fmt}.p_true"), lower_is_better=False, margin=MARGIN)
    verdicts.append(dict(id="side_effects_maintain", claim="4 fewer side effects (maintain)", task=task,
                         measure=f"maintain.{train_fmt}.p_true", verdict=verdict, numbers=words))
pd.DataFrame(verdicts[-2 * ours.task.nunique():])

# %% [markdown]
# ## 4 · Claims 2 and 3: robustness to attacks, latent representations
# From notebooks 05 (attacks) and 04 (probes); a claim whose notebook has not run is *not
# measured*. Lower is better for all three measures:
# * relearning: held-out forget p(true) after LoRA relearning on the other half (the last step);
# * soft prompt: held-out forget p(true) with a soft prompt trained on the other half;
# * latent_paper: the paper's protocol (its Figure 4): accuracy for the **true** sport at the middle
#   layer, final token, of probes trained on each *edited* model's own maintain athletes and tested
#   on its forgotten athletes; the paper: FLU 0.03, AP 1.00 (the old fact still readable inside).
# * latent: the workbook's first reading, probes trained on the **base** model, at the position
#   (final or last subject token) where they read the fact best in the base model: on a small model
#   the sport reaches the final token only at the extraction layer, after the middle, so there the
#   middle layer holds it at the subject token.

# %%
def optional_metrics(stem):
    try:
        return read_metrics(RESULTS_DIR, stem)
    except MissingResultsError as err:
        print(f"{stem}: {err}")
        return {}


attacks, probes = optional_metrics("05_attacks"), optional_metrics("04_probing_latent_knowledge")
LATENT_POS = latent_position(probes)
print(f"latent claim read at the {LATENT_POS} token")
CLAIMS_2_3 = (("relearning", "2 resists relearning (LoRA)", attacks, "relearn20.normal.p_true"),
              ("soft_prompt", "2 resists a soft-prompt attack", attacks, "soft_prompt.forget_p_true"),
              ("latent_paper", "3 changes the mid-layer representation (paper's probes)", probes,
               "paper.final.true_acc.mid"),
              ("latent", "3 changes the mid-layer representation (base-model probes)", probes,
               f"{LATENT_POS}.true_acc.mid"))
for cid, claim, source, measure in CLAIMS_2_3:
    frame = metrics_long(source)
    found = [t for t in sorted(frame.task.unique()) if values(t, measure, frame)]
    if not found:
        verdicts.append(dict(id=cid, claim=claim, task="all", measure=measure, verdict="not measured",
                             numbers="notebook not run" if not source else "measure missing"))
    for task in found:
        verdict, words = claim_verdict(values(task, measure, frame), margin=MARGIN)
        verdicts.append(dict(id=cid, claim=claim, task=task, measure=measure, verdict=verdict, numbers=words))
pd.DataFrame([v for v in verdicts if v["id"] in {c[0] for c in CLAIMS_2_3}])

# %% [markdown]
# **Intervals.** Where a claim's input keeps one value per fact (notebook 05's held-out athletes
# after LoRA relearning, pooled over several splits of the forget set when 05 ran them, `ci source`,
# and under the soft prompt; notebook 04's per-athlete hits of the paper's probes; notebook 03's
# p(true) of each evaluated fact, for generalization and maintain, and its LM loss on each held-out
# paragraph, bootstrapped here, pooled over the seeds 03 edited its tasks with: `ci source`
# `<claim>_seeds`), a paired bootstrap
# 95% interval of (rival - FLU) and a second verdict from it: *reproduced* only when every interval lies above 0
# (FLU holds better), *not reproduced* when every one lies below, *inconclusive* when one covers 0.

# %%
edit_cis = per_fact_cis(verdicts, edits)
with_ci = attach_cis(verdicts, {**edit_cis, **attacks, **probes})
without = sorted({v["id"] for v in verdicts} - set(with_ci))
seeds_pooled = {k: n for k, n in edit_cis.items() if k.startswith("ci_seeds.")}
print("seeds pooled per editing claim:", seeds_pooled)
print(f"CI columns for: {with_ci or 'none'}; no per-fact values in the inputs of {without}, so no interval there")

# %% [markdown]
# ## 5 · Pareto view: forget vs maintain, per task
# Each filled point a method of this run, each hollow point the paper's number for the same two
# measures where the paper reports them (sport_to_golf in the training format; its other tables
# report MCQ, which this model cannot answer). Every method has its own colour and marker. Top-left
# is best: forget p(true) low on the x axis (old answer gone; a log axis, since edits drive it to
# ~0), maintain high on the y axis (other facts kept). The bars are 95% bootstrap intervals over the
# evaluated facts (from notebook 03's per-fact values): two methods whose bars overlap are not told
# apart by this many facts.
#
# *Predict:* where will the nonlocalized edit sit, and where the unedited model (`base`)?

# %%
fig = pareto_plot(ours, paper_by_task(paper, ours.task.unique()), spread=spread_table(per_fact_values(edits)))
save_figure(fig, RESULTS_DIR, STEM, "pareto_forget_maintain")

# %% [markdown]
# Robustness against side effects: the held-out forget p(true) after LoRA relearning (notebook
# 05; lower = more robust) against the LM-loss change the edit caused (notebook 03; lower = less
# damage). The paper's claim puts FLU in the bottom-left corner.

# %%
trade = robustness_vs_side_effects(ours, metrics_long(attacks)) if attacks else pd.DataFrame()
if len(trade):
    grid = sns.relplot(trade, x="side_effect", y="attack_p_true", hue="method", style="method", col="task", s=80,
                       height=3.5,
                       facet_kws=dict(sharex=False))
    grid.set_axis_labels("LM loss change (edited - base)", "forget p(true) after relearning")
    save_figure(grid.figure, RESULTS_DIR, STEM, "pareto_robustness_side_effects")
trade.round(3)

# %% [markdown]
# ## 6 · Verdicts
# One row per claim and task. *reproduced*: FLU beats every rival (AP and CT) by at least
# `MARGIN`; *not reproduced*: it beats none; *mixed*: some.
#
# ### Exercise · a verdict from a table
# Write `my_verdict(values, margin, lower_is_better)`: `values` maps methods to one measure, e.g.
# `{"flu": 0.01, "ap": 0.40, "ct": 0.03}` (a rival may be missing); FLU "beats" a rival when it is
# better by at least `margin` (lower or higher, as `lower_is_better` says). Return "reproduced",
# "not reproduced" or "mixed" by the rule above. The check compares it with
# `evaluate.verdicts.claim_verdict`, the rule every verdict of this notebook uses, on a few tables.
#
# <details><summary>Solution</summary>
#
# ```python
# def my_verdict(values, margin, lower_is_better):
#     rivals = [values[r] for r in ("ap", "ct") if r in values]
#     sign = 1 if lower_is_better else -1
#     wins = [sign * (r - values["flu"]) >= margin for r in rivals]
#     return "reproduced" if all(wins) else ("not reproduced" if not any(wins) else "mixed")
# ```
# </details>

# %%
from mechunlearn_utils.workbook.exercises import check_verdict  # noqa: E402


def my_verdict(values, margin, lower_is_better):
    ...  # your code: "reproduced", "not reproduced" or "mixed"


if SOLUTIONS:
    from mechunlearn_utils.workbook.exercises import solution_verdict as my_verdict
check_verdict(my_verdict)

# %% [markdown]
# *Predict:* from the sections above, which claims will come out "reproduced" on this model?

# %%
for v in verdicts:  # the paper's numbers for the same measure, where its tables report it
    v["paper"] = paper_numbers(paper, v["task"], v["measure"])
verdict_table = pd.DataFrame(verdicts)
verdict_table.to_csv(notebook_dir(RESULTS_DIR, STEM) / "verdicts.csv", index=False)
verdict_table

# %% [markdown]
# ## 7 · Metrics
# `RESULTS_DIR/07_results/metrics.json`: `verdict.<claim id>.<task>` (the verdict string; ids
# generalizes, relearning, soft_prompt, latent_paper, latent, side_effects_lm, side_effects_maintain),
# `verdict_ci.<claim id>.<task>` (the verdict from the bootstrap intervals, where the inputs have them),
# `ci_seeds.<claim id>.<task>` (how many of notebook 03's seeds an editing claim's interval pools),
# `n_compared` (cells compared with the paper), `mcq_usable`, `smoke`.

# %%
metrics = {"model": edits["model"], "smoke": SMOKE, "mcq_usable": setup["mcq_usable"],
           "n_compared": int(len(table)), "latent_position": LATENT_POS}
for row in verdict_table.itertuples():
    metrics[f"verdict.{row.id}.{row.task}"] = row.verdict
metrics.update({f"verdict_ci.{v['id']}.{v['task']}": v["verdict_ci"] for v in verdicts if "verdict_ci" in v})
metrics.update(seeds_pooled)
write_metrics(RESULTS_DIR, STEM, metrics)
