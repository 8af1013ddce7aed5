"""Activation patching: one function, `activation_patching`, with an explicit direction.

* ``direction="denoise"``: patch CLEAN activations into the CORRUPT run; score
  ``(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)``: 0 = corrupt behaviour, 1 = clean
  behaviour restored (notebook 01's circuit analysis).
* ``direction="noise"``: patch CORRUPT activations into the CLEAN run; score
  ``(LD_patched - LD_clean) / (LD_clean - LD_corrupt)``: 0 = no change, -1 = the component carries
  the whole effect of the corruption (what attribution patching approximates; localize's check).

LD = logit(right answer) - mean logit(other candidates) (`core.logits.logit_diff`). The same
entry takes either prompt pairs (one (layer, position) patch at a time at `core.sites` residual
components, pairs batched, the prefix before the earliest patch served from the target run's KV
cache) or a localization `FactSet` with `Component`s (a component's whole activation, any site
kind and backend of `core.sites.run_sites`, scores of batch means).

* `activation_patching` / `activation_patching_many`   the patching (`..._many`: many pairs)
* `head_patching(_many)`   single heads' outputs (``z``) at one position
* `corruption_pairs`       clean / corrupt athlete prompts of equal token length
* `patch_sites` / `restore_by_layer`   per-layer restoration at named positions
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.logits import logit_diff, token_logits
from mechunlearn_utils.core.sites import HEAD_KINDS, PATCH_COMPONENTS, SITE_POSITIONS, PassCounter, Site, replace_rows, run_sites
from mechunlearn_utils.interp.common import _capture, _check_id, token_labels

DIRECTIONS = ("denoise", "noise")
PAIR_COMPONENTS = ("resid_pre", "mlp_out", "attn_out")  # default components of a pair's patching


def _tl(kind: str, layer: int) -> str:
    return Site(kind, layer).tl_name()


def _check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown patching direction {direction!r}; choose 'denoise' (clean into corrupt) "
                         "or 'noise' (corrupt into clean)")
    return direction


def patching_score(ld, clean_ld, corrupt_ld, direction: str = "denoise"):
    """Normalized effect of a patch on the logit difference (see the module docstring)."""
    if _check_direction(direction) == "denoise":
        return (ld - corrupt_ld) / (clean_ld - corrupt_ld)
    return (ld - clean_ld) / (clean_ld - corrupt_ld)


@dataclass
class PatchingResult:
    """Normalized patching score per component (`patching_score`): with ``direction="denoise"``
    0 = corrupt run, 1 = clean run; with ``"noise"`` 0 = clean run, -1 = corrupt run.

    ``scores[component]`` is [n_layers, n_positions]; NaN where a position was not patched.
    Positions before ``first_diff`` (tokens shared by both prompts, e.g. the one-shot prefix) are
    exactly 0 without a run: a causal model computes identical activations there.
    """

    scores: dict
    tokens: list
    clean_logit_diff: float
    corrupt_logit_diff: float
    first_diff: int
    direction: str = "denoise"

    def __getitem__(self, component: str) -> np.ndarray:
        return self.scores[component]


@dataclass
class _Pair:
    clean_ids: list
    corrupt_ids: list
    answer_id: int
    other_ids: list
    first_diff: int


def _prepare_pair(model, clean_prompt: str, corrupt_prompt: str, answer_id, other_ids) -> _Pair:
    clean_ids, corrupt_ids = model.encode(clean_prompt), model.encode(corrupt_prompt)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(
            f"clean and corrupt prompts must have the same number of tokens to patch position by "
            f"position: {len(clean_ids)} vs {len(corrupt_ids)}\n clean:   {token_labels(model, clean_ids)}"
            f"\n corrupt: {token_labels(model, corrupt_ids)}")
    diff = [i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b]
    if not diff:
        raise ValueError(f"clean and corrupt prompts tokenize identically: nothing to patch ({clean_prompt!r})")
    answer_id = _check_id(model, answer_id, "answer_id")
    other_ids = [_check_id(model, i, "other_ids") for i in other_ids]
    if not other_ids or answer_id in other_ids:
        raise ValueError("other_ids must be non-empty and must not contain answer_id")
    return _Pair(clean_ids, corrupt_ids, answer_id, other_ids, diff[0])


def _pairs_from(model, pairs) -> list[_Pair]:
    """`pairs`: a `corruption_pairs` DataFrame or an iterable of (clean, corrupt, answer_id, other_ids)."""
    if isinstance(pairs, pd.DataFrame):
        rows = zip(pairs.clean_prompt, pairs.corrupt_prompt, pairs.answer_id, pairs.other_ids)
    else:
        rows = pairs
    out = [_prepare_pair(model, *row) for row in rows]
    if not out:
        raise ValueError("no clean/corrupt pairs given")
    return out


def _patch_hook(rows, positions, heads, values):
    """A hook writing values[i] into t[rows[i], positions[i]] (and head heads[i] if given)."""
    rows_t, pos_t = torch.tensor(rows), torch.tensor(positions)
    heads_t = None if heads is None else torch.tensor(heads)

    def hook(t, hook):
        if heads_t is None:
            t[rows_t, pos_t] = values.to(t.dtype)
        else:
            t[rows_t, pos_t, heads_t] = values.to(t.dtype)
        return t

    return hook


def _row_logit_diff(model, hidden: torch.Tensor, pairs: list[_Pair]) -> torch.Tensor:
    """Logit difference of each row of `hidden` for its own pair's answer and other ids."""
    if len({len(p.other_ids) for p in pairs}) == 1:
        ids = torch.tensor([[p.answer_id, *p.other_ids] for p in pairs], device=hidden.device)
        return logit_diff(token_logits(model, hidden, ids))
    return torch.cat([logit_diff(token_logits(model, hidden[r:r + 1], torch.tensor([p.answer_id, *p.other_ids],
                                                                                 device=hidden.device)))
                      for r, p in enumerate(pairs)])


