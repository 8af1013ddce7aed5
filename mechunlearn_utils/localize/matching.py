"""Parameters, localizations and the paper's parameter matching.

Follows finetuning_scripts/localized_finetuning_script_sports.py and cb_utils/mask_utils.py of
magikarp01/mechanistic-unlearning:

* OT localizations (`localization_from_scores`; the paper's `get_top_components_no_subcomponents_gqa`
  with ``param_count``): rank (layer, attention|MLP) units by |layer score| and add WHOLE units in
  rank order while the running count is below the budget (FLU's parameter count): the unit that
  crosses the budget is added whole, so the count overshoots by less than one unit and no unit is
  cut. An attention unit is q, k, v, o; an MLP unit is gate, up, down (`get_component_name_from_ct`
  adds hook_pre, hook_post and hook_gate).
* ``random`` (`random_matrices`; the paper's `get_random_components`, combine_subcomponents=False):
  matrices drawn at random from q, k, v, o, up, down (no gate: the paper's candidate list has
  hook_q/k/v/result and hook_pre/post only) until the count reaches the budget.
* ``random_mlps`` (as many whole MLPs as FLU, at random), ``all_mlps`` (every MLP's gate, up, down).
* ``nonlocalized`` (`nonlocalized`; the paper's `get_top_components(..., top_p=100)` on the AP graph):
  every attention (q, k, v, o) and MLP (gate, up, down) matrix; no norms, no embeddings.

Gate on Gemma: the paper's FLU, OT, all-MLP and random-MLP units include gate_proj (``mlp.hook_gate``,
counted in ``manual_param_count``); only its random matrix draw leaves gate out. We do the same.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mechunlearn_utils.core.models import canonical_name  # noqa: F401 (re-exported by localize)
from mechunlearn_utils.core.serialize import to_plain
from mechunlearn_utils.localize.common import LOCALIZATIONS_DIR, LocalizationError, TracingResult
from mechunlearn_utils.localize.flu import FLUResult

ATTN_MATRICES = ("q", "k", "v", "o")
MLP_MATRICES = ("gate", "up", "down")
RANDOM_MATRICES = ("q", "k", "v", "o", "up", "down")  # the paper's random draw: no gate
# The default localizations (notebooks 03-05 pick from these), then the variants kept selectable.
METHODS = ("flu", "ct", "ap", "ct_mlp", "ap_mlp", "random", "random_mlps", "all_mlps", "nonlocalized",
           "extraction")
VARIANTS = ("flu_pp", "ap_abs", "ct_abs", "ct_few")


_MATRIX = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")


def named_parameters(model) -> dict:
    """{canonical HF name: parameter} (the same names before and after the bridge is built)."""
    out = {}
    for name, p in model.hf.named_parameters():
        out.setdefault(canonical_name(name), p)
    return out


@dataclass(frozen=True)
class Matrix:
    name: str
    layer: int
    block: str  # "attn" or "mlp"
    kind: str  # q k v o gate up down
    numel: int


def weight_matrices(model) -> list[Matrix]:
    """Every attention (q/k/v/o) and MLP (gate/up/down) matrix, biases folded into their matrix."""
    found: dict = {}
    for name, p in named_parameters(model).items():
        m = _MATRIX.search(name)
        if m:
            layer, block, kind, part = int(m[1]), m[2], m[3], m[4]
            key = (layer, kind)
            base = name[: -len(part)] + "weight"
            found.setdefault(key, [base, 0])[1] += p.numel()
    mats = [Matrix(base, l, "attn" if k in ATTN_MATRICES else "mlp", k, n)
            for (l, k), (base, n) in found.items()]
    if not mats:
        raise LocalizationError(f"no q/k/v/o_proj or gate/up/down_proj matrices found in {model.name}")
    order = {k: i for i, k in enumerate(ATTN_MATRICES + MLP_MATRICES)}
    return sorted(mats, key=lambda m: (m.layer, order[m.kind]))


def _matrix_params(model, mats: list[Matrix]) -> list[str]:
    names = named_parameters(model)
    out = []
    for m in mats:
        out.append(m.name)
        bias = m.name[: -len("weight")] + "bias"
        if bias in names:
            out.append(bias)
    return out


# =========================================================================== localizations

@dataclass
class Localization:
    """Which parameters an edit trains, and how that was decided (plain, JSON-serializable)."""

    method: str
    model_name: str
    task: str
    params: list[str]
    n_params: int
    scores: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ---- what it covers
    def layers(self, block: str) -> list[int]:
        """Layers with at least one `block` ('attn' or 'mlp') matrix in the localization."""
        out = set()
        for p in self.params:
            m = _MATRIX.search(p)
            if m and (m[2] == "self_attn") == (block == "attn"):
                out.add(int(m[1]))
        return sorted(out)

    @property
    def mlp_layers(self) -> list[int]:
        return self.layers("mlp")

    @property
    def attn_layers(self) -> list[int]:
        return self.layers("attn")

    def matrices(self) -> list[str]:
        """Short labels such as 'mlp3.gate', 'attn12.q' (other parameters by name)."""
        out = []
        for p in self.params:
            m = _MATRIX.search(p)
            if m and m[4] == "weight":
                out.append(f"{'attn' if m[2] == 'self_attn' else 'mlp'}{m[1]}.{m[3]}")
            elif not m:
                out.append(p)
        return out

    # ---- use with a model
    def check(self, model) -> None:
        """Raise unless this localization was made for `model` and names only its parameters."""
        if self.model_name != model.name:
            raise LocalizationError(f"localization {self.method!r} was made for {self.model_name!r}, "
                                    f"not {model.name!r}: run notebook 02 with MODEL={model.name!r}")
        names = named_parameters(model)
        missing = [p for p in self.params if p not in names]
        if missing:
            raise LocalizationError(f"localization {self.method!r} names {len(missing)} parameter(s) "
                                    f"{model.name} lacks, e.g. {missing[:3]}")
        count = sum(names[p].numel() for p in self.params)
        if count != self.n_params:
            raise LocalizationError(f"localization {self.method!r} records {self.n_params} parameters "
                                    f"but its matrices hold {count} in {model.name}")

    def trainable_parameters(self, model) -> list[torch.nn.Parameter]:
        """Set requires_grad on exactly this localization's parameters; return them."""
        self.check(model)
        names = named_parameters(model)
        chosen = {id(names[p]) for p in self.params}
        for p in model.hf.parameters():
            p.requires_grad_(id(p) in chosen)
        return [names[p] for p in self.params]

    # ---- files
    def to_json(self) -> str:
        return json.dumps(to_plain(asdict(self)), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Localization":
        data = json.loads(text)
        missing = {"method", "model_name", "task", "params", "n_params"} - set(data)
        if missing:
            raise LocalizationError(f"not a localization file: keys {sorted(missing)} are missing")
        return cls(**data)

    def save(self, results_dir) -> Path:
        from mechunlearn_utils.core.paths import atomic_write_text

        path = localization_path(results_dir, self.task, self.method)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, results_dir, task: str, method: str, model=None) -> "Localization":
        """Load RESULTS_DIR/02_localization/localizations/<task>/<method>.json (checked on `model`)."""
        from mechunlearn_utils.core.paths import MissingResultsError

        path = localization_path(results_dir, task, method)
        if not path.exists():
            have = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.exists() else []
            raise MissingResultsError(f"{path} is missing (have {have or 'none'}): run "
                                      "notebooks/02_localization.py first (same RESULTS_DIR)")
        loc = cls.from_json(path.read_text())
        if model is not None:
            loc.check(model)
        return loc


