"""Notebook 04's library on the tiny model: residual cache, probe split, probes on edited models."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.edit.storage import EDITS_STEM, edit_paths, restore, save_edit, snapshot, task_from_edit
from mechunlearn_utils.evaluate.latent import (athlete_residuals, flat_metrics, latent_curves,
                                      plot_latent_curves, probe_curves, probe_positions, probe_split, probe_table,
                                      probe_widget, summary, train_position_probes)
from mechunlearn_utils.evaluate.probes import residuals_at
from mechunlearn_utils.core.reproducibility import EVAL_ATOL
from mechunlearn_utils.workbook.results import MissingResultsError
from mechunlearn_utils.data.tasks import make_task

EDITED = ["model.layers.0.mlp.down_proj.weight"]
LATE = {"flu": EDITED, "ap": ["model.layers.1.mlp.down_proj.weight"]}  # what each fake edit changes


@pytest.fixture(scope="module")
def athletes():
    return load_athletes().groupby("sport").head(8).reset_index(drop=True)


@pytest.fixture(scope="module")
def task(athletes):
    return make_task("athletes_to_sport", athletes=athletes, n=4, seed=0)  # notebook 03 keeps n_maintain default


@pytest.fixture(scope="module")
def results_dir(tiny, task, tmp_path_factory):
    """A RESULTS_DIR with two saved 'edits' of athletes_to_sport (random perturbations of one matrix)."""
    root = tmp_path_factory.mktemp("r")
    for i, (method, names) in enumerate(LATE.items()):
        base = snapshot(tiny, names)
        with torch.no_grad():
            w = dict(tiny.hf.named_parameters())[names[0]]
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
        save_edit(tiny, names, root / EDITS_STEM / "edits" / task.name / method,
                  {"task": task.name, "task_meta": task.meta, "method": method})
        restore(tiny, base)
    return root


def test_named_positions_read_in_one_pass_equal_one_position_at_a_time(tiny, athletes):
    names = list(athletes.athlete[:5])
    prompts, pos = probe_positions(tiny, names)
    cache = residuals_at(tiny, prompts, pos, batch_size=2)
    assert cache.keys() == pos.keys()
    for name in ("final", "subject"):
        ref = residuals_at(tiny, prompts, pos[name], backend="hf")
        assert cache[name].shape == (tiny.n_layers, 5, tiny.d_model)
        np.testing.assert_array_equal(cache[name], ref)  # same forward, same tensors
    # the subject position is the athlete's last token, before the final one
    assert all(s < f for s, f in zip(pos["subject"], pos["final"]))
    assert tiny.tokenizer.decode([tiny.encode(prompts[0])[pos["subject"][0]]]).strip() == names[0].split()[-1]


def test_residuals_at_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="empty"):
        residuals_at(tiny, [], {"final": []})
    with pytest.raises(ValueError, match="positions for"):
        residuals_at(tiny, ["Fact : a"], {"final": [0, 1]})
    with pytest.raises(ValueError, match="'final' position lies outside"):
        residuals_at(tiny, ["Fact : a"], {"final": [50]})
    with pytest.raises(ValueError, match="probe position lies outside"):
        residuals_at(tiny, ["Fact : a"], [-1])
    with pytest.raises(ValueError, match="empty"):
        athlete_residuals(tiny, [])


def test_probe_split_keeps_probed_athletes_out_of_training(athletes, task):
    train, probed = probe_split(task, athletes)
    assert set(train.athlete).isdisjoint(probed.athlete)
    assert len(train) + len(probed) == len(athletes) and set(probed.athlete) == set(task.eval_forget.athlete)
    golf = make_task("sport_to_golf", athletes=athletes, sport="basketball", seed=0, n_maintain=8)
    train, probed = probe_split(golf, athletes)
    assert set(probed.athlete) == set(golf.eval_forget.athlete)
    assert "basketball" in set(train.sport)  # learned from the trained half
    cf = make_task("athletes_to_sport", athletes=athletes, n=4)
    cf.kind = "counterfact"
    with pytest.raises(ValueError, match="sports"):
        probe_split(cf, athletes)


def test_probes_read_separable_labels_and_skip_unknown_edit_labels():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 10)
    centers = {"a": 0, "b": 5, "c": 10}

    def feats():  # layer 0 carries nothing about the label, layers 1-2 separate it
        return {"final": np.stack([np.stack([rng.normal(centers[y] * (l > 0), 1, 4) for y in labels])
                                   for l in range(3)])}

    probes = train_position_probes(feats(), labels)
    test = feats()
    c = probe_curves(probes, test, labels, ["b"] * 30)
    assert c["final"]["true"][0] < 0.7 and c["final"]["true"][1:].min() == 1.0
    assert c["final"]["edit"][1:].max() == pytest.approx(1 / 3)
    assert probe_curves(probes, test, labels, ["golf"] * 30)["final"]["edit"] is None


def test_edit_paths_and_missing_edits_name_notebook_03(results_dir, tmp_path):
    assert set(edit_paths(results_dir, "athletes_to_sport")) == {"flu", "ap"}
    with pytest.raises(MissingResultsError, match="03_editing_and_unlearning"):
        edit_paths(tmp_path, "athletes_to_sport")
    with pytest.raises(MissingResultsError, match="ct"):
        edit_paths(results_dir, "athletes_to_sport", ["flu", "ct"])


def test_task_from_edit_rebuilds_the_same_split(results_dir, athletes, task):
    again = task_from_edit(edit_paths(results_dir, "athletes_to_sport"), athletes)
    pd.testing.assert_frame_equal(again.eval_forget, task.eval_forget)
    pd.testing.assert_frame_equal(again.train_maintain, task.train_maintain)


def test_latent_curves_on_edited_models(tiny, athletes, task, results_dir, capsys):
    names = EDITED + LATE["ap"]
    before = snapshot(tiny, names)
    res = latent_curves(tiny, task, athletes, edit_paths(results_dir, task.name), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(tiny, names).items())
    assert res.weights_restored and 0 <= res.restore_rel_diff <= EVAL_ATOL
    assert set(res.curves.method) == {"base", "flu", "ap"} and set(res.curves.protocol) == {"paper", "ours"}
    ours, paper = res.curves[res.curves.protocol == "ours"], res.curves[res.curves.protocol == "paper"]
    assert set(ours.label) == {"true", "edit"} and set(paper.label) == {"true", "edit", "shuffled", "maintain_cv"}
    assert len(ours) == 3 * 2 * 2 * tiny.n_layers and len(paper) == 3 * 2 * 4 * tiny.n_layers
    assert res.curves.acc.between(0, 1).all()
    # on the base model both protocols train on the same residuals: the same probes, the same curves
    both = res.curves[(res.curves.method == "base") & res.curves.label.isin(["true", "edit"])]
    a, b = (both[both.protocol == p].sort_values(["position", "label", "layer"]).acc.to_numpy() for p in ("ours", "paper"))
    np.testing.assert_array_equal(a, b)
    assert set(res.paper_correct) == {"base", "flu", "ap"}
    mid = tiny.n_layers // 2
    for m, hits in res.paper_correct.items():  # the per-athlete hits average to the curve's mid-layer value
        row = paper[(paper.method == m) & (paper.position == "final") & (paper.label == "true") & (paper.layer == mid)]
        assert len(hits) == len(task.eval_forget) and np.mean(hits) == pytest.approx(row.acc.item())
    assert all(v[-1] > 0.01 for v in res.change.values())  # the perturbed matrix moved the residual stream
    # an edit moves the residual from its first edited layer on, never below it
    assert res.first_layer == {"flu": 0, "ap": 1}
    # same process, same inputs, same weights below AP's first edited layer: bit-identical on any host
    assert res.change["flu"][0] > 0 and res.change["ap"][0] == 0.0 and res.change["ap"][1] > 0
    base_curve = res.curves[(res.curves.method == "base") & (res.curves.layer == 0)].acc.tolist()
    assert res.curves[(res.curves.method == "ap") & (res.curves.layer == 0)].acc.tolist() == base_curve
    # the edit changes the probed activations, the base ones stay
    assert not np.allclose(res.features["flu"]["final"], res.features["base"]["final"])
    m = flat_metrics(res, tiny.n_layers)
    assert len(m["athletes_to_sport.flu.final.true_acc_by_layer"]) == tiny.n_layers
    assert 0 <= m["athletes_to_sport.ap.subject.edit_acc.mid"] <= 1
    assert len(m["athletes_to_sport.flu.paper.final.maintain_cv_acc_by_layer"]) == tiny.n_layers
    assert m["athletes_to_sport.flu.paper.final.true_acc.mid"] == pytest.approx(np.mean(m["athletes_to_sport.flu.paper.final.true_correct_mid"]))
    assert "athletes_to_sport.flu.paper.subject.shuffled_acc.max" in m
    assert m["athletes_to_sport.methods"] == ["ap", "flu"]  # sorted by file name
    s = summary(res.curves, tiny.n_layers)
    assert s.loc[("base", "final", "true"), "max"] >= s.loc[("base", "final", "true"), "mid"]
    fig = plot_latent_curves(res.curves, "tiny", chance=1 / 3)
    assert len(fig.axes) == 4
    fig = plot_latent_curves(res.curves, "tiny", chance=1 / 3, protocol="paper", positions=("final",))
    assert [ax.get_title() for ax in fig.axes] == ["final token | " + t for t in (
        "true label", "injected label", "control: shuffled labels", "control: maintain athletes (CV)")]
    assert all(len(ax.get_lines()) >= 3 for ax in fig.axes)  # one line per model at least
    with pytest.raises(ValueError, match="no probe curves"):
        plot_latent_curves(res.curves, protocol="paper", positions=("nowhere",))
    table = probe_table(res, "flu", "subject", 1)
    assert list(table.columns) == ["athlete", "sport", "target", "probe_reads", "confidence"]
    assert set(table.probe_reads) <= {"basketball", "baseball", "football"}
    with pytest.raises(ValueError, match="no edited model"):
        probe_table(res, "ct", "subject", 1)
    with pytest.raises(ValueError, match="layer"):
        probe_table(res, "flu", "subject", 9)
    ui = probe_widget({task.name: res})
    (_, method), (position, layer) = ui.children[0].children, ui.children[1].children
    capsys.readouterr()
    method.value, position.value = "flu", "final"
    layer.value = 0
    shown = capsys.readouterr().out
    assert str(probe_table(res, "flu", "final", 0)) in shown  # the slider's layer, the dropdowns' model
    layer.value = 1
    assert str(probe_table(res, "flu", "final", 1)) in capsys.readouterr().out


def test_an_edit_that_changes_nothing_is_an_error(tiny, athletes, task, tmp_path):
    save_edit(tiny, EDITED, tmp_path / EDITS_STEM / "edits" / task.name / "flu",
              {"task": task.name, "task_meta": task.meta, "method": "flu"})
    with pytest.raises(RuntimeError, match="unchanged"):
        latent_curves(tiny, task, athletes, edit_paths(tmp_path, task.name), progress=False)
    meta = json.loads((tmp_path / EDITS_STEM / "edits" / task.name / "flu.json").read_text())
    assert meta["task_meta"] == task.meta


def test_paper_protocol_probes_fit_on_the_model_they_test_with_two_controls():
    """The paper's protocol on synthetic residuals: a separable layer reads the labels, the probe fit on
    shuffled labels does not (the chance control), the maintain CV control sees the same separability."""
    from mechunlearn_utils.evaluate.latent import paper_probe_curves

    rng = np.random.default_rng(1)
    labels = np.array(["a", "b", "c"] * 20)
    centers = {"a": 0, "b": 6, "c": 12}

    def feats(y):  # layer 0 carries nothing, layer 1 the label
        return {"final": np.stack([np.stack([rng.normal(centers[v] * l, 1, 8) for v in y]) for l in range(2)])}

    test = np.array(["a", "b", "c"] * 10)
    curves, probes = paper_probe_curves(feats(labels), labels, feats(test), test, ["b"] * 30, seed=0)
    c = curves["final"]
    assert set(c) == {"true", "edit", "shuffled", "maintain_cv"} and len(probes["final"]) == 2
    assert c["true"][1] == 1.0 and c["maintain_cv"][1] == 1.0 and c["edit"][1] == pytest.approx(1 / 3)
    assert c["shuffled"][1] < 0.7 and c["maintain_cv"][0] < 0.7  # shuffled labels, no signal: near chance
