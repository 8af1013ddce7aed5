"""How does the model recall a fact? Logit lens, direct logit attribution, activation patching.

Everything here works on the `LoadedModel` from `models.load_model` through TransformerLens hook
names (``blocks.{l}.hook_resid_pre``, ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.attn.hook_z`` ...).
The bridge runs the HF modules themselves, so hooks registered with ``model.tl.hooks(...)`` also
fire when we call the HF decoder body ``model.hf.model`` directly: we do that to skip the
262k-token unembedding of every position and unembed only the final token (and, for patching, only
the answer tokens). Patching also reuses the corrupt prompt's KV cache for the positions before the
earliest patch (they cannot change), so a run recomputes only the positions from the patch on.

* `logit_lens`                 decode each layer's residual at the final token
* `direct_logit_attribution`   per-component (embeddings, heads, MLPs) share of the logit difference
* `activation_patching`        clean -> corrupt patching per (layer, position); `..._many` batches
                               many pairs; `head_patching(_many)` patches single heads' outputs
* `corruption_pairs`           clean / corrupt athlete prompts of equal token length
* `patch_sites`                per-layer restoration at named sites (last subject token, final token)
* `position_roles` / `align_by_role`   average [layer, position] maps over different subjects
* `attention_to_subject`       attention from the final token to the subject, per layer and head
* `extraction_heads`           heads that both attend to the subject and write the answer
* plots (seaborn) and `athlete_heatmap_widget` (ipywidgets) over `plot_patching_heatmaps`
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.evaluate.suite import unembed

PATCH_COMPONENTS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
}
Z_HOOK = "blocks.{}.attn.hook_z"

# --------------------------------------------------------------------------- small helpers


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: the prompt list is empty")
    return prompts


def _check_id(model, token_id, what: str) -> int:
    if isinstance(token_id, str):
        raise TypeError(f"{what} must be a token id (int), got the string {token_id!r}: "
                        "use model.answer_token_id(' basketball')")
    token_id = int(token_id)
    vocab = model.hf.config.vocab_size
    if not 0 <= token_id < vocab:
        raise ValueError(f"{what} {token_id} is outside the vocabulary (size {vocab})")
    return token_id


def _per_prompt_ids(model, ids, n: int, what: str) -> list[int]:
    if isinstance(ids, (int, np.integer)):
        ids = [int(ids)] * n
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{what}: got {len(ids)} ids for {n} prompts")
    return [_check_id(model, i, what) for i in ids]


def _per_prompt_lists(model, ids, n: int, what: str) -> list[list[int]]:
    ids = list(ids)
    if ids and isinstance(ids[0], (int, np.integer)):
        ids = [ids] * n  # one list shared by every prompt
    if len(ids) != n:
        raise ValueError(f"{what}: got {len(ids)} lists for {n} prompts")
    out = [[_check_id(model, i, what) for i in row] for row in ids]
    if any(len(row) == 0 for row in out):
        raise ValueError(f"{what}: every prompt needs at least one id")
    return out


def token_labels(model, ids) -> list[str]:
    """Readable token strings (newlines escaped) for plot axes."""
    return [model.tokenizer.decode([int(i)]).replace("\n", "\\n") for i in ids]


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield list(range(start, min(n, start + batch_size)))


def _capture(model, batch: dict, names: list[str],
             at_last: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the decoder body once with hooks; return {hook name: activation} and the final hidden
    state (after the final norm) at each prompt's last token.

    With ``at_last`` the stored activations are taken at each prompt's last token (dim 1 is the
    position for every hook we use, except ``hook_pattern`` which is stored whole).
    """
    store: dict[str, torch.Tensor] = {}
    rows = torch.arange(len(batch["last_index"]), device=batch["last_index"].device)

    def saver(name):  # keyed by the name we asked for (the bridge may report a canonical alias)
        def save(t, hook):
            keep = t[rows, batch["last_index"]] if at_last and not name.endswith("hook_pattern") else t
            store[name] = keep.detach().clone()
            return t
        return save

    with model.tl.hooks(fwd_hooks=[(n, saver(n)) for n in names]):
        out = model.hf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"hooks never fired: {missing[:3]} (hook names of this model?)")
    return store, out.last_hidden_state[rows, batch["last_index"]]