def _prefix_cache(model, cache, target: torch.Tensor, start: int, rows: torch.Tensor):
    """The target runs' KV cache for positions < `start`, for the batch rows `rows` (None if 0)."""
    if start == 0:
        return None
    kv = copy.deepcopy(cache)
    try:
        kv.crop(start - target.shape[1])  # negative: drop the positions from `start` on
    except (ValueError, RuntimeError):  # a cache layer that cannot crop: recompute the prefix
        return model.hf.model(input_ids=target[rows, :start], use_cache=True).past_key_values
    kv.batch_select_indices(rows)
    return kv


def _patch_engine(model, pairs: list[_Pair], names: list[str], make_runs, batch_size: int = 128,
                  max_pairs: int = 16, progress: bool = False, desc: str = "patching",
                  direction: str = "denoise"):
    """Run patched copies of the target prompts (corrupt for "denoise", clean for "noise"), many
    pairs at once, with activations of the source prompts (the other one of each pair).

    For each pair, `make_runs(pair_index, source_acts)` (source_acts: {hook name: activation
    [pos, ...]} of the source run, for `names`) returns a list of (key, run); a run is a list of
    patches (hook name, position, head | None, value). Pairs of equal token length are batched
    together: one forward for their source prompts, one for their target prompts (with a KV cache).
    A run whose earliest patch is at position p computes exactly the target activations before
    p, so those come from the target run's cache and only positions p..end are recomputed.

    Returns (list over pairs of {key: `patching_score`}, clean logit diffs, corrupt logit diffs).
    """
    denoise = _check_direction(direction) == "denoise"
    dev = model.hf.device
    scores: list[dict] = [dict() for _ in pairs]
    clean_ld, corrupt_ld = np.zeros(len(pairs)), np.zeros(len(pairs))
    by_len: dict[int, list[int]] = {}
    for j, p in enumerate(pairs):
        by_len.setdefault(len(p.clean_ids), []).append(j)
    chunks = [(T, js[k:k + max_pairs]) for T, js in sorted(by_len.items()) for k in range(0, len(js), max_pairs)]
    bar = tqdm(total=len(pairs), desc=desc, disable=not progress)
    for T, js in chunks:
        group = [pairs[j] for j in js]
        clean = torch.tensor([p.clean_ids for p in group], device=dev)
        corrupt = torch.tensor([p.corrupt_ids for p in group], device=dev)
        source, target = (clean, corrupt) if denoise else (corrupt, clean)
        batch = dict(input_ids=source, attention_mask=torch.ones_like(source),
                     last_index=torch.full((len(js),), T - 1, device=dev))
        acts, hidden = _capture(model, batch, names, at_last=False)
        ld_source = _row_logit_diff(model, hidden, group)
        out = model.hf.model(input_ids=target, use_cache=True)
        cache = out.past_key_values
        ld_target = _row_logit_diff(model, out.last_hidden_state[:, -1], group)
        cl, co = (ld_source, ld_target) if denoise else (ld_target, ld_source)
        if (cl - co).abs().min() < 1e-4:
            bad = int((cl - co).abs().argmin())
            raise ValueError(
                f"the corruption does not change the logit difference (clean {float(cl[bad]):.4f}, corrupt "
                f"{float(co[bad]):.4f}) for {token_labels(model, group[bad].corrupt_ids)}: pick a corrupt "
                "subject with another answer")
        runs = []  # (group index, key, start, run)
        for g, j in enumerate(js):
            clean_ld[j], corrupt_ld[j] = float(cl[g]), float(co[g])
            for key, run in make_runs(j, {n: a[g] for n, a in acts.items()}):
                if not run:
                    raise ValueError("a run without patches")
                start = min(pos for _, pos, _, _ in run)
                if start < group[g].first_diff:
                    raise ValueError(f"position {start} precedes the first differing token "
                                     f"({group[g].first_diff}): the patch would change nothing")
                runs.append((g, key, start, run))
        runs.sort(key=lambda r: r[2])
        for start in sorted({r[2] for r in runs}):
            todo = [r for r in runs if r[2] == start]
            for k in range(0, len(todo), batch_size):
                part = todo[k:k + batch_size]
                rows = torch.tensor([g for g, _, _, _ in part], device=dev)
                kv = _prefix_cache(model, cache, target, start, rows)
                hooks: dict[tuple, list] = {}
                for r, (_, _, _, run) in enumerate(part):
                    for name, pos, head, value in run:
                        hooks.setdefault((name, head is None), []).append((r, pos - start, head, value))
                fwd = [(name, _patch_hook(rr, pp, None if no_head else hh, torch.stack(vv)))
                       for (name, no_head), items in hooks.items() for rr, pp, hh, vv in [zip(*items)]]
                kwargs = dict(past_key_values=kv, use_cache=True) if kv is not None else {}
                with model.tl.hooks(fwd_hooks=fwd):
                    h = model.hf.model(input_ids=target[rows, start:], **kwargs).last_hidden_state[:, -1]
                ld = _row_logit_diff(model, h, [group[g] for g, _, _, _ in part]).float().cpu().numpy()
                for (g, key, _, _), value in zip(part, ld):
                    j = js[g]
                    scores[j][key] = patching_score(value, clean_ld[j], corrupt_ld[j], direction)
        bar.update(len(js))
    bar.close()
    return scores, clean_ld, corrupt_ld


