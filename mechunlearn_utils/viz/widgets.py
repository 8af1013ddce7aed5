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


def edit_one_athlete(model, param_names: list[str], athletes: pd.DataFrame, athlete: str, new_sport: str,
                     steps: int = 25, lr: float | None = None, general_text: list[str] | None = None,
                     heldout_text: list[str] | None = None, per_sport: int = MAINTAIN_PER_SPORT,
                     on_step=None) -> AthleteEdit:
    """Edit one athlete's sport with a localization, keeping a maintain set balanced over the sports
    (`balanced_maintain`); the probability of the old and the new sport in every format, and the
    side effects (maintain p(true); LM loss on `heldout_text`), before and after. `lr`: None ->
    `DEMO_LR`. ``on_step(record)`` after each training step. The base weights are restored."""
    from mechunlearn_utils.data.tasks import Task
    from mechunlearn_utils.edit.storage import restore, snapshot
    from mechunlearn_utils.edit.train import EditConfig, train_edit
    from mechunlearn_utils.evaluate.suite import lm_loss_on_text, sports_measure

    row = athletes[athletes.athlete == athlete]
    if row.empty:
        raise ValueError(f"{athlete!r} is not among the athletes the model knows (see notebook 00)")
    if new_sport == row.sport.iloc[0]:
        raise ValueError(f"{athlete} already plays {new_sport}: pick another sport")
    lr = DEMO_LR if lr is None else lr
    forget = row.assign(target=new_sport).reset_index(drop=True)
    maintain = balanced_maintain(athletes, athlete, per_sport)
    task = Task("one_athlete", "sports", "edit", forget, maintain, forget, maintain)

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
    base = snapshot(model, param_names)
    try:
        train_edit(model, param_names, task, general_text or [], EditConfig(steps=steps, lr=lr, batch_size=16,
                                                                           lm_coef=1.0 if general_text else 0.0),
                   progress=False, on_step=on_step)
        after, side_after = measure("after")
    finally:
        restore(model, base)
    table = pd.DataFrame(rows + after).rename(columns={"p(sport)": f"p({row.sport.iloc[0]})",
                                                       "p(target)": f"p({new_sport})"})
    side = pd.DataFrame({"before": side_before, "after": side_after})
    side["change"] = side.after - side.before
    return AthleteEdit(table.set_index(["stage", "format"]).round(3), side.round(4), maintain, lr)


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