def _answer_logits(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits of selected token ids from final-norm'd hidden states (soft-capping included).

    hidden [B, d]; ids [K] or [B, K] -> [B, K].
    """
    w = model.hf.lm_head.weight
    logits = (hidden @ w[ids].T) if ids.dim() == 1 else torch.einsum("bd,bkd->bk", hidden, w[ids])
    bias = getattr(model.hf.lm_head, "bias", None)
    if bias is not None:
        logits = logits + bias[ids]
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _logit_diff(model, hidden, answer_id: int, other_ids: list[int]) -> torch.Tensor:
    """logit(answer) - mean logit(others), per row of `hidden`."""
    ids = torch.tensor([answer_id, *other_ids], device=hidden.device)
    logits = _answer_logits(model, hidden, ids)
    return logits[:, 0] - logits[:, 1:].mean(-1)


def _norm_gain(norm_module) -> torch.Tensor:
    """The elementwise gain of an RMSNorm: Gemma's norms scale by (1 + w), Llama's by w."""
    original = getattr(norm_module, "original_component", norm_module)
    weight = original.weight.detach()
    return 1.0 + weight if "Gemma" in type(original).__name__ else weight


# --------------------------------------------------------------------------- logit lens


@torch.no_grad()
def logit_lens(model, prompts, answer_ids, candidate_ids, batch_size: int = 8,
               progress: bool = True) -> pd.DataFrame:
    """Decode the residual stream after every block at each prompt's final token.

    Each layer's ``hook_resid_post`` goes through the model's own final norm and unembedding, as
    if the remaining blocks were skipped; the last layer reproduces the model's output exactly.

    Args: `answer_ids` the right token per prompt (or one id for all); `candidate_ids` the
    competing answers (e.g. the three sports; shared or one list per prompt; must contain the
    answer).
    Returns one row per (prompt, layer): ``p_correct`` (softmax over the full vocabulary),
    ``rank_correct`` (0 = top-1 token), ``p_norm`` (probability normalized over the candidates),
    ``candidate_top`` (the answer beats the other candidates), ``top_token`` (the top-1 token),
    and ``p_<candidate>`` for each candidate.
    """
    prompts = _check_prompts(prompts)
    answers = _per_prompt_ids(model, answer_ids, len(prompts), "answer_ids")
    cands = _per_prompt_lists(model, candidate_ids, len(prompts), "candidate_ids")
    for a, c in zip(answers, cands):
        if a not in c:
            raise ValueError(f"answer id {a} is not among its candidate ids {c}")
    names = [PATCH_COMPONENTS["resid_post"].format(l) for l in range(model.n_layers)]
    cand_names = [token_labels(model, c) for c in cands]
    rows = []
    for idx in tqdm(list(_batches(len(prompts), batch_size)), desc="logit lens", disable=not progress):
        batch = model.tokenize([prompts[i] for i in idx])
        acts, _ = _capture(model, batch, names)
        resid = torch.stack([acts[n] for n in names])  # [layer, B, d]: one unembedding for all layers
        logits = unembed(model, model.hf.model.norm(resid)).float()  # [layer, B, vocab]
        lse = torch.logsumexp(logits, -1)
        top = logits.argmax(-1)
        a = torch.tensor([answers[i] for i in idx], device=logits.device)
        a_logit = logits.gather(-1, a[None, :, None].expand(len(names), -1, 1))  # [layer, B, 1]
        ranks = (logits > a_logit).sum(-1)
        for r, i in enumerate(idx):
            c = cands[i]
            cand_lp = logits[:, r, c] - lse[:, r, None]  # [layer, n_cand]
            p_norm = torch.softmax(cand_lp, -1)[:, c.index(answers[i])]
            winner = cand_lp.argmax(-1)
            for layer in range(len(names)):
                rec = dict(prompt=i, layer=layer, p_correct=float((a_logit[layer, r, 0] - lse[layer, r]).exp()),
                           rank_correct=int(ranks[layer, r]), p_norm=float(p_norm[layer]),
                           candidate_top=bool(c[int(winner[layer])] == answers[i]),
                           top_token=model.tokenizer.decode([int(top[layer, r])]))
                rec.update({f"p_{nm.strip()}": float(lp.exp()) for nm, lp in zip(cand_names[i], cand_lp[layer])})
                rows.append(rec)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- direct logit attribution


@torch.no_grad()
def direct_logit_attribution(model, prompts, correct_ids, incorrect_ids, batch_size: int = 16,
                             progress: bool = True) -> pd.DataFrame:
    """Each component's direct contribution to the logit difference at the final token.

    logit diff = logit(correct) - mean logit(incorrect). The residual stream at the final token is
    a sum: embeddings + every layer's attention output + every MLP output. Gemma-3 passes each
    attention / MLP output through its own RMSNorm (``ln1_post`` / ``ln2_post``) before adding it,
    and the sum through the final RMSNorm; those norms are *not* linear. We linearize by freezing
    every norm's scale at its value on this (clean) run: then each head's share is
    ``z_h @ W_O[:, h].T / scale_ln1_post * gain`` and the final logit difference is a dot product
    with ``gain_final * (W_U[correct] - mean W_U[incorrect]) / scale_final``. At the clean run
    this decomposition is exact: the components sum to the model's (pre soft-cap) logit difference
    (for models without attention-output / unembedding biases, such as Gemma and Llama). It
    measures *direct* effects only (what a component writes straight to the output).

    Returns one row per (prompt, component): ``component`` ('embed', 'L{l}H{h}', 'mlp{l}'),
    ``kind`` ('embed' | 'head' | 'mlp'), ``layer``, ``head`` (-1 unless a head), ``dla``, and
    ``logit_diff`` (the model's own logit difference for that prompt).
    """
    prompts = _check_prompts(prompts)
    correct = _per_prompt_ids(model, correct_ids, len(prompts), "correct_ids")
    incorrect = _per_prompt_lists(model, incorrect_ids, len(prompts), "incorrect_ids")
    for c, inc in zip(correct, incorrect):
        if c in inc:
            raise ValueError(f"correct id {c} is also among the incorrect ids {inc}")
    L, H = model.n_layers, model.n_heads
    post_norm = "blocks.0.ln1_post.hook_scale" in model.tl.hook_dict
    names = ["blocks.0.hook_resid_pre", "ln_final.hook_scale"]
    for l in range(L):
        names += [Z_HOOK.format(l), PATCH_COMPONENTS["mlp_out"].format(l)]
        if post_norm:
            names.append(f"blocks.{l}.ln1_post.hook_scale")
    w_u = model.hf.lm_head.weight
    gain_final = _norm_gain(model.hf.model.norm)
    rows = []
    for idx in tqdm(list(_batches(len(prompts), batch_size)), desc="DLA", disable=not progress):
        batch = model.tokenize([prompts[i] for i in idx])
        acts, hidden = _capture(model, batch, names)
        # logit-difference direction in the residual stream, with the final norm frozen
        direction = torch.stack([w_u[correct[i]] - w_u[incorrect[i]].mean(0) for i in idx])
        direction = direction * gain_final / acts["ln_final.hook_scale"]  # [B, d]
        contrib = {"embed": (acts["blocks.0.hook_resid_pre"] * direction).sum(-1)}
        for l in range(L):
            attn = model.layers[l].self_attn
            z = acts[Z_HOOK.format(l)]  # [B, H, d_head]
            w_o = attn.o_proj.weight.view(model.d_model, H, -1)  # [d, H, d_head]
            per_head = torch.einsum("bhe,dhe->bhd", z, w_o)
            if post_norm:
                gain = _norm_gain(model.layers[l].post_attention_layernorm)
                per_head = per_head * gain / acts[f"blocks.{l}.ln1_post.hook_scale"][:, None]
            head_dla = (per_head * direction[:, None]).sum(-1)  # [B, H]
            for h in range(H):
                contrib[f"L{l}H{h}"] = head_dla[:, h]
            contrib[f"mlp{l}"] = (acts[PATCH_COMPONENTS["mlp_out"].format(l)] * direction).sum(-1)
        for r, i in enumerate(idx):
            ids = torch.tensor([correct[i], *incorrect[i]], device=hidden.device)
            lg = hidden[r] @ w_u[ids].T  # pre soft-cap logits: the linear quantity DLA splits up
            total = float(lg[0] - lg[1:].mean())
            for comp, vals in contrib.items():
                kind = "embed" if comp == "embed" else ("mlp" if comp.startswith("mlp") else "head")
                layer = -1 if kind == "embed" else int(comp[3:] if kind == "mlp" else comp[1:].split("H")[0])
                head = int(comp.split("H")[1]) if kind == "head" else -1
                rows.append(dict(prompt=i, component=comp, kind=kind, layer=layer, head=head,
                                 dla=float(vals[r]), logit_diff=total))
    return pd.DataFrame(rows)


def dla_matrix(dla: pd.DataFrame) -> pd.DataFrame:
    """Mean DLA over prompts as a [layer x (H0..H{n-1}, 'attn', 'mlp')] table for a heatmap."""
    heads = dla[dla.kind == "head"].groupby(["layer", "head"]).dla.mean().unstack("head")
    heads.columns = [f"H{h}" for h in heads.columns]
    heads["attn"] = heads.sum(axis=1)
    heads["mlp"] = dla[dla.kind == "mlp"].groupby("layer").dla.mean()
    return heads


# --------------------------------------------------------------------------- activation patching


@dataclass
class PatchingResult:
    """Normalized restoration per component: 0 = corrupt run, 1 = clean run.

    ``scores[component]`` is [n_layers, n_positions]; NaN where a position was not patched.
    Positions before ``first_diff`` (tokens shared by both prompts, e.g. the one-shot prefix) are
    exactly 0 without a run: a causal model computes identical activations there.
    """

    scores: dict
    tokens: list
    clean_logit_diff: float
    corrupt_logit_diff: float
    first_diff: int

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
        logits = _answer_logits(model, hidden, ids)
        return logits[:, 0] - logits[:, 1:].mean(-1)
    return torch.cat([_logit_diff(model, hidden[r:r + 1], p.answer_id, p.other_ids) for r, p in enumerate(pairs)])


def _prefix_cache(model, cache, corrupt: torch.Tensor, start: int, rows: torch.Tensor):
    """The corrupt runs' KV cache for positions < `start`, for the batch rows `rows` (None if 0)."""
    if start == 0:
        return None
    kv = copy.deepcopy(cache)
    try:
        kv.crop(start - corrupt.shape[1])  # negative: drop the positions from `start` on
    except (ValueError, RuntimeError):  # a cache layer that cannot crop: recompute the prefix
        return model.hf.model(input_ids=corrupt[rows, :start], use_cache=True).past_key_values
    kv.batch_select_indices(rows)
    return kv


def _patch_engine(model, pairs: list[_Pair], names: list[str], make_runs, batch_size: int = 128,
                  max_pairs: int = 16, progress: bool = False, desc: str = "patching"):
    """Run patched copies of corrupt prompts, many pairs at once.

    For each pair, `make_runs(pair_index, clean_acts)` (clean_acts: {hook name: activation
    [pos, ...]} of the clean run, for `names`) returns a list of (key, run); a run is a list of
    patches (hook name, position, head | None, value). Pairs of equal token length are batched
    together: one forward for their clean prompts, one for their corrupt prompts (with a KV cache).
    A run whose earliest patch is at position p computes exactly the corrupt activations before
    p, so those come from the corrupt run's cache and only positions p..end are recomputed.

    Returns (list over pairs of {key: restore}, clean logit diffs, corrupt logit diffs); restore =
    (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt).
    """
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
        batch = dict(input_ids=clean, attention_mask=torch.ones_like(clean),
                     last_index=torch.full((len(js),), T - 1, device=dev))
        acts, hidden = _capture(model, batch, names, at_last=False)
        cl = _row_logit_diff(model, hidden, group)
        out = model.hf.model(input_ids=corrupt, use_cache=True)
        cache = out.past_key_values
        co = _row_logit_diff(model, out.last_hidden_state[:, -1], group)
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
                kv = _prefix_cache(model, cache, corrupt, start, rows)
                hooks: dict[tuple, list] = {}
                for r, (_, _, _, run) in enumerate(part):
                    for name, pos, head, value in run:
                        hooks.setdefault((name, head is None), []).append((r, pos - start, head, value))
                fwd = [(name, _patch_hook(rr, pp, None if no_head else hh, torch.stack(vv)))
                       for (name, no_head), items in hooks.items() for rr, pp, hh, vv in [zip(*items)]]
                kwargs = dict(past_key_values=kv, use_cache=True) if kv is not None else {}
                with model.tl.hooks(fwd_hooks=fwd):
                    h = model.hf.model(input_ids=corrupt[rows, start:], **kwargs).last_hidden_state[:, -1]
                ld = _row_logit_diff(model, h, [group[g] for g, _, _, _ in part]).float().cpu().numpy()
                for (g, key, _, _), value in zip(part, ld):
                    j = js[g]
                    scores[j][key] = _restore(value, clean_ld[j], corrupt_ld[j])
        bar.update(len(js))
    bar.close()
    return scores, clean_ld, corrupt_ld


def _restore(ld, clean_ld, corrupt_ld):
    return (ld - corrupt_ld) / (clean_ld - corrupt_ld)


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
def activation_patching_many(model, pairs, components=("resid_pre", "mlp_out", "attn_out"), positions=None,
                             batch_size: int = 128, progress: bool = True) -> list[PatchingResult]:
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
    names = [PATCH_COMPONENTS[c].format(l) for c in components for l in range(L)]

    def make_runs(j, acts):
        return [((comp, l, p), [(PATCH_COMPONENTS[comp].format(l), p, None, acts[PATCH_COMPONENTS[comp].format(l)][p])])
                for comp in components for l in range(L) for p in wanted[j][comp] if p >= pairs[j].first_diff]

    scores, clean_ld, corrupt_ld = _patch_engine(model, pairs, names, make_runs, batch_size,
                                                 progress=progress, desc="patching")
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
                                      float(corrupt_ld[j]), p.first_diff))
    return results


