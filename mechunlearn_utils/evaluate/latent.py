"""Notebook 04: is the old fact still *in* the edited model? Linear probes on the residual stream.

Two protocols, both per layer (logistic regression, `probes.fit_probes`), both scored on the edited
athletes against their **true** and their **injected** sport:

* ``"paper"`` (Guo et al. 2024, Figure 4; the default reading): for each **edited** model, probes are
  trained on *that model's* residual stream of the athletes the edit did not forget (its maintain
  athletes), at the final token, and tested on the forgotten athletes. Two controls come with it:
  the same probes trained on shuffled labels (what a probe reads by chance), and the probes'
  cross-validated accuracy on the edited model's maintain athletes (the probe works on that model).
* ``"ours"`` (the workbook's first reading, kept beside it): probes trained once on the **base**
  model, applied unchanged to every edited model, at the last subject token and the final token.

If a probe still reads the true sport in the middle layers, the edit only rerouted the output (the
knowledge is latent); if it reads the injected sport, the representation itself changed.

* `athlete_residuals`   residual stream after every block (`probes.residuals_at`) of athletes'
                        training-format prompts, at the final token and the last subject token
* `probe_split`         which athletes train the probes and which are probed, for a task
* `train_position_probes` / `probe_curves`  per-layer probes (`probes.fit_probes`) and their
                        accuracy against the true and the injected label
* (the edits notebook 03 saved, and the task they were made on: `edit.storage.edit_paths`,
  `edit.storage.task_from_edit`)
* `paper_probe_curves`  the paper's protocol on one model: probes fit on its maintain athletes,
                        scored on the probed ones, with the shuffled-label and maintain controls
* `latent_curves`       everything above for every saved edit of a task, as one long table
* `plot_latent_curves`, `probe_table`, `probe_widget`  the figure, the per-athlete view and its widget

"Layer l" is the residual stream after block l (what `probes.residuals_at` returns): the last
layer is the input of the final norm, not the normed output HF returns as its last hidden state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mechunlearn_utils.core.paths import STEMS
from mechunlearn_utils.data.prompts import sport_prompt
from mechunlearn_utils.evaluate.probes import fit_probes, probe_accuracy, residuals_at
from mechunlearn_utils.evaluate.verdicts import ci_metrics, ci_verdict

STEM = STEMS["latent"]
POSITIONS = ("final", "subject")
PROTOCOLS = ("paper", "ours")
# Labels of a probe curve: scored against the true / the injected sport on the probed athletes; the
# paper protocol's two controls (probes fit on shuffled labels, scored against the true sport; the
# probes' 5-fold cross-validated accuracy on the edited model's own maintain athletes).
LABELS = ("true", "edit", "shuffled", "maintain_cv")


# --------------------------------------------------------------------------- activations

def probe_positions(model, athletes: list[str], fmt: str = "normal") -> tuple[list[str], dict[str, list[int]]]:
    """Prompts of `athletes` in a format, and their final-token and last-subject-token positions."""
    prompts = [sport_prompt(a, fmt) for a in athletes]
    final = [len(model.encode(p)) - 1 for p in prompts]
    subject = [model.subject_positions(p, a)[-1] for p, a in zip(prompts, athletes)]
    return prompts, {"final": final, "subject": subject}


def athlete_residuals(model, athletes: list[str], fmt: str = "normal", batch_size: int = 32,
                      progress: bool = False) -> dict[str, np.ndarray]:
    """`probes.residuals_at` of athletes' prompts at the final token and at the last subject token:
    {"final": array [layer, athlete, d_model], "subject": ...}."""
    if len(athletes) == 0:
        raise ValueError("no athletes to probe: the set is empty")
    prompts, positions = probe_positions(model, list(athletes), fmt)
    return residuals_at(model, prompts, positions, batch_size, progress=progress)


# --------------------------------------------------------------------------- probes

def probe_split(task, known: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(probe-training athletes, probed athletes) for a sports task.

    Probed: the task's evaluation forget set (for sport_to_golf the held-out half the edit never
    trained on). Training: every other known athlete (their base-model activations), so the probe
    has seen every sport and never the probed athletes. For sport_to_golf this includes the trained
    half of the forgotten sport: every athlete of that sport is "forget", so there is no maintain
    athlete to learn it from.
    """
    if task.kind != "sports":
        raise ValueError(f"probes read an athlete's sport: task {task.name!r} is {task.kind}, not sports")
    probed = task.eval_forget.reset_index(drop=True)
    if len(probed) == 0:
        raise ValueError(f"task {task.name!r} has no forget athletes to probe")
    train = known[~known.athlete.isin(set(probed.athlete))].reset_index(drop=True)
    if train.sport.nunique() < 2:
        raise ValueError(f"probe training needs athletes of at least two sports, got {train.sport.unique()}")
    return train, probed


