"""The edited models the attacks start from: the edits notebook 03 saved (`edit.storage`), found
for several tasks at once, and put on the model one after the other."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tqdm.auto import tqdm

from mechunlearn_utils.attacks.scoring import AttackError
from mechunlearn_utils.data.tasks import WHOLE_SPORT_TASKS
from mechunlearn_utils.edit.storage import available_methods, edit_path, edited, snapshot

SPORTS_TASKS = ("athletes_to_sport", "sport_to_golf", "unlearn_sport", *WHOLE_SPORT_TASKS)


def find_edits(results_dir, tasks: list[str], methods: list[str] | None = None) -> dict:
    """{(task, method): path} for the requested tasks; ``methods`` None or [] = every saved one.

    Raises the notebook-03 error when a task has no edit at all, or a requested method is missing
    for every task (a method missing for some tasks only is skipped)."""
    bad = [t for t in tasks if t not in SPORTS_TASKS]
    if not tasks or bad:
        raise AttackError(f"the attacks run on sports tasks {list(SPORTS_TASKS)}; got {list(tasks)} (CounterFact "
                          "facts have no shared answer set for soft prompts, languages and relearning splits)")
    found = {}
    for task in tasks:
        have = available_methods(results_dir, task)
        if not have:
            edit_path(results_dir, task, (methods or ["flu"])[0])  # raises with the hint
        for m in (methods or have):
            if m in have:
                found[task, m] = edit_path(results_dir, task, m)
    for m in methods or []:
        if not any(k[1] == m for k in found):
            edit_path(results_dir, tasks[0], m)  # raises, naming notebook 03
    return found


def over_edits(model, edits: dict, fn, include_base: bool = False, desc: str = "edited models",
               progress: bool = True) -> dict:
    """``{(task, method): fn(task, method)}``, each edit put on the model in turn and taken off again.

    ``include_base`` first adds ``(task, "base")`` for every task, run on the unedited model."""
    items = [((t, "base"), None) for t in dict.fromkeys(k[0] for k in edits)] if include_base else []
    out = {}
    for (task, method), path in tqdm(items + list(edits.items()), desc=desc, disable=not progress):
        with (contextlib.nullcontext() if path is None else edited(model, path)):
            out[task, method] = fn(task, method)
    return out


def over_splits(model, edits: dict, tasks: dict, seeds, attack, done: dict | None = None, desc: str = "split",
                progress: bool = True) -> dict:
    """One attack on several splits of each task's forget set into attack-train / held-out halves
    (`scoring.split_forget` with each of `seeds`), on every edited model of `edits`.

    ``attack(train, heldout, task)`` runs on the edited model and returns the p(true) of each held-out
    athlete. -> ``{(task, method): [(held-out athlete names, their p(true)), one per seed]}``, the input
    of `report.split_ci_verdicts`. `done` maps (task, method) to the held-out values of a run already
    made on the first seed's split (not run again)."""
    from mechunlearn_utils.attacks.scoring import split_forget

    runs: dict = {}
    for i, seed in enumerate(seeds):
        split = {t: split_forget(task.eval_forget, seed) for t, task in tasks.items()}
        got = ({k: done[k] for k in edits} if i == 0 and done is not None
               else over_edits(model, edits, lambda t, m: list(attack(*split[t], t)), desc=f"{desc} {seed}",
                               progress=progress))
        for (t, m), values in got.items():
            runs.setdefault((t, m), []).append((list(split[t][1].athlete), list(values)))
    return runs


def edit_weights(model, path) -> tuple[dict, dict]:
    """(base weights, edited weights) of the matrices a saved edit changes; call on the base model."""
    from safetensors.torch import load_file

    new = load_file(str(Path(path).with_suffix(".safetensors")))
    return snapshot(model, list(new)), new
