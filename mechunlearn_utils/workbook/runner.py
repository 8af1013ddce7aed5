"""Run the workbook's notebooks in order with papermill (used by `make workbook` and the tests).

    python -m mechunlearn_utils.workbook.runner                 # every notebook, full mode
    python -m mechunlearn_utils.workbook.runner --smoke         # SMOKE=True (CI)
    python -m mechunlearn_utils.workbook.runner --only 01_factual_recall_circuits -p MODEL smollm2-135m
    python -m mechunlearn_utils.workbook.runner -p DTYPE float32     # exact fp32 (also: MECHUNLEARN_DTYPE=float32)

Executed notebooks land next to their metrics in RESULTS_DIR/<stem>/, each also as <stem>.html, and
RESULTS_DIR/index.html links them with their figures and headline numbers (`workbook.pages`). The
run stops at the first failing notebook and names the failing cell.

The kernel talks to papermill over IPC (Unix sockets), not unencrypted TCP on localhost, and
preloads tcmalloc where the system has it (`core.allocator`; MECHUNLEARN_ALLOCATOR=system: glibc's).
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mechunlearn_utils.core.allocator import kernel_environment
from mechunlearn_utils.core.paths import NOTEBOOK_DIR, STEMS
from mechunlearn_utils.workbook.notebook import resolve_results_dir
from mechunlearn_utils.workbook.pages import export_html, write_index

IPC_PREFIX = "mechunlearn-kernel-"  # private folders of the kernels' IPC sockets (`ipc_kernel_manager`)
CELL_TIMEOUT_S = 3600  # a cell that hangs (e.g. a widget blocking the kernel) fails instead of blocking


# Which earlier notebooks' results each notebook reads (07 reports 04 and 05 as "not measured" when absent).
DEPENDS_ON = {STEMS[k]: [STEMS[d] for d in deps] for k, deps in {
    "circuits": ["setup"],
    "localization": ["setup"],
    "depth": ["setup", "localization"],
    "edits": ["setup", "localization"],
    "latent": ["edits"],
    "attacks": ["edits"],
    "masking": ["edits"],
    "results": ["setup", "edits", "latent", "attacks"],
}.items()}


def prerequisites(stem: str) -> list[str]:
    """`stem` and every notebook it needs, in workbook order."""
    needed, todo = set(), [stem]
    while todo:
        s = todo.pop()
        if s not in needed:
            needed.add(s)
            todo += DEPENDS_ON.get(s, [])
    return [s for s in notebook_stems() if s in needed]


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


NOTEBOOK_GLOBS = ("[0-9][0-9]_*.py", "[0-9][0-9][a-z]_*.py")  # 02_..., and 02b_... between 02 and 03


def notebook_stems() -> list[str]:
    """Numbered notebooks in order (from the .py sources): "02_x" < "02b_y" < "03_z" as strings."""
    return sorted({p.stem for g in NOTEBOOK_GLOBS for p in NOTEBOOK_DIR.glob(g)})


def _cell_source(nb_path: Path, exec_count) -> str:
    """Source of the executed code cell with this execution count (papermill adds a banner cell
    at the top of a failed notebook, so cell indices are off by one there)."""
    try:
        cells = json.loads(nb_path.read_text())["cells"]
        cell = next(c for c in cells if c["cell_type"] == "code" and c.get("execution_count") == exec_count)
        return "".join(cell["source"])[:400]
    except Exception:  # noqa: BLE001 - best effort for the error message only
        return ""


def ipc_kernel_manager():
    """The kernel manager class papermill starts kernels with: jupyter_client's async manager with
    IPC transport (ipykernel then has nothing to warn about: "running over TCP without encryption")."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        def _ip_default(self) -> str:
            # jupyter_client's default socket path is "kernel-ipc" in the working directory: two
            # runs at once in one folder (`make test` beside `make workbook`, or parallel notebooks)
            # took the same socket names and one kernel never answered (measured). One private
            # directory per kernel instead, removed with its sockets.
            return str(Path(tempfile.mkdtemp(prefix=IPC_PREFIX)) / "ipc")

        def cleanup_ipc_files(self) -> None:
            super().cleanup_ipc_files()
            if Path(self.ip).parent.name.startswith(IPC_PREFIX):
                shutil.rmtree(Path(self.ip).parent, ignore_errors=True)

    return IPCKernelManager