def train_position_probes(features: dict[str, np.ndarray], labels, C: float = 0.1, seed: int = 0) -> dict:
    """One list of per-layer probes per position (sklearn logistic regression, multinomial)."""
    return {pos: fit_probes(feats, labels, C=C, seed=seed) for pos, feats in features.items()}


def probe_curves(probes: dict, features: dict[str, np.ndarray], true_labels, edit_labels=None) -> dict:
    """{position: {"true": acc[layer], "edit": acc[layer] or None}}.

    The edit accuracy is None when an injected label is not a class the probes know (golf: no
    athlete of the data plays it), since a probe cannot output it.
    """
    out = {}
    for pos, plist in probes.items():
        classes = set(plist[0].classes_)
        edit = None
        if edit_labels is not None and set(edit_labels) <= classes:
            edit = probe_accuracy(plist, features[pos], edit_labels)
        out[pos] = {"true": probe_accuracy(plist, features[pos], true_labels), "edit": edit}
    return out


def paper_probe_curves(train_features: dict[str, np.ndarray], train_labels, probed_features: dict[str, np.ndarray],
                       true_labels, edit_labels=None, C: float = 0.1, seed: int = 0, folds: int = 5,
                       probes: dict | None = None) -> tuple[dict, dict]:
    """The paper's protocol on one (edited) model: per-layer probes fit on `train_features` (that
    model's maintain athletes), scored on `probed_features` (its forgotten athletes).

    -> ({position: {"true", "edit" (None if a label is unknown to the probes), "shuffled",
    "maintain_cv": acc[layer]}}, the fitted probes {position: [layer]}). "shuffled": probes fit on a fixed permutation of the training labels
    (seeded), scored against the true labels: the chance level of this probe on these athletes.
    "maintain_cv": `probes.cv_probe_accuracy` on the training athletes themselves. `probes`: the
    probes already fit on exactly these features and labels (not fit again)."""
    from mechunlearn_utils.evaluate.probes import cv_probe_accuracy

    train_labels = np.asarray(train_labels)
    probes = probes or train_position_probes(train_features, train_labels, C=C, seed=seed)
    out = probe_curves(probes, probed_features, true_labels, edit_labels)
    shuffled = np.random.default_rng(seed).permutation(train_labels)
    sham = probe_curves(train_position_probes(train_features, shuffled, C=C, seed=seed), probed_features, true_labels)
    for pos in out:
        out[pos]["shuffled"] = sham[pos]["true"]
        out[pos]["maintain_cv"] = cv_probe_accuracy(train_features[pos], train_labels, folds=folds, C=C, seed=seed)
    return out, probes


def correct_at(probes: list, features: np.ndarray, labels, layer: int) -> np.ndarray:
    """Per probed athlete, 1.0 where the layer's probe reads `labels[i]` (for bootstrap intervals)."""
    return (probes[layer].predict(features[layer]) == np.asarray(labels)).astype(float)


