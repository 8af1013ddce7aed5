"""Weights of an edit: select, snapshot and restore them; save an edit, load it, find saved ones.

* `select_parameters`, `snapshot`, `restore`   the named weights of a model, copies of them, putting
                                              copies back
* `save_edit`, `load_edited`, `edited`         an edit on disk: only the changed matrices
                                              (safetensors) plus a JSON of how it was made
* `edits_dir`, `available_methods`, `edit_path`, `edit_paths`, `edit_record`, `edit_info`, `task_kwargs`,
  `task_from_edit`                            the edits notebook 03 saved under a RESULTS_DIR, and
                                              the task (same split) each was trained on
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mechunlearn_utils.core.paths import STEMS
from mechunlearn_utils.edit.loop import EditError

EDITS_STEM = STEMS["edits"]
EDITS_NOTEBOOK = f"notebooks/{EDITS_STEM}.py"


# --------------------------------------------------------------------------- weights

def select_parameters(model, param_names: list[str]) -> dict[str, torch.nn.Parameter]:
    """The named HF parameters; a clear error for names the model lacks or an empty list."""
    if not param_names:
        raise EditError("the localization names no parameters to train")
    named = model.named_parameters()
    missing = [n for n in param_names if n not in named]
    if missing:
        raise EditError(f"{len(missing)} parameter(s) not in {model.name}, e.g. {missing[:2]}: "
                        "was this localization made for another model?")
    return {n: named[n] for n in param_names}


def snapshot(model, param_names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named weights (to restore the base model after an edit)."""
    return {n: p.detach().clone() for n, p in select_parameters(model, param_names).items()}


@torch.no_grad()
def restore(model, saved: dict[str, torch.Tensor]) -> None:
    params = select_parameters(model, list(saved))
    for n, t in saved.items():
        params[n].copy_(t)


# --------------------------------------------------------------------------- saving edits

def save_edit(model, param_names: list[str], path, meta: dict) -> Path:
    """Save only the edited matrices (safetensors) + `<path>.json` describing the edit."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    params = select_parameters(model, param_names)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(path))
    info = {"model": model.name, "param_names": list(param_names), **meta}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1, default=str))
    return path


def load_edited(model, path) -> dict[str, torch.Tensor]:
    """Put a saved edit onto `model` (in place). Returns the base weights it replaced (`restore`)."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"no saved edit at {path}: run {EDITS_NOTEBOOK} first")
    info = edit_record(path)
    if info.get("model") != model.name:
        raise EditError(f"edit {path.name} was made for {info.get('model')!r}, not {model.name!r}")
    tensors = load_file(str(path))
    base = snapshot(model, list(tensors))
    params = select_parameters(model, list(tensors))
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return base


@contextlib.contextmanager
def edited(model, path):
    """`with edited(model, path): ...` evaluates the edited model, then restores the base."""
    base = load_edited(model, path)
    try:
        yield model
    finally:
        restore(model, base)


# --------------------------------------------------------------------------- finding saved edits

def edits_dir(results_dir, task: str) -> Path:
    return Path(results_dir) / EDITS_STEM / "edits" / task


def available_methods(results_dir, task: str) -> list[str]:
    """Methods with a saved edit for `task` (sorted), [] when none."""
    d = edits_dir(results_dir, task)
    return sorted(p.stem for p in d.glob("*.safetensors") if p.with_suffix(".json").exists())


def edit_path(results_dir, task: str, method: str) -> Path:
    """The saved edit of (task, method), or an error that names the notebook to run."""
    from mechunlearn_utils.core.paths import MissingResultsError

    path = edits_dir(results_dir, task) / f"{method}.safetensors"
    if not path.exists() or not path.with_suffix(".json").exists():
        have = available_methods(results_dir, task)
        hint = f" (saved for this task: {', '.join(have)})" if have else ""
        raise MissingResultsError(
            f"no edited model for task {task!r}, method {method!r} at {path}{hint}: run "
            f"{EDITS_NOTEBOOK} first with the same RESULTS_DIR and this task and method")
    return path


def edit_paths(results_dir, task: str, methods=None) -> dict[str, Path]:
    """{method: saved edit} of a task (every saved one, or `methods`); a clear error when missing."""
    from mechunlearn_utils.core.paths import MissingResultsError

    have = available_methods(results_dir, task)
    if not have:
        raise MissingResultsError(
            f"no edited model of task {task!r} in {edits_dir(results_dir, task)}: run {EDITS_NOTEBOOK} first "
            f"(same RESULTS_DIR, with {task!r} in its TASKS)")
    return {m: edit_path(results_dir, task, m) for m in (methods or have)}


def edit_record(path) -> dict:
    """The JSON written next to a saved edit (`save_edit`: model, param_names, task, task_meta, config, ...)."""
    return json.loads(Path(path).with_suffix(".json").read_text())


def edit_info(results_dir, task: str, method: str) -> dict:
    """The JSON notebook 03 wrote next to the edit (task, task_meta, config, method, ...)."""
    return edit_record(edit_path(results_dir, task, method))


def task_kwargs(info: dict) -> dict:
    """`make_task` keyword arguments that rebuild the exact splits an edit was trained on."""
    meta = dict(info.get("task_meta") or {})
    kw = {"seed": meta.get("seed", 0)}
    if "sport" in meta:
        kw["sport"] = meta["sport"]
    if "n" in meta:
        kw["n"] = meta["n"]
    return kw


def task_from_edit(paths: dict[str, Path], athletes, facts=None):
    """Rebuild the task the edits were trained on (same split) from the metadata notebook 03 saved."""
    from mechunlearn_utils.data.tasks import make_task

    metas = {m: edit_record(p) for m, p in paths.items()}
    names = {(v["task"], json.dumps(v.get("task_meta", {}), sort_keys=True)) for v in metas.values()}
    if len(names) != 1:
        raise ValueError(f"the saved edits were made on different tasks or splits: {sorted(names)}")
    info = next(iter(metas.values()))
    return make_task(info["task"], athletes=athletes, facts=facts, **task_kwargs(info))
