"""ipywidgets front-ends. Each wraps a pure, tested function; notebooks also call that function
directly so the default renders statically under papermill."""

from __future__ import annotations

import pandas as pd

from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES


def edit_one_athlete(model, param_names: list[str], athletes: pd.DataFrame, athlete: str, new_sport: str,
                     steps: int = 25, lr: float = 3e-4, general_text: list[str] | None = None) -> pd.DataFrame:
    """Edit one athlete's sport with a localization; the probability of the old and the new sport
    in every format, before and after. The base weights are restored afterwards."""
    from mechunlearn_utils.edit.storage import restore, snapshot
    from mechunlearn_utils.edit.train import EditConfig, train_edit
    from mechunlearn_utils.evaluate.suite import sports_measure
    from mechunlearn_utils.data.tasks import Task

    row = athletes[athletes.athlete == athlete]
    if row.empty:
        raise ValueError(f"{athlete!r} is not among the athletes the model knows (see notebook 00)")
    if new_sport == row.sport.iloc[0]:
        raise ValueError(f"{athlete} already plays {new_sport}: pick another sport")
    forget = row.assign(target=new_sport).reset_index(drop=True)
    maintain = athletes[athletes.athlete != athlete].head(16).reset_index(drop=True)
    task = Task("one_athlete", "sports", "edit", forget, maintain, forget, maintain)

    def measure(stage):
        rows = []
        for fmt in ("normal", "question", "mcq"):
            r = sports_measure(model, forget, ["sport", "target"], fmt, EDIT_CANDIDATES)
            rows.append({"stage": stage, "format": fmt, "p(sport)": r["sport"]["p"], "p(target)": r["target"]["p"]})
        return rows

    rows = measure("before")
    base = snapshot(model, param_names)
    try:
        train_edit(model, param_names, task, general_text or [], EditConfig(steps=steps, lr=lr, batch_size=16,
                                                                           lm_coef=1.0 if general_text else 0.0),
                   progress=False)
        rows += measure("after")
    finally:
        restore(model, base)
    table = pd.DataFrame(rows).rename(columns={"p(sport)": f"p({row.sport.iloc[0]})", "p(target)": f"p({new_sport})"})
    return table.set_index(["stage", "format"]).round(3)


def edit_fact_widget(model, localizations: dict, athletes: pd.DataFrame, general_text: list[str]):
    """Dropdowns (localization, athlete, new sport) and a button that edits and shows the answers."""
    import ipywidgets as w
    from IPython.display import display

    method = w.Dropdown(options=list(localizations), description="method")
    athlete = w.Dropdown(options=list(athletes.athlete), description="athlete")
    sport = w.Dropdown(options=list(EDIT_CANDIDATES), value="golf", description="new sport")
    steps = w.IntSlider(value=25, min=5, max=100, step=5, description="steps")
    button, out = w.Button(description="edit and query"), w.Output()

    def run(_):
        out.clear_output()
        with out:
            try:
                display(edit_one_athlete(model, localizations[method.value].params, athletes, athlete.value,
                                         sport.value, steps.value, general_text=general_text))
            except ValueError as err:
                print(err)

    button.on_click(run)
    return w.VBox([w.HBox([method, athlete]), w.HBox([sport, steps, button]), out])
