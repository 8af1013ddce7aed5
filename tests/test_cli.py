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
