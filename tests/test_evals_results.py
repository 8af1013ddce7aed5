"""Batched evaluation and results I/O."""

import json

import numpy as np
import pytest
import torch

from mechunlearn_utils.evaluate.suite import final_logits, score_prompts, sports_recall
from mechunlearn_utils.data.datasets import load_athletes
from mechunlearn_utils.data.prompts import sport_prompts
from mechunlearn_utils.workbook.results import MissingResultsError, read_metrics, require_file, write_metrics


def test_final_logits_match_the_full_forward_for_ragged_batches(tiny):
    prompts = ["Fact : Michael Jordan plays the sport of", "Fact : Babe Ruth plays"]
    batch = tiny.tokenize(prompts)
    with torch.no_grad():
        got = final_logits(tiny, **batch)
        for i, p in enumerate(prompts):
            want = tiny.hf(torch.tensor([tiny.encode(p)])).logits[0, -1]
            assert torch.allclose(got[i], want, atol=1e-4)


def test_scores_do_not_depend_on_batch_size(tiny):
    athletes = load_athletes().head(10)
    pset = sport_prompts(list(athletes.athlete), list(athletes.sport))
    a = score_prompts(tiny, pset, batch_size=3)
    b = score_prompts(tiny, pset, batch_size=10)
    np.testing.assert_allclose(a.p_norm, b.p_norm, atol=1e-5)
    assert ((a.p_norm > 0) & (a.p_norm < 1)).all() and (a.p_correct <= a.p_norm + 1e-9).all()


def test_sports_recall_summary(tiny):
    summary, scores = sports_recall(tiny, load_athletes().head(9))
    assert summary["n"] == 9 and 0 <= summary["accuracy"] <= 1
    assert set(summary["accuracy_by_sport"]) <= {"basketball", "baseball", "football"}
    assert list(scores.athlete) == list(load_athletes().head(9).athlete)


def test_metrics_roundtrip_and_validation(tmp_path):
    write_metrics(tmp_path, "00_x", {"a": 1.5, "b": [1, 2], "c": np.float32(0.25)})
    got = read_metrics(tmp_path, "00_x")
    assert got.pop("dtype") in ("none", "float32", "bfloat16")  # what this process's model ran in
    assert isinstance(got.pop("torch_threads"), int)  # CPU threads of this process
    assert got.pop("git_commit")  # the code that ran ("unknown" outside a git checkout)
    assert " x" in got.pop("host")  # the CPU it ran on: "<model> x<cores> (<native bf16 flags>)"
    assert got.pop("allocator") in ("system", "tcmalloc")  # this process's malloc (core.allocator)
    assert got == {"a": 1.5, "b": [1, 2], "c": 0.25}
    with pytest.raises(TypeError, match="flat"):
        write_metrics(tmp_path, "00_x", {"a": {"b": 1}})
    with pytest.raises(ValueError, match="not finite"):
        write_metrics(tmp_path, "00_x", {"a": float("nan")})
    # a failed write leaves the previous file intact
    assert json.loads((tmp_path / "00_x" / "metrics.json").read_text())["a"] == 1.5
    assert not list((tmp_path / "00_x").glob("*.tmp"))


def test_missing_results_name_the_notebook(tmp_path):
    with pytest.raises(MissingResultsError, match="run notebooks/00_setup.py first"):
        read_metrics(tmp_path, "00_setup")
    with pytest.raises(MissingResultsError, match="00_setup"):
        require_file(tmp_path, "00_setup", "known_athletes.csv")


def test_one_pass_measures_match_separate_ones(tiny):
    from mechunlearn_utils.evaluate.suite import sports_measure

    df = load_athletes().head(6).assign(target="golf")
    cands = ("basketball", "baseball", "football", "golf")
    both = sports_measure(tiny, df, ["sport", "target"], "mcq", cands)
    for col in ("sport", "target"):
        alone = sports_measure(tiny, df, col, "mcq", cands)
        assert abs(both[col]["p"] - alone["p"]) < 1e-6 and both[col]["acc"] == alone["acc"]


def test_claim_verdicts_follow_the_numbers():
    from mechunlearn_utils.workbook.results import claim_verdict

    assert claim_verdict({"flu": 0.1, "ap": 0.5, "ct": 0.4})[0] == "reproduced"
    assert claim_verdict({"flu": 0.6, "ap": 0.5, "ct": 0.4})[0] == "not reproduced"
    assert claim_verdict({"flu": 0.3, "ap": 0.5, "ct": 0.32})[0] == "mixed"
    assert claim_verdict({"flu": 0.9, "ap": 0.5}, lower_is_better=False)[0] == "reproduced"
    assert claim_verdict({"ap": 0.5})[0] == "not measured"


