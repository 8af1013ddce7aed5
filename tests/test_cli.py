"""The `recall` command."""

import json
import subprocess
import sys

import pytest

from mechunlearn_utils.__main__ import main


def test_recall_prints_json(tmp_path, capsys):
    csv = tmp_path / "a.csv"
    csv.write_text("athlete,sport\nMichael Jordan,basketball\nBabe Ruth,baseball\nTom Brady,football\n")
    assert main(["recall", "--model", "tiny-random", "--facts", str(csv), "--format", "question"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and 0 <= out["accuracy"] <= 1 and 0 < out["mean_p_norm"] < 1
    assert set(out["accuracy_by_sport"]) == {"basketball", "baseball", "football"}


@pytest.mark.parametrize("content,message", [
    ("name,sport\nX,basketball\n", "lacks column"),
    ("athlete,sport\nX,cricket\n", "unknown sport"),
    ("athlete,sport\n", "no rows"),
    ("", "empty"),
])
def test_bad_csvs_get_a_one_line_error(tmp_path, content, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "mechunlearn_utils", "recall", "--model", "tiny-random",
                           "--facts", str(csv)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


def test_bad_template_is_rejected(tmp_path, capsys):
    csv = tmp_path / "a.csv"
    csv.write_text("athlete,sport\nMichael Jordan,basketball\n")
    assert main(["recall", "--model", "tiny-random", "--facts", str(csv), "--template", "no slot"]) == 2
    assert "{athlete}" in capsys.readouterr().err


def test_recall_with_an_edit_reports_the_edited_model(tmp_path, capsys):
    """--edit applies a saved edit first (a scaled late MLP changes the numbers); a missing one is a clear error."""
    import torch

    from mechunlearn_utils import load_model
    from mechunlearn_utils.edit.storage import save_edit

    csv = tmp_path / "a.csv"
    csv.write_text("athlete,sport\nMichael Jordan,basketball\nBabe Ruth,baseball\nTom Brady,football\n")
    assert main(["recall", "--model", "tiny-random", "--facts", str(csv)]) == 0
    base = json.loads(capsys.readouterr().out)
    model = load_model("tiny-random", "cpu")
    name = next(n for n in model.named_parameters() if n.endswith("layers.1.mlp.down_proj.weight"))
    with torch.no_grad():
        model.named_parameters()[name].mul_(-25.0)
    path = save_edit(model, [name], tmp_path / "edit", {"method": "test"})
    assert main(["recall", "--model", "tiny-random", "--facts", str(csv), "--edit", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["edit"] == str(path) and out["mean_p_norm"] != pytest.approx(base["mean_p_norm"], abs=1e-4)
    assert main(["recall", "--model", "tiny-random", "--facts", str(csv), "--edit", str(tmp_path / "none")]) == 2
    assert "03_editing_and_unlearning" in capsys.readouterr().err


def test_run_forwards_its_arguments_to_the_workbook_runner(monkeypatch):
    """`python -m mechunlearn_utils run ...` is the runner's command line (parsed, not executed)."""
    from mechunlearn_utils.workbook import runner

    seen = {}

    def fake_run_all(results, params, only, until):
        seen.update(results=results, params=params, only=only, until=until)
        return {}

    monkeypatch.setattr(runner, "run_all", fake_run_all)
    assert main(["run", "--smoke", "--only", "00_setup", "-p", "MODEL", "smollm2-135m"]) == 0
    assert seen == dict(results="", params={"SMOKE": True, "MODEL": "smollm2-135m"}, only=["00_setup"], until=None)
    seen.clear()
    assert runner.main(["--smoke", "--only", "00_setup"]) == 0  # the runner's own entry point still works
    assert seen["only"] == ["00_setup"] and seen["params"] == {"SMOKE": True}


def test_run_help_is_the_runners(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0 and "--smoke" in capsys.readouterr().out