def localization_path(results_dir, task: str, method: str) -> Path:
    return Path(results_dir).joinpath(*LOCALIZATIONS_DIR, task, f"{method}.json")


def load_localizations(results_dir, task: str, model=None) -> dict:
    """Every saved localization of a task: {method: Localization}."""
    folder = Path(results_dir).joinpath(*LOCALIZATIONS_DIR, task)
    if not folder.exists():
        from mechunlearn_utils.core.paths import MissingResultsError

        raise MissingResultsError(f"{folder} is missing: run notebooks/02_localization.py first")
    return {p.stem: Localization.load(results_dir, task, p.stem, model) for p in sorted(folder.glob("*.json"))}


def _make(model, method, task, mats: list[Matrix], scores=None, meta=None) -> Localization:
    if not mats:
        raise LocalizationError(f"localization {method!r} selects no parameter")
    params = _matrix_params(model, mats)
    names = named_parameters(model)
    return Localization(method, model.name, task, params, sum(names[p].numel() for p in params),
                        to_plain(scores or {}), to_plain(meta or {}))


def mlp_layers_localization(model, layers: list[int], method: str = "flu", task: str = "",
                            scores=None, meta=None) -> Localization:
    """Whole MLPs (gate, up, down) of the given layers."""
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise LocalizationError(f"{method}: no MLP layer given")
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad:
        raise LocalizationError(f"{method}: layers {bad} outside 0..{model.n_layers - 1}")
    mats = [m for m in weight_matrices(model) if m.block == "mlp" and m.layer in layers]
    return _make(model, method, task, mats, scores, dict(meta or {}, layers=layers))