def activation_patching(model, clean_prompt: str, corrupt_prompt: str, answer_id: int, other_ids,
                        components=("resid_pre", "mlp_out", "attn_out"), positions=None,
                        batch_size: int = 128, progress: bool = True) -> PatchingResult:
    """Patch clean activations into the corrupt run, one (layer, position) at a time.

    Both prompts must have the same number of tokens (e.g. the subject swapped for another athlete
    of another sport with as many tokens). Metric: normalized logit difference
    ``(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)``, LD = logit(answer) - mean
    logit(other_ids), answer = the *clean* answer: 0 = corrupt behaviour, 1 = clean behaviour.

    `components`: names in `PATCH_COMPONENTS` (TransformerLens hooks ``blocks.{l}.hook_<name>``);
    `positions`: None (all), a list of positions (negative counts from the end), or
    {component: positions}. All (layer, position) patches run as batches of `batch_size` copies of
    the corrupt prompt.
    """
    return activation_patching_many(model, [(clean_prompt, corrupt_prompt, answer_id, other_ids)],
                                    components, positions, batch_size, progress)[0]


@torch.no_grad()
def head_patching_many(model, pairs, position: int = -1, batch_size: int = 128,
                       progress: bool = True) -> np.ndarray:
    """Restoration [n_pairs, n_layers, n_heads] from patching one head's output
    (``attn.hook_z``) at one position (default: the final token), clean into corrupt."""
    pairs = _pairs_from(model, pairs)
    L, H = model.n_layers, model.n_heads
    names = [Z_HOOK.format(l) for l in range(L)]
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
                                 desc="head patching")
    out = np.zeros((len(pairs), L, H))  # positions in the shared prefix: exactly 0
    for j, sc in enumerate(scores):
        for (l, h), value in sc.items():
            out[j, l, h] = value
    return out