def test_side_by_side_joins_on_task_method_measure():
    from mechunlearn_utils.workbook.results import load_paper_results, metrics_long, side_by_side

    ours = metrics_long({"sport_to_golf.flu.forget.mcq.p_true": 0.2, "counterfact.ap.neighborhood.p_true": 0.7,
                         "model": "x", "sport_to_golf.flu.train.seconds": 3.0})
    table = side_by_side(ours, load_paper_results())
    assert len(table) == 2
    row = table[(table.task == "sport_to_golf") & (table.method == "flu")].iloc[0]
    assert row.ours == 0.2 and row.paper == 0.278
    # the paper's whole-sport table is a mean over its three sport splits: each of ours is set beside it
    per_sport = metrics_long({"football_to_golf.flu.forget.mcq.p_true": 0.3, "baseball_to_golf.ct.forget.mcq.p_true": 0.4})
    both = side_by_side(per_sport, load_paper_results()).set_index("task")
    assert both.loc["football_to_golf", "paper"] == 0.278 and both.loc["baseball_to_golf", "paper"] == 0.462


def test_compare_runs_reports_the_largest_difference_and_ignores_timings(tmp_path):
    from mechunlearn_utils.workbook.results import compare_runs

    write_metrics(tmp_path / "a", "01_x", {"acc": 0.5, "curve": [0.1, 0.2], "seconds_total": 10.0, "model": "m"})
    write_metrics(tmp_path / "b", "01_x", {"acc": 0.5, "curve": [0.1, 0.25], "seconds_total": 99.0, "model": "m"})
    write_metrics(tmp_path / "a", "02_y", {"acc": 0.5, "only_a": 1.0})
    write_metrics(tmp_path / "b", "02_y", {"acc": 0.5, "model": "other"})
    t = compare_runs(tmp_path / "a", tmp_path / "b").set_index("stem")
    assert t.loc["01_x", "max_abs_diff"] == pytest.approx(0.05) and t.loc["01_x", "worst_key"] == "curve"
    assert t.loc["01_x", "n_compared"] == 2 and t.loc["01_x", "mismatched"] == []
    assert t.loc["02_y", "max_abs_diff"] == 0 and set(t.loc["02_y", "mismatched"]) == {"only_a", "model"}
    assert "over_tol" not in t
    t = compare_runs(tmp_path / "a", tmp_path / "b", tol=0.01).set_index("stem")
    assert t.loc["01_x", "over_tol"] == ["curve"] and t.loc["01_x", "n_over_tol"] == 1 and t.loc["02_y", "n_over_tol"] == 0


def test_compare_verdicts_lines_up_two_runs_and_flags_changes(tmp_path):
    import pandas as pd

    from mechunlearn_utils.workbook.results import MissingResultsError, compare_verdicts

    rows = dict(id=["g", "g", "r"], task=["t1", "t2", "t1"], measure=["m", "m", "x"],
                verdict=["reproduced", "mixed", "not reproduced"], verdict_ci=["reproduced", "inconclusive", "-"],
                numbers=["1", "2", "3"])
    for run, change in (("a", {}), ("b", {1: "reproduced"})):
        (tmp_path / run / "07_results").mkdir(parents=True)
        t = pd.DataFrame(rows)
        for i, v in change.items():
            t.loc[i, "verdict"] = v
        t.iloc[:2 if run == "b" else 3].to_csv(tmp_path / run / "07_results" / "verdicts.csv", index=False)
    v = compare_verdicts(tmp_path / "a", tmp_path / "b").set_index(["id", "task"])
    assert list(v.changed) == [False, True, True]  # same; verdict changed; a row only in run a
    assert v.loc[("g", "t2"), "verdict (a)"] == "mixed" and v.loc[("g", "t2"), "verdict (b)"] == "reproduced"
    with pytest.raises(MissingResultsError, match="07_results"):
        compare_verdicts(tmp_path / "a", tmp_path / "missing")


def test_latent_position_is_where_the_base_probe_reads_best():
    from mechunlearn_utils.workbook.results import latent_position

    probes = {"t.base.final.true_acc.mid": 0.6, "t.base.subject.true_acc.mid": 0.8,
              "t.flu.final.true_acc.mid": 0.0, "t.flu.subject.true_acc.mid": 0.9}
    assert latent_position(probes) == "subject"  # edited models never decide it
    assert latent_position({**probes, "t.base.final.true_acc.mid": 0.95}) == "final"
    assert latent_position({}) == "final"


def test_robustness_vs_side_effects_pairs_each_method_with_its_change_from_base():
    from mechunlearn_utils.workbook.results import metrics_long, robustness_vs_side_effects

    edits = metrics_long({"t.base.side.lm_loss": 3.0, "t.flu.side.lm_loss": 3.2, "t.ap.side.lm_loss": 2.9,
                          "u.flu.side.lm_loss": 9.0})  # task u: no base row, no attack
    attacks = metrics_long({"t.flu.relearn20.normal.p_true": 0.1, "t.ap.relearn20.normal.p_true": 0.4,
                            "t.ct.relearn20.normal.p_true": 0.3})  # ct: no edit measure
    got = robustness_vs_side_effects(edits, attacks).set_index("method")
    assert sorted(got.index) == ["ap", "flu"]
    assert got.loc["flu", "side_effect"] == pytest.approx(0.2) and got.loc["ap", "attack_p_true"] == 0.4