def flu_localization(model, flu: FLUResult, task: str = "", method: str = "flu", layers=None,
                     meta=None) -> Localization:
    """Whole MLPs of the FLU layers: `flu.layers` (path-patching selection, ``flu_pp``) or the
    given `layers` (the paper's probe range, ``flu``), with the path-patching scores attached."""
    scores = {} if flu.hand_given else dict(
        mlp_path_patching=flu.mlp_effect, head_path_patching=flu.head_effect)
    base = dict(threshold=flu.threshold, hand_given=flu.hand_given, seconds=flu.seconds,
                passes=flu.passes, extraction_heads=[list(h) for h in flu.extraction_heads],
                extraction_layer=flu.extraction_layer)
    chosen = flu.layers if layers is None else layers
    return mlp_layers_localization(model, chosen, method, task, scores, dict(base, **(meta or {})))


def extraction_localization(model, first_layer: int, n_layers: int, task: str = "",
                            method: str = "extraction", meta=None) -> Localization:
    """Positive control: `n_layers` whole MLPs from `first_layer` (the lowest extraction-head layer)
    on, i.e. the extraction stage, matched to FLU in whole layers. When the window would run past
    the last layer it is shifted down to end there (``meta['shifted']``)."""
    L = model.n_layers
    if not 1 <= n_layers <= L:
        raise LocalizationError(f"{method}: cannot take {n_layers} of {L} MLP layers")
    if not 0 <= first_layer < L:
        raise LocalizationError(f"{method}: first layer {first_layer} outside 0..{L - 1}")
    start = min(first_layer, L - n_layers)
    meta = dict(meta or {}, first_layer=int(first_layer), shifted=start != first_layer)
    return mlp_layers_localization(model, list(range(start, start + n_layers)), method, task, meta=meta)


def _budget_check(method: str, budget: int, available: int) -> None:
    if budget <= 0:
        raise LocalizationError(f"{method}: the parameter budget must be positive, got {budget}")
    if budget > available:
        raise LocalizationError(f"{method}: no combination of matrices reaches {budget:,} parameters "
                                f"(all candidates together hold {available:,})")


def rank_units(layer_scores: dict, mlp_only: bool = False) -> list[tuple[str, int, float]]:
    """[(block, layer, |score|)] best first (ties: lower layer, then 'attn' before 'mlp')."""
    units = [("mlp", l, float(abs(v))) for l, v in enumerate(layer_scores["mlp"])]
    if not mlp_only:
        units += [("attn", l, float(abs(v))) for l, v in enumerate(layer_scores["attn"])]
    return sorted(units, key=lambda u: (-u[2], u[1], u[0]))


def take_whole_units(ranked: list, sizes: dict, budget: int) -> list:
    """The paper's matching: units in rank order while the running count is below `budget`; the
    unit that reaches or crosses it is taken whole. `sizes[unit]` is a unit's parameter count."""
    chosen, total = [], 0
    for unit in ranked:
        if total >= budget:
            break
        chosen.append(unit)
        total += sizes[unit]
    return chosen


def localization_from_scores(model, method: str, layer_scores: dict, budget: int, task: str = "",
                             mlp_only: bool = False, scores=None, meta=None,
                             whole_units: bool = True) -> Localization:
    """The paper's OT localization: rank (layer, attn|mlp) units by |score| and add WHOLE units
    (q, k, v, o / gate, up, down) until the parameter count reaches `budget` (see the module doc).
    ``whole_units=False``: the workbook's earlier rule, matrix by matrix, so the last unit can be cut."""
    ranked = rank_units(layer_scores, mlp_only)
    mats = weight_matrices(model)
    _budget_check(method, budget, sum(m.numel for m in mats if not mlp_only or m.block == "mlp"))
    of_unit = {(b, l): [m for m in mats if m.layer == l and m.block == b] for b, l, _ in ranked}
    if whole_units:
        sizes = {(b, l): sum(m.numel for m in of_unit[(b, l)]) for b, l, _ in ranked}
        units = take_whole_units([(b, l) for b, l, _ in ranked], sizes, budget)
        chosen = [m for u in units for m in of_unit[u]]
    else:
        chosen = take_whole_units([m for b, l, _ in ranked for m in of_unit[(b, l)]],
                                  {m: m.numel for m in mats}, budget)
    ranking = [f"{b}{l}" for b, l, _ in ranked]
    meta = dict(meta or {}, budget=budget, mlp_only=mlp_only, unit_ranking=ranking, whole_units=whole_units)
    layer_scores = {k: np.asarray(v).tolist() for k, v in layer_scores.items()}
    return _make(model, method, task, chosen, dict(scores or {}, layer_scores=layer_scores), meta)