def head_patching(model, clean_prompt: str, corrupt_prompt: str, answer_id: int, other_ids,
                  position: int = -1, batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Restoration [n_layers, n_heads] from patching one head's output (``attn.hook_z``) at one
    position (default: the final token) from the clean into the corrupt run."""
    return head_patching_many(model, [(clean_prompt, corrupt_prompt, answer_id, other_ids)], position,
                              batch_size, progress)[0]


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


SITE_POSITIONS = {"subject_last": lambda subj, T: subj[-1], "subject_first": lambda subj, T: subj[0],
                  "final": lambda subj, T: T - 1}
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


# --------------------------------------------------------------------------- aligning positions


def position_roles(tokens: list[str], subject_positions: list[int]) -> list[str]:
    """A role per position so prompts with subjects of different lengths line up.

    Before the subject: ``"{i}:{token}"`` (the shared prefix); the subject: ``subj first``,
    ``subj mid`` (any middle tokens), ``subj last``; after it: ``"+{k}:{token}"``.
    """
    if not subject_positions:
        raise ValueError("subject_positions is empty")
    s0, s1 = subject_positions[0], subject_positions[-1]
    roles = []
    for i, tok in enumerate(tokens):
        if i < s0:
            roles.append(f"{i}:{tok}")
        elif i == s1:
            roles.append("subj last")
        elif i == s0:
            roles.append("subj first")
        elif i < s1:
            roles.append("subj mid")
        else:
            roles.append(f"+{i - s1}:{tok}")
    return roles


def _role_key(role: str):
    if role.startswith("subj"):
        return (1, ["subj first", "subj mid", "subj last"].index(role))
    if role.startswith("+"):
        return (2, int(role[1:].split(":")[0]))
    return (0, int(role.split(":")[0]))


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
    order = sorted(per_role, key=_role_key)
    return pd.DataFrame({r: np.nanmean(np.stack(per_role[r]), axis=0) for r in order})


# --------------------------------------------------------------------------- attention & extraction heads


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
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]
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


# --------------------------------------------------------------------------- athlete selection


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


# --------------------------------------------------------------------------- plots & widget


def plot_logit_lens(lens: pd.DataFrame, highlight: pd.DataFrame | None = None, label: str = "",
                    ax=None):
    """Lines over layers: mean p_norm and p_correct (with 95% CI); optionally one prompt dashed."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    long = lens.melt(id_vars=["layer"], value_vars=["p_norm", "p_correct"], var_name="measure")
    sns.lineplot(long, x="layer", y="value", hue="measure", marker="o", ax=ax)
    if highlight is not None:
        for col, c in (("p_norm", "C0"), ("p_correct", "C1")):
            ax.plot(highlight.layer, highlight[col], ls="--", c=c, label=f"{col} ({label})")
    ax.axhline(1 / 3, c="grey", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(ylim=(0, 1.02), ylabel="probability of the right sport", title="Logit lens at the final token")
    ax.legend(fontsize=8)
    return ax.figure


def plot_patching_heatmaps(arrays: dict, xlabels, title: str = "", vmax: float = 1.0):
    """One layer x position heatmap per component (restoration; 0 corrupt, 1 clean)."""
    comps = list(arrays)
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 4.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, comp in zip(axes, comps):
        data = np.asarray(arrays[comp])
        sns.heatmap(data, ax=ax, cmap="RdBu_r", center=0, vmin=-vmax, vmax=vmax,
                    xticklabels=list(xlabels), yticklabels=True, cbar=ax is axes[-1])
        ax.set(title=comp, xlabel="position")
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7, rotation=90)
        ax.tick_params(axis="y", labelsize=7, rotation=0)
    axes[0].set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_layer_by_head(matrix, title: str, cbar_label: str, center=None, fmt=".2f"):
    """Heatmap of a [layer x column] table (DLA per head/MLP, attention per head, ...)."""
    data = pd.DataFrame(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * data.shape[1], 0.32 * data.shape[0] + 1.2))
    sns.heatmap(data, ax=ax, cmap="RdBu_r" if center is not None else "viridis", center=center,
                annot=True, fmt=fmt, annot_kws={"size": 7}, cbar_kws={"label": cbar_label})
    ax.invert_yaxis()
    ax.set(title=title, ylabel="layer")
    fig.tight_layout()
    return fig


