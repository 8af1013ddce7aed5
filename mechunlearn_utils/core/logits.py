"""From hidden states to logits, and the logit difference: one place for both.

* `softcap`        Gemma's final logit soft-capping ``tanh(logits / cap) * cap`` (no-op without a cap)
* `unembed`        final-norm'd hidden states -> logits over the whole vocabulary (soft-capped)
* `token_logits`   the same for a few selected token ids only (the 262k-token vocabulary is costly)
* `final_logits`   a forward pass -> logits at each prompt's last token
* `logit_diff`     logit(right answer) - mean logit(the other candidates)
"""

from __future__ import annotations

import torch


def softcap(model, logits: torch.Tensor) -> torch.Tensor:
    """Gemma's final logit soft-capping, ``tanh(logits / cap) * cap``; unchanged without a cap."""
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm'd hidden states [..., d] -> logits [..., vocab] (with Gemma's soft-capping).

    Folded to one [n, d] @ [d, vocab] product: a 3-d bf16 input made torch run `bmm` on a copy of
    the whole 262k x 640 unembedding, forward and backward (0.4 s a call on a 2-core CPU)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return softcap(model, model.hf.lm_head(flat)).view(*hidden.shape[:-1], -1)


def token_logits(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Soft-capped logits of selected token ids only, from final-norm'd hidden states.

    ids [K] (shared): hidden [B, d] -> [B, K]. ids [B, K] (one row per batch row): hidden
    [B, (n,) d] -> [B, (n,) K].
    """
    w = model.hf.lm_head.weight
    if ids.dim() == 1:
        logits = hidden @ w[ids].T
    else:
        flat = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
        logits = torch.einsum("bnd,bcd->bnc", flat, w[ids]).reshape(*hidden.shape[:-1], ids.shape[-1])
    bias = getattr(model.hf.lm_head, "bias", None)
    if bias is not None:
        b = bias[ids]
        logits = logits + (b if ids.dim() == 1 else b.view(b.shape[0], *[1] * (logits.dim() - 2), b.shape[-1]))
    return softcap(model, logits)


def final_logits(model, input_ids, attention_mask, last_index, start: int = 0,
                 hidden: torch.Tensor | None = None, **forward_kwargs) -> torch.Tensor:
    """Logits [batch, vocab] at each prompt's last token (right-padded batch).

    With `hidden` (the residual stream entering layer `start`, [batch, pos, d]) only layers[start:]
    run on it (`forward.layers_from`); `input_ids` then only give the shape. Gradients flow when
    called outside `torch.no_grad()` (training uses this too).
    """
    if hidden is not None:
        from mechunlearn_utils.core.forward import layers_from

        with layers_from(model.hf, start):
            out = model.hf.model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False,
                                 **forward_kwargs)
    elif start:
        raise ValueError(f"start={start} needs the hidden state entering that layer")
    else:
        out = model.hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    hidden = out.last_hidden_state[torch.arange(len(last_index), device=last_index.device), last_index]
    return unembed(model, hidden)


def logit_diff(cand_logits: torch.Tensor, correct: torch.Tensor | None = None) -> torch.Tensor:
    """logit(right) - mean logit(other candidates), over the last dimension of `cand_logits`.

    ``correct=None``: the right answer is column 0 (``c[..., 0] - c[..., 1:].mean(-1)``).
    ``correct`` [batch]: the right column per row (``right - (sum - right) / (n - 1)``). The two
    forms are equal up to float rounding; each caller keeps the form it always used, so that saved
    numbers stay bit-identical.
    """
    if correct is None:
        return cand_logits[..., 0] - cand_logits[..., 1:].mean(-1)
    c = cand_logits
    idx = correct.to(c.device).view(-1, *[1] * (c.dim() - 1)).expand(*c.shape[:-1], 1)
    right = c.gather(-1, idx)[..., 0]
    return right - (c.sum(-1) - right) / (c.shape[-1] - 1)
