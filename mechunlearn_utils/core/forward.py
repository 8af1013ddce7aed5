"""Forward passes that skip work whose result is already known, with and without gradients.

Every prompt format of the workbook starts with the same one-shot example ("Fact: Tiger Woods
plays the sport of golf\\nFact: ..."), which is most of each prompt's tokens. And an edit that
trains only layers >= k leaves layers < k unchanged. Two savings follow, used by evaluation,
editing, masking and the attacks alike:

* **Shared token prefix** (`common_prefix_length`): the tokens every row of a batch shares run
  once (batch 1), their key/value cache is repeated over the batch, and only each row's own
  suffix runs. Gradients flow through the cache, so training uses it too.
* **Frozen layer prefix** (`prefix_hidden`, `layers_from`): the hidden state entering layer k is
  computed once for a fixed set of prompts and fed to layers[k:] at every step.

`last_token_hidden` combines both (and inserts a soft prompt right after BOS). It equals a plain
forward of the full prompts up to float rounding (tested).
"""

from __future__ import annotations

import contextlib

import torch


def embed_scale(model) -> float:
    """Factor the model multiplies token embeddings by (sqrt(d_model) for Gemma, else 1)."""
    scale = getattr(model.hf.get_input_embeddings(), "embed_scale", None)
    return float(scale) if scale is not None else 1.0


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Length of the token prefix every row shares, leaving each row at least one own token."""
    limit = max(int(attention_mask.sum(1).min()) - 1, 0)
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(0)
    diff = (~same).nonzero()
    return int(diff[0]) if len(diff) else limit


@contextlib.contextmanager
def layers_from(hf, start: int):
    """Run the HF decoder on layers[start:] only (feed it the hidden state entering `start`).

    The kept layers are renumbered from 0 while inside (their attention indexes the KV cache by
    `layer_idx`), and the per-layer attention types are cut to match; both are put back after."""
    if start == 0:
        yield
        return
    base = hf.model
    layers, types = base.layers, getattr(base.config, "layer_types", None)
    kept = list(layers)[start:]
    renumbered = [(m, m.layer_idx) for i, layer in enumerate(kept) for m in layer.modules()
                  if isinstance(getattr(m, "layer_idx", None), int)]
    base.layers = torch.nn.ModuleList(kept)
    for m, old in renumbered:
        m.layer_idx = old - start
    if types is not None:
        base.config.layer_types = list(types)[start:]
    try:
        yield
    finally:
        base.layers = layers
        for m, old in renumbered:
            m.layer_idx = old
        if types is not None:
            base.config.layer_types = types


@torch.no_grad()
def prefix_hidden(hf, input_ids, attention_mask, start: int) -> torch.Tensor | None:
    """Hidden state entering layer `start` (None when start == 0: nothing to freeze)."""
    if start == 0:
        return None
    out = hf.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                   use_cache=False)
    return out.hidden_states[start].detach()


def hidden_from(hf, input_ids, attention_mask, start: int, prefix: torch.Tensor | None):
    """Final-norm'd hidden states at every position, reusing a frozen layer prefix when given."""
    if prefix is None:
        return hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    with layers_from(hf, start):
        return hf.model(inputs_embeds=prefix, attention_mask=attention_mask, use_cache=False).last_hidden_state


def last_token_hidden(model, input_ids, attention_mask, last_index, start: int = 0,
                      frozen: torch.Tensor | None = None, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm'd hidden state [batch, d] at each row's last token of a right-padded batch.

    Runs the tokens all rows share once (`common_prefix_length`). With `frozen` (the hidden state
    entering layer `start`, from `prefix_hidden`) only layers[start:] run. `soft` [k, d] (raw
    embedding units) is inserted right after BOS (at the start without BOS) and scaled like a token
    embedding; gradients flow to it and to every trainable weight."""
    hf, B = model.hf, input_ids.shape[0]
    if (frozen is None) != (start == 0):
        raise ValueError("pass the frozen hidden states exactly when start > 0")
    if soft is not None and start > 0:
        raise ValueError("a soft prompt needs the full forward (start = 0)")
    width = int(last_index.max()) + 1  # right-padded: columns past every row's end are padding
    input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
    frozen = None if frozen is None else frozen[:, :width]
    rows = torch.arange(B, device=input_ids.device)
    P = common_prefix_length(input_ids, attention_mask)
    at = 1 if model.prepend_bos else 0
    if soft is None and P == 0:
        return hidden_from(hf, input_ids, attention_mask, start, frozen)[rows, last_index]
    if soft is not None and P < at:
        raise ValueError("a soft prompt goes after BOS, but a prompt has no BOS token")
    from transformers import DynamicCache

    if frozen is None:
        pre = hf.get_input_embeddings()(input_ids[:1, :P])
        if soft is not None:
            pre = torch.cat([pre[:, :at], (soft * embed_scale(model)).to(pre.dtype)[None], pre[:, at:]], 1)
        rest = dict(input_ids=input_ids[:, P:])
    else:
        pre, rest = frozen[:1, :P], dict(inputs_embeds=frozen[:, P:])
    with layers_from(hf, start):
        cache = DynamicCache(config=hf.config)
        hf.model(inputs_embeds=pre, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(B)
        mask = torch.cat([attention_mask.new_ones(B, pre.shape[1]), attention_mask[:, P:]], 1)
        out = hf.model(**rest, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
    return out[rows, last_index - P]