def _positions(positions, components, T: int) -> dict:
    pos_of = positions if isinstance(positions, dict) else {c: positions for c in components}
    wanted = {}
    for comp in components:
        ps = range(T) if pos_of.get(comp) is None else pos_of[comp]
        ps = sorted({p + T if p < 0 else p for p in ps})
        if any(not 0 <= p < T for p in ps):
            raise ValueError(f"positions for {comp} out of range for a {T}-token prompt: {list(pos_of[comp])}")
        wanted[comp] = ps
    return wanted


@torch.no_grad()
def activation_patching_many(model, pairs, components=PAIR_COMPONENTS, positions=None,
                             batch_size: int = 128, progress: bool = True, *,
                             direction: str = "denoise") -> list[PatchingResult]:
    """`activation_patching` for many clean/corrupt pairs at once (pairs of equal token length
    share forward passes). `pairs`: a `corruption_pairs` DataFrame or (clean, corrupt, answer_id,
    other_ids) tuples; `positions` as in `activation_patching`, or a list of those (one per pair)."""
    pairs = _pairs_from(model, pairs)
    unknown = [c for c in components if c not in PATCH_COMPONENTS]
    if unknown or not components:
        raise ValueError(f"unknown component(s) {unknown}; choose from {list(PATCH_COMPONENTS)}")
    per_pair = positions if isinstance(positions, list) and positions and isinstance(positions[0], dict) \
        else [positions] * len(pairs)
    if len(per_pair) != len(pairs):
        raise ValueError(f"got {len(per_pair)} position specs for {len(pairs)} pairs")
    wanted = [_positions(pp, components, len(p.clean_ids)) for pp, p in zip(per_pair, pairs)]
    L = model.n_layers
    names = [_tl(c, l) for c in components for l in range(L)]

    def make_runs(j, acts):
        return [((comp, l, p), [(_tl(comp, l), p, None, acts[_tl(comp, l)][p])])
                for comp in components for l in range(L) for p in wanted[j][comp] if p >= pairs[j].first_diff]

    scores, clean_ld, corrupt_ld = _patch_engine(model, pairs, names, make_runs, batch_size,
                                                 progress=progress, desc="patching", direction=direction)
    results = []
    for j, p in enumerate(pairs):
        T = len(p.clean_ids)
        arrays = {}
        for comp in components:
            arr = np.full((L, T), np.nan)
            for pos in wanted[j][comp]:
                if pos < p.first_diff:
                    arr[:, pos] = 0.0  # shared prefix: the clean and corrupt activations are equal here
            arrays[comp] = arr
        for (comp, l, pos), value in scores[j].items():
            arrays[comp][l, pos] = value
        results.append(PatchingResult(arrays, token_labels(model, p.clean_ids), float(clean_ld[j]),
                                      float(corrupt_ld[j]), p.first_diff, direction))
    return results


