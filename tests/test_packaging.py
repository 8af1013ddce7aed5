"""Project conventions: one place for pins, notebooks paired and clean, parameters cells."""

import json
import re
import statistics
from pathlib import Path

import pytest

from mechunlearn_utils.workbook.runner import notebook_stems

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = [ROOT / "notebooks" / f"{s}.py" for s in notebook_stems()]  # 02b_... too


def _pins(lines):
    return sorted(l.strip() for l in lines if re.match(r"^[A-Za-z0-9_.\-]+==", l.strip()))


def test_environment_yml_repeats_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = _pins(l.strip().lstrip("- ") for l in (ROOT / "environment.yml").read_text().splitlines())
    assert req and req == env
    assert "torch==2.13.0" in req
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make workbook" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pair_in_sync_and_without_outputs(py):
    import jupytext

    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{py.name} has no paired .ipynb: jupytext --set-formats ipynb,py:percent {py}"
    stored = json.loads(ipynb.read_text())
    code = [c for c in stored["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{ipynb.name} is committed with outputs: strip them"
    from_py = jupytext.read(py)
    src = lambda cells: [("".join(c["source"]) if isinstance(c["source"], list) else c["source"]).strip()
                         for c in cells]
    assert src(from_py["cells"]) == src(stored["cells"]), \
        f"{ipynb.name} differs from {py.name}: run `jupytext --sync {py}`"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_cell_and_short_cells(py):
    import jupytext

    nb = jupytext.read(py)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged parameters"
    for name in ("MODEL", "DEVICE", "SEED", "SMOKE", "RESULTS_DIR"):
        assert re.search(rf"^{name} = ", code[0].source, re.M), f"parameters cell lacks {name}"
    lengths = [len([l for l in c.source.splitlines() if l.strip()]) for c in code]
    assert max(lengths) <= 40, f"a code cell has {max(lengths)} lines: move logic into mechunlearn_utils"
    assert statistics.median(lengths) <= 15
    assert nb.cells[0].cell_type == "markdown"
    assert f'"{py.stem}"' in py.read_text() or f"'{py.stem}'" in py.read_text(), \
        "the notebook must write metrics under its own stem"
