"""Editing / unlearning tasks: which facts to forget, which to maintain, and what to inject.

A `Task` holds prompt sets built from the facts notebook 00 kept:

* ``train_forget``  prompts trained toward ``target`` answers (editing) or away from the true one
* ``train_maintain`` prompts whose true answers must survive (trained with cross-entropy)
* ``eval_forget`` / ``eval_maintain``  facts evaluated after the edit (for the whole-sport task
  the forget evaluation is the held-out half of the sport: the edit must generalize to it)

Tasks, as in the paper: ``sport_to_golf`` (whole sport -> golf; the sport a parameter, basketball
by default), ``athletes_to_sport`` (N athletes -> another sport), ``counterfact`` (N facts ->
target_new), ``unlearn_sport`` (log(1-p) on one sport). The paper's whole-sport results are means over
its three splits, one per sport: ``basketball_to_golf``, ``football_to_golf``, ``baseball_to_golf``
are `sport_to_golf` with the sport fixed by the name (`WHOLE_SPORT_TASKS`, `whole_sport_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mechunlearn_utils.data.prompts import SPORTS

WHOLE_SPORT_TASKS = {f"{sport}_to_golf": sport for sport in SPORTS}  # the paper's three splits, one task each
TASKS = ("sport_to_golf", "athletes_to_sport", "counterfact", "unlearn_sport", *WHOLE_SPORT_TASKS)


def whole_sport_of(name: str) -> str | None:
    """The sport a task name fixes (``football_to_golf`` -> football), None for every other name."""
    return WHOLE_SPORT_TASKS.get(name)


@dataclass
class Task:
    name: str
    kind: str  # "sports" or "counterfact"
    mode: str  # "edit" (cross-entropy to the injected answer) or "unlearn" (log(1-p) of the true one)
    train_forget: pd.DataFrame
    train_maintain: pd.DataFrame
    eval_forget: pd.DataFrame
    eval_maintain: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.name} ({self.mode}): train forget {len(self.train_forget)}, train maintain "
                f"{len(self.train_maintain)}, eval forget {len(self.eval_forget)}, eval maintain "
                f"{len(self.eval_maintain)}")


def _check_nonempty(df: pd.DataFrame, what: str) -> None:
    if len(df) == 0:
        raise ValueError(f"the {what} set is empty: notebook 00 kept too few facts for this task")


def split_half(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(first half, second half) of the rows in the order of one permutation drawn from `rng`
    (the second half takes the odd row): every held-out split of the workbook."""
    idx = rng.permutation(len(df))
    half = len(df) // 2
    return df.iloc[idx[:half]].reset_index(drop=True), df.iloc[idx[half:]].reset_index(drop=True)


def sport_to_golf(athletes: pd.DataFrame, sport: str = "basketball", seed: int = 0,
                  n_maintain: int = 64, mode: str = "edit", name: str | None = None) -> Task:
    """Train half of `sport`'s athletes -> golf; evaluate the held-out half and other sports
    (`name`: the task's name, "sport_to_golf" / "unlearn_sport" by default)."""
    if sport not in SPORTS:
        raise ValueError(f"unknown sport {sport!r}; choose one of {SPORTS}")
    rng = np.random.default_rng(seed)
    forget = athletes[athletes.sport == sport].assign(target="golf")
    _check_nonempty(forget, f"{sport} athletes")
    if len(forget) < 2:
        raise ValueError(f"need at least 2 known {sport} athletes to hold half out, got {len(forget)}")
    train_f, eval_f = split_half(forget, rng)
    others = athletes[athletes.sport != sport].sample(frac=1.0, random_state=seed)
    train_m, eval_m = split_half(others.head(2 * n_maintain), rng)
    _check_nonempty(train_m, "maintain")
    name = name or ("sport_to_golf" if mode == "edit" else "unlearn_sport")
    return Task(name, "sports", mode, train_f, train_m, eval_f, eval_m,
                meta=dict(sport=sport, target="golf" if mode == "edit" else None, seed=seed))