@dataclass
class LatentResult:
    """Per-layer probe accuracy of every edited model of one task (long table) and its inputs."""

    task: str
    curves: pd.DataFrame  # protocol ("paper"/"ours"), method, position, label (LABELS), layer, acc
    features: dict = field(default_factory=dict)  # {method: {position: [layer, athlete, d]}}
    change: dict = field(default_factory=dict)  # {method: relative change of the final-token residual, per layer}
    first_layer: dict = field(default_factory=dict)  # {method: lowest layer the edit trained}
    restore_rel_diff: float = 0.0  # largest relative change of a base residual re-read after the edits
    weights_restored: bool = True  # every weight bit-identical after the edits (else latent_curves raises)
    probes: dict = field(default_factory=dict)  # the base-model probes ("ours") {position: [layer]}
    probed: pd.DataFrame | None = None
    paper_correct: dict = field(default_factory=dict)  # {method: per-athlete 0/1, paper protocol, final, mid layer}


def _relative_change(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per layer: |a - b| / |b| over the athletes' residual vectors (a, b: [layer, athlete, d])."""
    return [float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)) for x, y in zip(a, b)]


def first_edited_layer(path) -> int:
    """Lowest decoder layer whose weights a saved edit changed (0 when it trains anything below)."""
    from mechunlearn_utils.edit.loop import first_trainable_layer

    info = json.loads(Path(path).with_suffix(".json").read_text())
    return first_trainable_layer(info["param_names"])


def latent_curves(model, task, known: pd.DataFrame, paths: dict[str, Path], C: float = 0.1, seed: int = 0,
                  batch_size: int = 32, progress: bool = True) -> LatentResult:
    """Both protocols (`PROTOCOLS`) on the base model and every edited model of one task.

    "ours": probes trained on the base model's training athletes, applied to the probed athletes of
    every edited model. "paper": per model, `paper_probe_curves` on that model's own residuals of the
    training athletes (its maintain athletes). Also checks each edit changes the probed residual
    stream (an edit that changes nothing is a bug: raises), that every weight is bit-identical
    afterwards (raises `WeightsChangedError`), and that the base residuals read again agree within
    `EVAL_ATOL` (relative; float rounding only).
    """
    from mechunlearn_utils.edit.storage import edited
    from mechunlearn_utils.core.reproducibility import EVAL_ATOL, EvaluationDriftError, assert_weights_restored, weight_digests

    digests = weight_digests(model)

    train, probed = probe_split(task, known)
    train_labels = list(train.sport)
    base_train = athlete_residuals(model, list(train.athlete), batch_size=batch_size, progress=progress)
    probes = train_position_probes(base_train, train_labels, C=C, seed=seed)
    true, target = list(probed.sport), list(probed.target) if "target" in probed else None
    feats = {"base": athlete_residuals(model, list(probed.athlete), batch_size=batch_size)}
    train_feats = {"base": base_train}
    for method, path in tqdm(paths.items(), desc=f"edited models ({task.name})", disable=not progress):
        with edited(model, path):
            feats[method] = athlete_residuals(model, list(probed.athlete), batch_size=batch_size)
            train_feats[method] = athlete_residuals(model, list(train.athlete), batch_size=batch_size)
    again = athlete_residuals(model, list(probed.athlete), batch_size=batch_size)
    assert_weights_restored(model, digests, f"the edits of {task.name}")
    restore_diff = max(max(_relative_change(again[p], feats["base"][p])) for p in POSITIONS)
    if restore_diff > EVAL_ATOL:
        raise EvaluationDriftError(f"base residuals moved by {restore_diff:.3g} (relative) with the weights "
                                   f"bit-identical: more than float rounding (EVAL_ATOL {EVAL_ATOL:g})")
    rows, change, correct = [], {}, {}
    mid = model.n_layers // 2
    for method, f in feats.items():
        if method != "base":
            change[method] = _relative_change(f["final"], feats["base"]["final"])
            if change[method][-1] == 0.0:
                raise RuntimeError(f"the saved {method!r} edit of {task.name!r} leaves the residual stream "
                                   "unchanged: the edit file holds the base weights")
        paper, own = paper_probe_curves(train_feats[method], train_labels, f, true, target, C=C, seed=seed,
                                        probes=probes if method == "base" else None)  # base: the same fit
        correct[method] = correct_at(own["final"], f["final"], true, mid).tolist()
        for protocol, curves in (("ours", probe_curves(probes, f, true, target)), ("paper", paper)):
            for pos, c in curves.items():
                for label, acc in c.items():
                    if acc is not None:
                        rows += [dict(protocol=protocol, method=method, position=pos, label=label, layer=l,
                                      acc=float(a)) for l, a in enumerate(acc)]
    first = {m: first_edited_layer(p) for m, p in paths.items()}
    return LatentResult(task.name, pd.DataFrame(rows), feats, change, first, restore_diff, True, probes, probed,
                        correct)