def test_report_script_tables_come_from_the_metrics(tmp_path):
    import runpy
    from pathlib import Path

    report = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "report_results.py"))["report"]
    write_metrics(tmp_path, "03_editing_and_unlearning", {"t.flu.forget.normal.p_true": 0.0123, "t.base.forget.normal.p_true": 0.61,
                                                          "t.flu.lr": 3e-4, "seconds_total": 100.0})
    text = report(tmp_path)
    assert "03 editing: t" in text and "0.0123" in text and "0.0003" in text  # small numbers not rounded away
    assert "| total" in text and "07 verdicts" not in text  # sections without results are left out


def test_report_script_localization_and_depth_tables(tmp_path):
    import runpy
    from pathlib import Path

    report = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "report_results.py"))["report"]
    write_metrics(tmp_path, "02_localization", {"sports.flu.mlp_layers": [2, 3], "sports.flu.attn_layers": [],
                                                "sports.flu.n_params": 123, "seconds_total": 1.0})
    write_metrics(tmp_path, "02b_depth_sweep", {"k": 4, "window_starts": [0, 14], "base.forget_normal": 0.826,
                                                "window.0.forget_normal": 0.0061, "window.14.forget_normal": 0.158,
                                                "window.14.took": False, "contrast.relearn_heldout.ci_low": 0.6313,
                                                "contrast.relearn_heldout.ci_high": 0.9192, "seconds_total": 2.0})
    text = report(tmp_path)
    assert "02 localizations" in text and "| 2, 3" in text and "123" in text
    assert "02b depth sweep" in text and "MLPs 14-17" in text and "0.0061" in text and "0.826" in text
    assert "| relearn_heldout | 0.6313 | 0.9192 |" in text and "unseen_mean" not in text  # only the measured one


def test_report_script_relearning_curves_verdict_columns_and_readme_block(tmp_path):
    import runpy
    from pathlib import Path

    import pandas as pd

    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "report_results.py"))
    write_metrics(tmp_path, "05_attacks", {"t.flu.relearn_lora.steps": [0, 20],
                                           "t.flu.relearn_lora.forget_p_true_by_step": [0.01, 0.25],
                                           "t.flu.relearn_lora.train_p_true_by_step": [0.02, 0.99],
                                           "seconds_total": 5.0})
    (tmp_path / "07_results").mkdir()
    pd.DataFrame([dict(id="relearning", claim="2 resists relearning", task="t", measure="m", verdict="mixed",
                       numbers="FLU 0.1 vs ap 0.2", paper="FLU 0.2 vs ap 0.8", verdict_ci="reproduced",
                       **{"ci (rival - flu)": "ap [+0.100, +0.300]", "ci source": "relearn_lora"})]).to_csv(
        tmp_path / "07_results" / "verdicts.csv", index=False)
    text = mod["report"](tmp_path)
    assert "| t      | flu      | relearn_lora | 0.010 / 0.020 | 0.250 / 0.990 |" in text  # held-out / trained
    assert "FLU 0.2 vs ap 0.8" in text and "ap [+0.100, +0.300]" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report_results: begin (generated) -->\nold\n<!-- report_results: end -->\nrest\n")
    mod["main"]([str(tmp_path), "--readme", str(readme)])
    new = readme.read_text()
    assert new.startswith("intro\n<!-- report_results: begin (generated) -->\n") and new.endswith("end -->\nrest\n")
    assert "old" not in new and "#### 07 verdicts" in new and "relearning: forget" not in new  # headline only
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="report_results"):
        mod["main"]([str(tmp_path), "--readme", str(readme)])


def test_whole_sport_tasks_pool_into_the_papers_mean_over_sports():
    """Two or more per-sport tasks of 03 -> one pooled task: means over the sports, per-fact lists
    concatenated in task order; a measure missing from one sport is left out; one sport pools nothing."""
    from mechunlearn_utils.workbook.results import PAPER_TABLE_OF_TASK, WHOLE_SPORT_POOLED, pool_whole_sport

    m = {"basketball_to_golf.flu.forget.question.p_true": 0.1, "football_to_golf.flu.forget.question.p_true": 0.3,
         "basketball_to_golf.flu.per_fact.forget.question.p_true": [0.1, 0.1],
         "football_to_golf.flu.per_fact.forget.question.p_true": [0.2, 0.4],
         "football_to_golf.ap.side.lm_loss": 3.0, "athletes_to_sport.flu.forget.question.p_true": 0.9,
         "basketball_to_golf.flu.train.steps_done": True, "model": "x"}
    pooled = pool_whole_sport(m)
    assert pooled == {f"{WHOLE_SPORT_POOLED}.flu.forget.question.p_true": pytest.approx(0.2),
                      f"{WHOLE_SPORT_POOLED}.flu.per_fact.forget.question.p_true": [0.1, 0.1, 0.2, 0.4]}
    assert pool_whole_sport({k: v for k, v in m.items() if not k.startswith("football")}) == {}
    assert PAPER_TABLE_OF_TASK[WHOLE_SPORT_POOLED] == "sports_golf"