def activation_patching(model, clean, corrupt_prompt: str | None = None, answer_id: int | None = None,
                        other_ids=None, components=None, positions=None, batch_size: int | None = None,
                        progress: bool = True, *, direction: str = "denoise", backend: str = "tl",
                        seed: int = 0, corrupt_ids: torch.Tensor | None = None,
                        counter: PassCounter | None = None):
    """Activation patching in the given `direction` (see the module docstring for the scores).

    **Prompt pair** (`clean` a prompt string): patch one (layer, position) at a time; both prompts
    must have the same number of tokens (e.g. the subject swapped for another athlete of another
    sport with as many tokens); answer = the *clean* answer. `components`: residual-stream site
    kinds in `core.sites.PATCH_COMPONENTS` (TransformerLens ``blocks.{l}.hook_<name>``; default
    `PAIR_COMPONENTS`); `positions`: None (all), a list of positions (negative counts from the
    end), or {component: positions}. Returns a `PatchingResult`; patches run as batches of
    `batch_size` (default 128) copies of the target prompt.

    **Fact set** (`clean` a localization `FactSet`; pass `components` by keyword, a list of
    `Component`): each component's whole activation (all positions; one head for head sites) from
    the source run into the target run, one component per row; the corrupt prompts are the facts
    with random subject tokens (`localize.corrupt_subject_tokens`, `seed`) unless `corrupt_ids`
    is given. Returns, per component, `patching_score` of the batch means (LD averaged over the
    facts), an array [component]; `batch_size` default 64; any `backend` of `run_sites`.
    """
    _check_direction(direction)
    if not isinstance(clean, str):
        if corrupt_prompt is not None or answer_id is not None or other_ids is not None or positions is not None:
            raise TypeError("patching a FactSet takes components=[Component, ...] by keyword, "
                            "not prompts, answers or positions")
        return _patch_facts(model, clean, components, 64 if batch_size is None else batch_size, backend, seed,
                            corrupt_ids, counter, direction)
    return activation_patching_many(model, [(clean, corrupt_prompt, answer_id, other_ids)],
                                    PAIR_COMPONENTS if components is None else components, positions,
                                    128 if batch_size is None else batch_size, progress,
                                    direction=direction)[0]


@dataclass(frozen=True)
class Component:
    """A patchable unit of a fact set: a site kind at a layer and (for head sites) one head."""

    kind: str
    layer: int
    head: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}" + ("" if self.head is None else f".{self.head}")