# --------------------------------------------------------------------------- summaries, plots, widget

def summary(curves: pd.DataFrame, n_layers: int, protocol: str | None = "ours") -> pd.DataFrame:
    """Per method x position x label: accuracy at the middle layer, over the back half, and the max;
    of one protocol (`PROTOCOLS`), or of both (``protocol=None``, then indexed by protocol first)."""
    mid = n_layers // 2
    keys = ["method", "position", "label"]
    if protocol is None:
        keys = ["protocol"] + keys
    elif "protocol" in curves:
        curves = curves[curves.protocol == protocol]
    g = curves.groupby(keys)
    return pd.DataFrame({
        "mid": g.apply(lambda d: float(d.loc[d.layer == mid, "acc"].iloc[0]), include_groups=False),
        "back_half": g.apply(lambda d: float(d.loc[d.layer >= mid, "acc"].mean()), include_groups=False),
        "max": g.acc.max(),
    })


def paper_latent_verdict(result: LatentResult, rivals=("ap", "ct"), seed: int = 0) -> tuple[str, dict]:
    """The latent claim (FLU edits leave less of the true sport readable than AP/CT edits) under the
    paper's protocol, with a paired bootstrap over the probed athletes of the per-athlete hits at the
    final token, middle layer (`evaluate.verdicts.ci_verdict`, lower is the paper's side)."""
    return ci_verdict(result.paper_correct, rivals=rivals, lower_is_better=True, seed=seed)


def flat_metrics(result: LatentResult, n_layers: int) -> dict:
    """metrics.json entries of one task: curves, summaries, edit-change and restore checks."""
    out, t = {}, result.task

    def key(protocol, method, pos, label):  # "ours" keeps the first keys; the paper's add ".paper"
        return f"{t}.{method}.{'paper.' if protocol == 'paper' else ''}{pos}.{label}_acc"

    for (protocol, method, pos, label), d in result.curves.groupby(["protocol", "method", "position", "label"]):
        out[key(protocol, method, pos, label) + "_by_layer"] = d.sort_values("layer").acc.tolist()
    for (protocol, method, pos, label), row in summary(result.curves, n_layers, protocol=None).iterrows():
        for k, v in row.items():
            out[f"{key(protocol, method, pos, label)}.{k}"] = float(v)
    for m, v in result.paper_correct.items():
        out[f"{t}.{m}.paper.final.true_correct_mid"] = v
    verdict, cis = paper_latent_verdict(result)
    if cis:  # the latent claim with intervals, in notebook 05's key form (workbook.results.attach_cis)
        out.update(ci_metrics(t, "latent_paper", verdict, cis))
    for m, v in result.change.items():
        out[f"{t}.{m}.resid_change_by_layer"] = v
        out[f"{t}.{m}.resid_change"] = v[-1]
        out[f"{t}.{m}.first_edited_layer"] = result.first_layer[m]
    out[f"{t}.restore_rel_diff"] = result.restore_rel_diff
    out[f"{t}.weights_restored"] = result.weights_restored
    out[f"{t}.n_probed"] = int(len(result.probed))
    out[f"{t}.methods"] = [m for m in result.features if m != "base"]
    return out


