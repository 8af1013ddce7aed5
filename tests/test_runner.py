"""The papermill runner: a failing notebook names its cell; prerequisites are in workbook order."""

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from mechunlearn_utils.workbook import runner as runner


def _notebook(folder, stem: str, cells: list, monkeypatch) -> None:
    """notebooks/<stem>.ipynb made of `cells` (a SMOKE parameters cell first unless given), with the
    runner pointed at `folder`."""
    if not any("parameters" in c.metadata.get("tags", []) for c in cells):
        cells = [nbformat.v4.new_code_cell("SMOKE = False", metadata={"tags": ["parameters"]}), *cells]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / f"{stem}.ipynb")
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", folder)


def test_a_failing_cell_is_named_with_its_source(tmp_path, monkeypatch):
    _notebook(tmp_path, "99_demo", [nbformat.v4.new_markdown_cell("# demo"),
                                    nbformat.v4.new_code_cell("SMOKE = False", metadata={"tags": ["parameters"]}),
                                    nbformat.v4.new_markdown_cell("the next cell fails"),
                                    nbformat.v4.new_code_cell("x = 1\nraise ValueError('boom here')")], monkeypatch)
    with pytest.raises(runner.NotebookFailed) as err:
        runner.run_notebook("99_demo", tmp_path / "results", {"SMOKE": True})
    message = str(err.value)
    assert "99_demo" in message and "ValueError: boom here" in message
    assert "raise ValueError('boom here')" in message  # the failing cell's source, not its neighbour


def test_prerequisites_come_in_workbook_order():
    stems = runner.notebook_stems()
    assert runner.prerequisites("00_setup") == ["00_setup"]
    needed = runner.prerequisites("07_results")
    assert needed == sorted(needed) and needed[-1] == "07_results"
    assert {"00_setup", "02_localization", "03_editing_and_unlearning", "05_attacks"} <= set(needed)
    assert set(needed) <= set(stems)


def test_a_notebook_runs_over_ipc_and_is_written_as_html(tmp_path, monkeypatch, capfd):
    _notebook(tmp_path, "99_ok", [nbformat.v4.new_code_cell("from ipykernel.kernelapp import IPKernelApp\n"
                                                            "print('transport', IPKernelApp.instance().transport)")],
              monkeypatch)
    out = runner.run_notebook("99_ok", tmp_path / "results", {"SMOKE": True})
    assert "transport ipc" in out.read_text()
    assert "without encryption" not in capfd.readouterr().err  # the kernel's TCP warning
    assert "transport ipc" in out.with_suffix(".html").read_text()


def test_threads_auto_is_one_on_a_busy_machine(monkeypatch):
    from mechunlearn_utils.workbook import notebook

    monkeypatch.setattr(notebook.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(notebook.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert notebook.choose_threads("auto") == 1
    monkeypatch.setattr(notebook.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert notebook.choose_threads("auto") is None  # torch's default: one per core
    assert notebook.choose_threads(3) == 3 and notebook.choose_threads(0) is None


def test_two_runs_at_once_in_one_folder_each_reach_their_kernel(tmp_path, monkeypatch):
    """jupyter_client's default IPC socket names ("kernel-ipc-N" in the working folder) collided when
    two runs started together ("Kernel didn't respond in 60 seconds"); each kernel has its own folder."""
    monkeypatch.setenv("MECHUNLEARN_ALLOCATOR", "system")  # no LD_PRELOAD juggling across the two threads
    _notebook(tmp_path, "99_ok", [nbformat.v4.new_code_cell("import time; time.sleep(1); print('ran')")], monkeypatch)
    socket_dirs = lambda: {p.name for p in Path(tempfile.gettempdir()).glob(runner.IPC_PREFIX + "*")}  # noqa: E731
    before = socket_dirs()
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda i: runner.run_notebook("99_ok", tmp_path / f"run{i}", {"SMOKE": True},
                                                           html=False), range(2)))
    assert all("ran" in out.read_text() for out in outs)
    assert not list(tmp_path.glob("kernel-ipc*"))  # no sockets in the notebooks' folder
    assert socket_dirs() <= before  # each kernel's socket folder is removed with it