@torch.no_grad()
def _patch_facts(model, facts, components: list[Component], batch_size: int, backend: str, seed: int,
                 corrupt_ids: torch.Tensor | None, counter: PassCounter | None, direction: str) -> np.ndarray:
    """`activation_patching` on a FactSet: whole-site patches through `run_sites`."""
    from mechunlearn_utils.localize.common import LocalizationError, _batched, _ld_metric, corrupt_subject_tokens

    if not components:
        raise LocalizationError("no components to patch")
    counter = counter if counter is not None else PassCounter()
    corrupt_ids = corrupt_subject_tokens(model, facts, seed) if corrupt_ids is None else corrupt_ids
    sites = sorted({Site(c.kind, c.layer) for c in components}, key=Site.order)
    clean = _batched(model, facts, sites, backend, batch_size, counter)
    corr = _batched(model, facts, sites, backend, batch_size, counter, corrupt_ids)
    source, target_ids = (clean, corrupt_ids) if direction == "denoise" else (corr, None)
    all_idx = torch.arange(len(facts))
    ld_clean = _ld_metric(facts, all_idx)(clean["logits"])
    ld_corrupt = _ld_metric(facts, all_idx)(corr["logits"])
    rows = [(f, c) for c in range(len(components)) for f in range(len(facts))]
    ld_rows = torch.zeros(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        f_idx = torch.tensor([r[0] for r in chunk])
        edits = {}
        for site in sites:
            sel = [i for i, r in enumerate(chunk) if Site(components[r[1]].kind, components[r[1]].layer) == site]
            if not sel:
                continue
            heads = [components[chunk[i][1]].head for i in sel] if site.kind in HEAD_KINDS else None
            edits[site] = replace_rows(source[site], f_idx, sel, heads)
        out = run_sites(model, facts.batch(f_idx, target_ids), edits, backend=backend, counter=counter)
        ld_rows[start:start + len(chunk)] = _ld_metric(facts, f_idx)(out.logits.cpu())
    ld = ld_rows.view(len(components), len(facts))
    return patching_score(ld.mean(1), ld_clean.mean(), ld_corrupt.mean(), direction).numpy()


@torch.no_grad()
def head_patching_many(model, pairs, position: int = -1, batch_size: int = 128,
                       progress: bool = True, *, direction: str = "denoise") -> np.ndarray:
    """Score [n_pairs, n_layers, n_heads] (`patching_score`) from patching one head's output
    (``attn.hook_z``) at one position (default: the final token) in the given direction."""
    pairs = _pairs_from(model, pairs)
    L, H = model.n_layers, model.n_heads
    names = [_tl("z", l) for l in range(L)]
    pos_of = []
    for p in pairs:
        T = len(p.clean_ids)
        pos = position + T if position < 0 else position
        if not 0 <= pos < T:
            raise ValueError(f"position {position} out of range for a {T}-token prompt")
        pos_of.append(pos)

    def make_runs(j, acts):
        if pos_of[j] < pairs[j].first_diff:
            return []
        return [((l, h), [(names[l], pos_of[j], h, acts[names[l]][pos_of[j], h])]) for l in range(L) for h in range(H)]

    scores, _, _ = _patch_engine(model, pairs, names, make_runs, batch_size, progress=progress,
                                 desc="head patching", direction=direction)
    out = np.zeros((len(pairs), L, H))  # positions in the shared prefix: exactly 0
    for j, sc in enumerate(scores):
        for (l, h), value in sc.items():
            out[j, l, h] = value
    return out


def head_patching(model, clean_prompt: str, corrupt_prompt: str, answer_id: int, other_ids,
                  position: int = -1, batch_size: int = 128, progress: bool = False, *,
                  direction: str = "denoise") -> np.ndarray:
    """Score [n_layers, n_heads] from patching one head's output (``attn.hook_z``) at one
    position (default: the final token), as `head_patching_many` for one pair."""
    return head_patching_many(model, [(clean_prompt, corrupt_prompt, answer_id, other_ids)], position,
                              batch_size, progress, direction=direction)[0]


# --------------------------------------------------------------------------- clean / corrupt pairs


def corruption_pairs(model, athletes: pd.DataFrame, pool: pd.DataFrame | None = None,
                     prompt_fn=None, seed: int = 0) -> pd.DataFrame:
    """Pair each athlete with a corrupt athlete of another sport whose prompt has as many tokens.

    `athletes`/`pool`: DataFrames with columns athlete, sport (pool defaults to `athletes`; the
    partner is drawn from it with a seeded RNG). `prompt_fn(athlete) -> prompt` defaults to the
    paper's one-shot prompt. Athletes with no partner of equal length are dropped (count in
    ``attrs['n_unpaired']``). Columns: athlete, sport, corrupt_athlete, corrupt_sport,
    clean_prompt, corrupt_prompt, n_tokens, subject_positions, answer_id, other_ids.
    """
    from mechunlearn_utils.data.prompts import SPORTS, sport_prompt

    if len(athletes) == 0:
        raise ValueError("no athletes given: the athlete set is empty")
    prompt_fn = prompt_fn or sport_prompt
    pool = athletes if pool is None else pool
    pool = pool.drop_duplicates("athlete")
    length = {a: len(model.encode(prompt_fn(a))) for a in pd.concat([athletes.athlete, pool.athlete]).unique()}
    sport_ids = {s: model.answer_token_id(" " + s) for s in SPORTS}
    rng = np.random.default_rng(seed)
    rows, unpaired = [], []
    for a, s in zip(athletes.athlete, athletes.sport):
        options = [(b, t) for b, t in zip(pool.athlete, pool.sport) if t != s and length[b] == length[a]]
        if not options:
            unpaired.append(a)
            continue
        b, t = options[int(rng.integers(len(options)))]
        clean = prompt_fn(a)
        rows.append(dict(athlete=a, sport=s, corrupt_athlete=b, corrupt_sport=t, clean_prompt=clean,
                         corrupt_prompt=prompt_fn(b), n_tokens=length[a],
                         subject_positions=model.subject_positions(clean, a), answer_id=sport_ids[s],
                         other_ids=[i for x, i in sport_ids.items() if x != s]))
    out = pd.DataFrame(rows)
    out.attrs["n_unpaired"] = len(unpaired)
    out.attrs["unpaired"] = unpaired
    return out


DEFAULT_SITES = (("mlp_out", "subject_last"), ("resid_pre", "subject_last"),
                 ("attn_out", "final"), ("resid_pre", "final"))


def patch_sites(model, pairs: pd.DataFrame, sites=DEFAULT_SITES, batch_size: int = 128,
                progress: bool = True, precomputed: dict | None = None) -> pd.DataFrame:
    """Per-layer restoration at named sites (``subject_last``, ``subject_first``, ``final``) for
    every clean/corrupt pair from `corruption_pairs`.

    E.g. ``("mlp_out", "subject_last")``: patch the MLP output of layer l at the last subject token.
    `precomputed`: {athlete: PatchingResult} of full sweeps to reuse instead of patching again.
    Returns one row per (athlete, component, site, layer) with ``restore``.
    """
    precomputed = precomputed or {}
    if len(pairs) == 0:
        raise ValueError("no clean/corrupt pairs given")
    bad = [s for _, s in sites if s not in SITE_POSITIONS]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; choose from {list(SITE_POSITIONS)}")
    comps = tuple(dict.fromkeys(c for c, _ in sites))
    site_pos = [{site: SITE_POSITIONS[site](p.subject_positions, p.n_tokens) for _, site in sites}
                for p in pairs.itertuples(index=False)]
    wanted = [{c: sorted({sp[s] for cc, s in sites if cc == c}) for c in comps} for sp in site_pos]

    def covered(res, want):
        return res is not None and all(c in res.scores and not np.isnan(res[c][:, ps]).any()
                                       for c, ps in want.items())

    results = [precomputed.get(a) for a in pairs.athlete]
    todo = [j for j, (res, want) in enumerate(zip(results, wanted)) if not covered(res, want)]
    if todo:
        new = activation_patching_many(model, pairs.iloc[todo], comps, [wanted[j] for j in todo],
                                       batch_size, progress)
        for j, res in zip(todo, new):
            results[j] = res
    rows = []
    for pair, res, sp in zip(pairs.itertuples(index=False), results, site_pos):
        for comp, site in sites:
            rows += [dict(athlete=pair.athlete, component=comp, site=site, layer=l,
                          restore=float(res[comp][l, sp[site]]), clean_logit_diff=res.clean_logit_diff,
                          corrupt_logit_diff=res.corrupt_logit_diff) for l in range(model.n_layers)]
    return pd.DataFrame(rows)


def restore_by_layer(sites: pd.DataFrame, component: str, site: str) -> np.ndarray:
    """Mean restoration per layer for one (component, site) of a `patch_sites` table."""
    sel = sites[(sites.component == component) & (sites.site == site)]
    if len(sel) == 0:
        raise ValueError(f"no rows for component {component!r} at site {site!r}")
    return sel.groupby("layer").restore.mean().sort_index().to_numpy()