LABEL_TITLES = {"true": "true label", "edit": "injected label", "shuffled": "control: shuffled labels",
                "maintain_cv": "control: maintain athletes (CV)"}


def plot_latent_curves(curves: pd.DataFrame, title: str = "", chance: float | None = None,
                       protocol: str = "ours", positions=POSITIONS):
    """The paper's Figure 4: probe accuracy by layer, one line per method; rows = position,
    columns = which label is scored (the true sport, the injected one; the paper protocol's
    controls), for one protocol (`PROTOCOLS`)."""
    import seaborn as sns

    if "protocol" in curves:
        curves = curves[curves.protocol == protocol]
    curves = curves[curves.position.isin(positions)]
    if curves.empty:
        raise ValueError(f"no probe curves for protocol {protocol!r} at positions {list(positions)}")
    d = curves.assign(label=curves.label.map(LABEL_TITLES),
                      model=np.where(curves.method == "base", "unedited", "edited"))
    from matplotlib.ticker import MaxNLocator

    rows = [p for p in positions if p in set(d.position)]
    cols = [LABEL_TITLES[c] for c in LABELS if LABEL_TITLES[c] in set(d.label)]
    # one position: the label panels wrap two per row (readable); several: one row per position
    layout = dict(row="position", row_order=rows) if len(rows) > 1 else dict(col_wrap=min(2, len(cols)))
    grid = sns.relplot(d, x="layer", y="acc", hue="method", style="model", col="label", col_order=cols,
                       kind="line", markers=True, markersize=4, height=2.8, aspect=1.5,
                       style_order=["edited", "unedited"], **layout)
    if len(rows) == 1:
        grid.set_titles(f"{rows[0]} token | {{col_name}}")
    for ax in grid.axes.flat:
        ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if chance is not None:
            ax.axhline(chance, ls=":", c="gray")
    grid.set_axis_labels("layer (residual after block)", "probe accuracy")
    grid.figure.suptitle(title, y=1.02)
    return grid.figure


def probe_table(result: LatentResult, method: str, position: str, layer: int) -> pd.DataFrame:
    """Per probed athlete: true sport, injected sport, what the base-trained probe reads, its confidence."""
    if method not in result.features:
        raise ValueError(f"no edited model {method!r} for {result.task}; have {list(result.features)}")
    if position not in result.probes:
        raise ValueError(f"unknown position {position!r}; choose one of {list(result.probes)}")
    n = len(result.probes[position])
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} outside 0..{n - 1}")
    probe, x = result.probes[position][layer], result.features[method][position][layer]
    proba = probe.predict_proba(x)
    df = result.probed[["athlete", "sport"] + (["target"] if "target" in result.probed else [])].copy()
    df["probe_reads"] = probe.classes_[proba.argmax(1)]
    df["confidence"] = proba.max(1).round(3)
    return df


def probe_widget(results: dict):
    """Pick task, edited model, position and layer: what the base-trained probe reads per athlete."""
    import ipywidgets as w
    from IPython.display import display

    task = w.Dropdown(options=list(results), description="task")
    method = w.Dropdown(description="method")
    position = w.Dropdown(options=list(POSITIONS), value="subject", description="position")
    first = next(iter(results.values()))
    layer = w.IntSlider(value=len(first.probes["final"]) // 2, min=0, max=len(first.probes["final"]) - 1,
                        description="layer")
    out = w.Output()

    def options(_=None):
        method.options = list(results[task.value].features)

    def show(_=None):
        out.clear_output()
        with out:
            if method.value is not None:
                display(probe_table(results[task.value], method.value, position.value, layer.value))

    options()
    task.observe(lambda c: (options(), show()), names="value")
    for c in (method, position, layer):
        c.observe(show, names="value")
    show()
    return w.VBox([w.HBox([task, method]), w.HBox([position, layer]), out])
