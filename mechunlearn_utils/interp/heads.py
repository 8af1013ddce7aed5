"""Which heads move the subject's attribute to the final token? And lining positions up.

* `attention_to_subject`   attention from the final token to the subject, per layer and head
* `extraction_heads`       heads that both attend to the subject and write the answer (DLA x attention)
* `heads_by_effect`        heads whose measured effect (e.g. path patching) passes a threshold
* `align_by_role`          average [layer, position] maps over prompts by `core.sites.position_roles`
* `select_athletes`        athletes balanced over sports, for the per-athlete analyses
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.sites import Site, position_roles, role_key  # noqa: F401 (position_roles: re-exported)
from mechunlearn_utils.interp.common import _batches, _capture, _check_prompts


def align_by_role(arrays: list[np.ndarray], roles: list[list[str]]) -> pd.DataFrame:
    """Average [layer, position] arrays of several prompts by position role -> [layer x role]."""
    if len(arrays) == 0 or len(arrays) != len(roles):
        raise ValueError("need one role list per array, and at least one array")
    per_role: dict[str, list[np.ndarray]] = {}
    for arr, rl in zip(arrays, roles):
        if arr.shape[1] != len(rl):
            raise ValueError(f"array has {arr.shape[1]} positions but {len(rl)} roles")
        for role in dict.fromkeys(rl):
            cols = [i for i, r in enumerate(rl) if r == role]
            per_role.setdefault(role, []).append(np.nanmean(arr[:, cols], axis=1))
    order = sorted(per_role, key=role_key)
    return pd.DataFrame({r: np.nanmean(np.stack(per_role[r]), axis=0) for r in order})


@torch.no_grad()
def attention_to_subject(model, prompts, subjects, batch_size: int = 16,
                         progress: bool = True) -> np.ndarray:
    """Attention from each prompt's final token to its subject's tokens (summed over the subject's
    last mention), per layer and head: array [n_prompts, n_layers, n_heads]."""
    prompts = _check_prompts(prompts)
    subjects = [subjects] * len(prompts) if isinstance(subjects, str) else list(subjects)
    if len(subjects) != len(prompts):
        raise ValueError(f"got {len(subjects)} subjects for {len(prompts)} prompts")
    subj_pos = [model.subject_positions(p, s) for p, s in zip(prompts, subjects)]
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]  # not a Site: a [head, query, key] map
    out = np.zeros((len(prompts), model.n_layers, model.n_heads))
    for idx in tqdm(list(_batches(len(prompts), batch_size)), desc="attention", disable=not progress):
        batch = model.tokenize([prompts[i] for i in idx])
        acts, _ = _capture(model, batch, names)
        for l, name in enumerate(names):
            pattern = acts[name]  # [B, head, query, key]
            for r, i in enumerate(idx):
                q = int(batch["last_index"][r])
                out[i, l] = pattern[r, :, q, subj_pos[i]].sum(-1).float().cpu().numpy()
    return out


def extraction_heads(dla: pd.DataFrame, attention: np.ndarray, head_restore: np.ndarray | None = None,
                     min_attention: float = 0.1, min_dla_frac: float = 0.05,
                     top_k: int | None = None) -> pd.DataFrame:
    """Rank heads as candidate *extraction* heads: they attend from the final token to the subject
    AND write the right answer directly into the output.

    `dla`: from `direct_logit_attribution`; `attention`: [prompts, layers, heads] from
    `attention_to_subject` (same prompts); `head_restore`: optional [layers, heads] (or
    [prompts, layers, heads]) from `head_patching` at the final token. Score = mean DLA (clipped
    at 0) x mean attention to the subject; ``candidate`` = mean DLA >= `min_dla_frac` x the mean
    logit difference and mean attention >= `min_attention`. Sorted by score, candidates first.
    """
    heads = dla[dla.kind == "head"]
    if len(heads) == 0:
        raise ValueError("the DLA table has no head rows")
    att = np.asarray(attention)
    if att.ndim != 3:
        raise ValueError("attention must be [prompts, layers, heads]")
    n_prompts = heads.prompt.nunique()
    if att.shape[0] != n_prompts:
        raise ValueError(f"attention covers {att.shape[0]} prompts, the DLA table {n_prompts}")
    table = heads.groupby(["layer", "head"]).dla.agg(mean_dla="mean",
                                                     frac_positive=lambda x: float((x > 0).mean()))
    table = table.reset_index()
    mean_att = att.mean(0)
    table["attention_to_subject"] = [mean_att[l, h] for l, h in zip(table["layer"], table["head"])]
    if head_restore is not None:
        hr = np.asarray(head_restore)
        hr = hr.mean(0) if hr.ndim == 3 else hr
        table["patch_restore"] = [hr[l, h] for l, h in zip(table["layer"], table["head"])]
    table["score"] = table.mean_dla.clip(lower=0) * table.attention_to_subject
    min_dla = max(min_dla_frac * float(heads.groupby("prompt").logit_diff.first().mean()), 1e-6)
    table["candidate"] = (table.mean_dla >= min_dla) & (table.attention_to_subject >= min_attention)
    table["head_name"] = [f"{l}.{h}" for l, h in zip(table["layer"], table["head"])]
    table = table.sort_values(["candidate", "score"], ascending=[False, False]).reset_index(drop=True)
    return table.head(top_k) if top_k else table


def select_athletes(known: pd.DataFrame, n: int, first: tuple[str, ...] = ("Michael Jordan",),
                    seed: int = 0) -> pd.DataFrame:
    """`n` athletes balanced over sports (round robin, seeded order), `first` ones in front if known."""
    if len(known) == 0:
        raise ValueError("no known athletes: run notebook 00 first or lower its threshold")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    shuffled = known.iloc[rng.permutation(len(known))]
    head = known[known.athlete.isin(first)]
    rest = shuffled[~shuffled.athlete.isin(first)]
    by_sport = [g for _, g in rest.groupby("sport", sort=True)]
    order, k = [], 0
    while any(k < len(g) for g in by_sport):
        order += [g.iloc[[k]] for g in by_sport if k < len(g)]
        k += 1
    return pd.concat([head, *order]).head(n).reset_index(drop=True)


def heads_by_effect(effect: np.ndarray, threshold: float = 0.05, top_k: int | None = None) -> list[tuple]:
    """(layer, head) of the heads whose effect [L, H] reaches `threshold` (or the `top_k` largest),
    largest first: FLU's extraction heads from their path-patching effect."""
    order = sorted(((float(effect[l, h]), l, h) for l in range(effect.shape[0])
                    for h in range(effect.shape[1])), reverse=True)
    chosen = order[:top_k] if top_k else [o for o in order if o[0] >= threshold]
    if not chosen:
        raise ValueError(
            f"no head's direct effect reaches {threshold} (largest {order[0][0]:.3f} at layer "
            f"{order[0][1]} head {order[0][2]}): lower the head threshold or give top_k")
    return [(l, h) for _, l, h in chosen]
