"""ipywidgets front-ends. Each wraps a pure, tested function; notebooks also call that function
directly so the default renders statically under papermill."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES

DEMO_LR = 3e-4  # the widget's learning rate when the notebook's sweep chose none for the method
MAINTAIN_PER_SPORT = 5  # maintain athletes per sport (trained on to keep, and measured)


def balanced_maintain(athletes: pd.DataFrame, edited: str, per_sport: int = MAINTAIN_PER_SPORT,
                      seed: int = 0) -> pd.DataFrame:
    """The same number of athletes of every sport (at most `per_sport`, fewer when a sport has
    fewer), drawn with `seed` from the known athletes other than `edited`."""
    from mechunlearn_utils.data.datasets import balanced_sample

    pool = athletes[athletes.athlete != edited]
    per = min(per_sport, int(pool.groupby("sport").size().min()))
    return balanced_sample(pool, per * pool.sport.nunique(), "sport", seed)


@dataclass
class AthleteEdit:
    """What `edit_one_athlete` shows: the answers in every format before and after, the side
    effects (maintain p(true), held-out LM loss: before, after, change), the maintain set, the lr."""

    answers: pd.DataFrame
    side_effects: pd.DataFrame
    maintain: pd.DataFrame
    lr: float

    def show(self) -> None:
        from IPython.display import display

        print(f"lr {self.lr:g}; maintain set: {len(self.maintain)} athletes "
              f"({', '.join(f'{n} {s}' for s, n in self.maintain.sport.value_counts().sort_index().items())})")
        display(self.answers, self.side_effects)


def athlete_before_after(model, athletes: pd.DataFrame, athlete: str, new_sport: str, put_on,
                         heldout_text: list[str] | None = None, per_sport: int = MAINTAIN_PER_SPORT,
                         lr: float = float("nan")) -> AthleteEdit:
    """One athlete's answers in every format (p of the old and of the new sport) and the side
    effects (maintain p(true) on `balanced_maintain`'s athletes; LM loss on `heldout_text`), before
    and inside ``with put_on(forget, maintain):``, a context manager that puts an edit on the model and
    takes it off again (training one, `edit_one_athlete`; a saved one, `query_saved_edit`)."""
    from mechunlearn_utils.evaluate.suite import lm_loss_on_text, sports_measure

    row = athletes[athletes.athlete == athlete]
    if row.empty:
        raise ValueError(f"{athlete!r} is not among the athletes the model knows (see notebook 00)")
    if new_sport == row.sport.iloc[0]:
        raise ValueError(f"{athlete} already plays {new_sport}: pick another sport")
    forget = row.assign(target=new_sport).reset_index(drop=True)
    maintain = balanced_maintain(athletes, athlete, per_sport)

    def measure(stage):
        rows = []
        for fmt in ("normal", "question", "mcq"):
            r = sports_measure(model, forget, ["sport", "target"], fmt, EDIT_CANDIDATES)
            rows.append({"stage": stage, "format": fmt, "p(sport)": r["sport"]["p"], "p(target)": r["target"]["p"]})
        side = {"maintain p(true)": sports_measure(model, maintain, "sport", "normal", EDIT_CANDIDATES)["p"]}
        if heldout_text:
            side["LM loss (held-out text)"] = lm_loss_on_text(model, heldout_text)
        return rows, side

    rows, side_before = measure("before")
    with put_on(forget, maintain):
        after, side_after = measure("after")
    table = pd.DataFrame(rows + after).rename(columns={"p(sport)": f"p({row.sport.iloc[0]})",
                                                       "p(target)": f"p({new_sport})"})
    side = pd.DataFrame({"before": side_before, "after": side_after})
    side["change"] = side.after - side.before
    return AthleteEdit(table.set_index(["stage", "format"]).round(3), side.round(4), maintain, lr)


def edit_one_athlete(model, param_names: list[str], athletes: pd.DataFrame, athlete: str, new_sport: str,
                     steps: int = 25, lr: float | None = None, general_text: list[str] | None = None,
                     heldout_text: list[str] | None = None, per_sport: int = MAINTAIN_PER_SPORT,
                     on_step=None) -> AthleteEdit:
    """Edit one athlete's sport with a localization, keeping a maintain set balanced over the sports
    (`balanced_maintain`), and show it (`athlete_before_after`). `lr`: None -> `DEMO_LR`.
    ``on_step(record)`` after each training step. The base weights are restored."""
    import contextlib

    from mechunlearn_utils.data.tasks import Task
    from mechunlearn_utils.edit.storage import restore, snapshot
    from mechunlearn_utils.edit.train import EditConfig, train_edit

    lr = DEMO_LR if lr is None else lr

    @contextlib.contextmanager
    def trained(forget, maintain):
        base = snapshot(model, param_names)
        try:
            task = Task("one_athlete", "sports", "edit", forget, maintain, forget, maintain)
            cfg = EditConfig(steps=steps, lr=lr, batch_size=16, lm_coef=1.0 if general_text else 0.0)
            train_edit(model, param_names, task, general_text or [], cfg, progress=False, on_step=on_step)
            yield
        finally:
            restore(model, base)

    return athlete_before_after(model, athletes, athlete, new_sport, trained, heldout_text, per_sport, lr)


def query_saved_edit(model, path, athletes: pd.DataFrame, heldout_text: list[str] | None = None,
                     athlete: str | None = None, per_sport: int = MAINTAIN_PER_SPORT) -> AthleteEdit:
    """A saved edit of notebook 03 (an editing task of the sports facts), queried on one athlete it
    edited (`athlete`; None: the first of its training split) like `edit_one_athlete`, without
    training anything: the edit is put on and taken off (`edit.storage.edited`)."""
    from mechunlearn_utils.edit.storage import edit_record, edited, task_from_edit

    task = task_from_edit({"edit": path}, athletes)
    if task.kind != "sports" or task.mode != "edit":
        raise ValueError(f"{path}: a {task.kind} {task.mode} task; the query needs an edit of the sports facts")
    edited_rows = pd.concat([task.train_forget, task.eval_forget])
    pick = edited_rows.iloc[:1] if athlete is None else edited_rows[edited_rows.athlete == athlete]
    if pick.empty:
        raise ValueError(f"{athlete!r} is not an athlete this edit changed (task {task.name})")
    cfg = edit_record(path).get("config", {})
    return athlete_before_after(model, athletes, pick.athlete.iloc[0], pick.target.iloc[0],
                                lambda forget, maintain: edited(model, path), heldout_text, per_sport,
                                cfg.get("lr", float("nan")))


def edit_fact_widget(model, localizations: dict, athletes: pd.DataFrame, general_text: list[str],
                     heldout_text: list[str] | None = None, lrs: dict | None = None):
    """Dropdowns (localization, athlete, new sport), a steps slider and a button that edits (a
    progress bar follows the training steps) and shows the answers and the side effects.
    `lrs`: {method: learning rate} (the notebook's sweep); a method not in it trains at `DEMO_LR`."""
    import ipywidgets as w

    method = w.Dropdown(options=list(localizations), description="method")
    athlete = w.Dropdown(options=list(athletes.athlete), description="athlete")
    sport = w.Dropdown(options=list(EDIT_CANDIDATES), value="golf", description="new sport")
    steps = w.IntSlider(value=25, min=5, max=100, step=5, description="steps")
    button, out = w.Button(description="edit and query"), w.Output()
    bar = w.IntProgress(value=0, min=0, max=steps.value, description="training")

    def run(_):
        out.clear_output()
        bar.value, bar.max = 0, steps.value
        with out:
            try:
                edit_one_athlete(model, localizations[method.value].params, athletes, athlete.value, sport.value,
                                 steps.value, (lrs or {}).get(method.value), general_text, heldout_text,
                                 on_step=lambda record: setattr(bar, "value", record["step"] + 1)).show()
            except ValueError as err:
                print(err)

    button.on_click(run)
    return w.VBox([w.HBox([method, athlete]), w.HBox([sport, steps, button]), bar, out])