def random_matrices(model, budget: int, seed: int = 0, task: str = "", method: str = "random",
                    kinds=RANDOM_MATRICES) -> Localization:
    """Random matrices of the given `kinds` (the paper's: q, k, v, o, up, down; no gate) drawn
    without replacement until the parameter count reaches `budget` (the last draw is kept whole)."""
    bad = set(kinds) - set(ATTN_MATRICES + MLP_MATRICES)
    if bad:
        raise LocalizationError(f"{method}: unknown matrix kinds {sorted(bad)}")
    mats = [m for m in weight_matrices(model) if m.kind in kinds]
    _budget_check(method, budget, sum(m.numel for m in mats))
    rng = np.random.default_rng(seed)
    chosen = take_whole_units([mats[i] for i in rng.permutation(len(mats))], {m: m.numel for m in mats}, budget)
    return _make(model, method, task, chosen, meta=dict(budget=budget, seed=seed, kinds=list(kinds)))


def random_mlp_layers(model, n_layers: int, seed: int = 0, task: str = "") -> Localization:
    """`n_layers` whole MLPs chosen at random."""
    if not 1 <= n_layers <= model.n_layers:
        raise LocalizationError(f"random_mlps: cannot pick {n_layers} of {model.n_layers} MLP layers")
    rng = np.random.default_rng(seed)
    layers = sorted(int(l) for l in rng.choice(model.n_layers, size=n_layers, replace=False))
    return mlp_layers_localization(model, layers, "random_mlps", task, meta=dict(seed=seed))


def all_mlps(model, task: str = "") -> Localization:
    return mlp_layers_localization(model, list(range(model.n_layers)), "all_mlps", task)


def nonlocalized(model, task: str = "", include_norms: bool = False) -> Localization:
    """Every attention (q, k, v, o) and MLP (gate, up, down) matrix: the paper's nonlocalized
    baseline (no norms, no embeddings). ``include_norms=True``: the workbook's earlier choice,
    every parameter except the token embeddings (Gemma ties them to the unembedding)."""
    names = named_parameters(model)
    emb = model.hf.get_input_embeddings().weight
    out_emb = model.hf.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb
    if not include_norms:
        loc = _make(model, "nonlocalized", task, weight_matrices(model))
        loc.meta = dict(tied_embeddings=bool(tied), excluded="embeddings, unembedding and norms")
        return loc
    skip = {id(emb)} | ({id(out_emb.weight)} if out_emb is not None else set())
    params = [n for n, p in names.items() if id(p) not in skip]
    return Localization("nonlocalized", model.name, task, params, sum(names[n].numel() for n in params),
                        {}, dict(tied_embeddings=bool(tied), excluded="input embeddings"
                                 + ("" if tied else " and lm_head")))


def decoder_fraction(model, loc: Localization) -> float:
    """A localization's parameters as a fraction of all attention + MLP matrices (the decoder
    weights; the paper's FLU: 9-18% of them)."""
    return loc.n_params / sum(m.numel for m in weight_matrices(model))


def all_localizations(model, task: str, flu: Localization, ct: TracingResult | None = None,
                      ap: TracingResult | None = None, seed: int = 0, extraction_layer: int | None = None,
                      variants: dict | None = None) -> dict:
    """Every method's localization for a task, parameter-matched to FLU's count (see METHODS).

    ``extraction_layer``: the lowest extraction-head layer, for the ``extraction`` control.
    ``variants``: extra localizations (e.g. {"flu_pp": ...}); ``ap_abs`` / ``ct_abs`` (the earlier
    sum-of-|score| aggregation, same budget) are added from `ap` / `ct`."""
    budget = flu.n_params
    locs = {"flu": flu}
    for name, res in (("ct", ct), ("ap", ap)):
        if res is None:
            continue
        ls = res.layer_scores("paper")
        meta = dict(seconds=res.seconds, passes=res.passes, info=res.info, aggregation="paper")
        locs[name] = localization_from_scores(model, name, ls, budget, task, scores=res.scores, meta=meta)
        locs[f"{name}_mlp"] = localization_from_scores(model, f"{name}_mlp", ls, budget, task,
                                                       mlp_only=True, meta=meta)
        locs[f"{name}_abs"] = localization_from_scores(model, f"{name}_abs", res.layer_scores("abs"), budget,
                                                       task, meta=dict(meta, aggregation="abs"))
    locs["random"] = random_matrices(model, budget, seed, task)
    locs["random_mlps"] = random_mlp_layers(model, len(flu.mlp_layers), seed, task)
    locs["all_mlps"] = all_mlps(model, task)
    locs["nonlocalized"] = nonlocalized(model, task)
    if extraction_layer is not None:
        locs["extraction"] = extraction_localization(model, extraction_layer, len(flu.mlp_layers), task)
    locs.update(variants or {})
    return {m: locs[m] for m in METHODS + VARIANTS if m in locs}
