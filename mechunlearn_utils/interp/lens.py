"""What does the model read out of its residual stream? Logit lens and direct logit attribution.

* `logit_lens`                 decode each layer's residual at the final token
* `direct_logit_attribution`   per-component (embeddings, heads, MLPs) share of the logit difference
* `dla_matrix`                 that share as a [layer x head/attn/mlp] table for a heatmap
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm.auto import tqdm

from mechunlearn_utils.core.logits import logit_diff, unembed
from mechunlearn_utils.core.sites import Site
from mechunlearn_utils.interp.common import (_batches, _capture, _check_prompts, _norm_gain, _per_prompt_ids,
                                             _per_prompt_lists, token_labels)


def _tl(kind: str, layer: int) -> str:
    return Site(kind, layer).tl_name()


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
    names = [_tl("resid_post", l) for l in range(model.n_layers)]
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
        names += [_tl("z", l), _tl("mlp_out", l)]
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
            z = acts[_tl("z", l)]  # [B, H, d_head]
            w_o = attn.o_proj.weight.view(model.d_model, H, -1)  # [d, H, d_head]
            per_head = torch.einsum("bhe,dhe->bhd", z, w_o)
            if post_norm:
                gain = _norm_gain(model.layers[l].post_attention_layernorm)
                per_head = per_head * gain / acts[f"blocks.{l}.ln1_post.hook_scale"][:, None]
            head_dla = (per_head * direction[:, None]).sum(-1)  # [B, H]
            for h in range(H):
                contrib[f"L{l}H{h}"] = head_dla[:, h]
            contrib[f"mlp{l}"] = (acts[_tl("mlp_out", l)] * direction).sum(-1)
        for r, i in enumerate(idx):
            ids = torch.tensor([correct[i], *incorrect[i]], device=hidden.device)
            lg = hidden[r] @ w_u[ids].T  # pre soft-cap logits: the linear quantity DLA splits up
            total = float(logit_diff(lg))
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