def plot_restore_curves(sites: pd.DataFrame, title: str = "Restoration by layer"):
    """Mean (95% CI) restoration per layer for every (component, site) of a `patch_sites` table."""
    data = sites.assign(where=sites.component + " @ " + sites.site)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    sns.lineplot(data, x="layer", y="restore", hue="where", marker="o", ax=ax)
    ax.axhline(0, c="grey", lw=0.8)
    ax.axhline(1, c="grey", lw=0.8, ls=":")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(title=title, ylabel="fraction restored (0 corrupt, 1 clean)")
    ax.legend(fontsize=8)
    return fig


def figure_png(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def athlete_heatmap_widget(model, pairs: pd.DataFrame, components=("resid_pre", "mlp_out", "attn_out"),
                           precomputed: dict | None = None):
    """Dropdown of athletes -> their patching heatmaps (`activation_patching` +
    `plot_patching_heatmaps`). `precomputed`: {athlete: PatchingResult} already at hand.

    The figure is shown as an `ipywidgets.Image` (PNG bytes), not through an Output widget: the
    notebook runner (nbclient) mimics Output widgets with extra messages that can stall papermill.
    """
    import ipywidgets as widgets

    if len(pairs) == 0:
        raise ValueError("no clean/corrupt pairs to choose from")
    results = dict(precomputed or {})
    by_name = {p.athlete: p for p in pairs.itertuples(index=False)}
    dropdown = widgets.Dropdown(options=list(by_name), description="athlete")
    status = widgets.Label()
    image = widgets.Image(format="png")

    def render(athlete: str) -> bytes:
        pair = by_name[athlete]
        if athlete not in results:
            results[athlete] = activation_patching(model, pair.clean_prompt, pair.corrupt_prompt,
                                                   pair.answer_id, pair.other_ids, components,
                                                   progress=False)
        res = results[athlete]
        return figure_png(plot_patching_heatmaps(
            {c: res[c] for c in components}, res.tokens,
            f"{pair.athlete} ({pair.sport}) vs {pair.corrupt_athlete} ({pair.corrupt_sport})"))

    def show(change=None):
        status.value = f"patching {dropdown.value} ..."
        image.value = render(dropdown.value)
        status.value = ""

    dropdown.observe(show, names="value")
    show()
    return widgets.VBox([widgets.HBox([dropdown, status]), image])