def execute(src: Path, out: Path, parameters: dict, cwd: Path, log_output: bool = False) -> None:
    """papermill `src` -> `out` in `cwd` with an IPC kernel (raises papermill's execution error)."""
    import papermill as pm

    with kernel_environment():  # the kernel preloads tcmalloc where the system has it (core.allocator)
        pm.execute_notebook(str(src), str(out), parameters=parameters, cwd=str(cwd), kernel_name="python3",
                            progress_bar=False, log_output=log_output, execution_timeout=CELL_TIMEOUT_S,
                            kernel_manager_class=ipc_kernel_manager())


def run_notebook(stem: str, results_dir, parameters: dict | None = None, log_output: bool = False,
                 html: bool = True) -> Path:
    """Execute notebooks/<stem>.ipynb with papermill; returns the executed notebook's path.
    `html`: also write it as <stem>.html next to it (a failed notebook too, with its traceback)."""
    import papermill as pm

    src = NOTEBOOK_DIR / f"{stem}.ipynb"
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist (run `jupytext --sync notebooks/{stem}.py`)")
    results_dir = resolve_results_dir(results_dir)
    out = results_dir / stem / f"{stem}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {"RESULTS_DIR": str(results_dir), **(parameters or {})}
    try:
        execute(src, out, params, NOTEBOOK_DIR, log_output)
    except pm.PapermillExecutionError as err:
        if html:
            export_html(out)
        raise NotebookFailed(
            f"notebook {stem} failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}\n--- cell source ---\n{_cell_source(out, err.exec_count)}\n"
            f"--- executed notebook with the traceback: {out}") from None
    if html:
        export_html(out)
    return out


def run_all(results_dir=None, parameters: dict | None = None, only: list[str] | None = None,
            until: str | None = None, log=print) -> dict[str, float]:
    """Run notebooks in order (optionally only some, or up to `until`); returns seconds per notebook."""
    stems = notebook_stems()
    if only:
        unknown = sorted(set(only) - set(stems))
        if unknown:
            raise ValueError(f"unknown notebook(s) {unknown}; known: {stems}")
        stems = [s for s in stems if s in only]
    if until:
        if until not in stems:
            raise ValueError(f"unknown notebook {until!r}; known: {stems}")
        stems = stems[: stems.index(until) + 1]
    times = {}
    try:
        for i, stem in enumerate(stems, 1):
            log(f"[{i}/{len(stems)}] {stem} ...", flush=True) if log is print else log(stem)
            t0 = time.perf_counter()
            run_notebook(stem, results_dir, parameters)
            times[stem] = time.perf_counter() - t0
            log(f"[{i}/{len(stems)}] {stem} done in {times[stem]:.0f} s", flush=True) if log is print else None
    finally:
        index = write_index(resolve_results_dir(results_dir))
        log(f"index of the executed workbook: {index}", flush=True) if log is print else None
    return times


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="run with SMOKE=True (small and fast)")
    ap.add_argument("--results", default="", help="RESULTS_DIR (default <repo>/results)")
    ap.add_argument("--only", nargs="*", help="notebook stems to run (in workbook order)")
    ap.add_argument("--until", help="run notebooks up to and including this stem")
    ap.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                    help="notebook parameter, e.g. -p MODEL smollm2-135m")
    args = ap.parse_args(argv)
    params = {k: _parse_value(v) for k, v in args.p}
    if args.smoke:
        params["SMOKE"] = True
    t0 = time.perf_counter()
    try:
        times = run_all(args.results, params, args.only, args.until)
    except (NotebookFailed, FileNotFoundError, ValueError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    print("notebook times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; total {total:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