def unlearn_sport(athletes: pd.DataFrame, sport: str = "basketball", seed: int = 0,
                  n_maintain: int = 64) -> Task:
    """Pure unlearning (log(1-p) of the true sport) of half a sport; held-out half evaluated."""
    return sport_to_golf(athletes, sport, seed, n_maintain, mode="unlearn")


def athletes_to_sport(athletes: pd.DataFrame, n: int = 16, seed: int = 0, n_maintain: int = 64) -> Task:
    """`n` athletes each -> another sport (chosen at random among the other two), like the paper."""
    rng = np.random.default_rng(seed)
    if n < 1:
        raise ValueError("n must be at least 1")
    if len(athletes) < n + 2:
        raise ValueError(f"need more than {n} known athletes, notebook 00 kept {len(athletes)}")
    shuffled = athletes.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    forget = shuffled.head(n).copy()
    forget["target"] = [rng.choice([s for s in SPORTS if s != sp]) for sp in forget.sport]
    rest = shuffled.iloc[n:]
    train_m, eval_m = split_half(rest.head(2 * n_maintain), rng)
    return Task("athletes_to_sport", "sports", "edit", forget, train_m, forget, eval_m,
                meta=dict(n=n, seed=seed))


def counterfact_task(facts: pd.DataFrame, n: int = 16, seed: int = 0, n_maintain: int = 32) -> Task:
    """The first `n` known facts -> target_new (as the paper takes the first rows); others maintained."""
    if len(facts) < n + 2:
        raise ValueError(f"need more than {n} known CounterFact facts, notebook 00 kept {len(facts)}")
    forget = facts.head(n).copy().reset_index(drop=True)
    forget["target"] = forget.target_new
    rest = facts.iloc[n:].sample(frac=1.0, random_state=seed)
    train_m, eval_m = split_half(rest.head(2 * n_maintain), np.random.default_rng(seed))
    return Task("counterfact", "counterfact", "edit", forget, train_m, forget, eval_m,
                meta=dict(n=n, seed=seed))


def make_task(name: str, athletes: pd.DataFrame | None = None, facts: pd.DataFrame | None = None,
              **kwargs) -> Task:
    """Build a task by name (see TASKS). A per-sport whole-sport task (``football_to_golf``) takes
    its sport from the name; a `sport` keyword (an edit's saved record) must agree with it."""
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    fixed = whole_sport_of(name)
    if fixed is not None:
        if kwargs.setdefault("sport", fixed) != fixed:
            raise ValueError(f"task {name!r} forgets {fixed}, not {kwargs['sport']!r}")
        kwargs["name"] = name
    source = facts if name == "counterfact" else athletes
    if source is None or len(source) == 0:
        raise ValueError(f"task {name!r} needs a non-empty {'facts' if name == 'counterfact' else 'athletes'} table")
    return BUILDERS[name](source, **kwargs)


# Every task name and its builder: the per-sport whole-sport tasks are sport_to_golf under their own name.
BUILDERS = {"sport_to_golf": sport_to_golf, "athletes_to_sport": athletes_to_sport, "unlearn_sport": unlearn_sport,
            "counterfact": counterfact_task, **{t: sport_to_golf for t in WHOLE_SPORT_TASKS}}
assert set(BUILDERS) == set(TASKS)


def size_kwargs(name: str, sport: str = "basketball", n: int = 16) -> dict:
    """The `make_task` keywords a notebook's SPORT and N_FACTS parameters give task `name`: the sport
    of ``sport_to_golf`` / ``unlearn_sport``, none for a per-sport task (its name fixes it), else `n`."""
    if name in ("sport_to_golf", "unlearn_sport"):
        return dict(sport=sport)
    return {} if name in WHOLE_SPORT_TASKS else dict(n=n)


def unrelated_facts(task: Task, facts: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to `n` CounterFact facts the task neither edits nor trains on (side-effect probe)."""
    used = set()
    if task.kind == "counterfact":
        used = set(task.train_forget.subject) | set(task.train_maintain.subject) | set(task.eval_forget.subject)
    return facts[~facts.subject.isin(used)].head(n).reset_index(drop=True)
