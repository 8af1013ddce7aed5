"""Helpers shared by the interpretability methods: argument checks, batching, hooked runs.

Every method reads activations through TransformerLens hook names of `core.sites.Site` (the bridge
runs the HF modules themselves, so hooks registered with ``model.tl.hooks(...)`` also fire when we
call the HF decoder body ``model.hf.model`` directly: we do that to skip the 262k-token
unembedding of every position and unembed only what we need).
"""

from __future__ import annotations

import numpy as np
import torch

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


def _norm_gain(norm_module) -> torch.Tensor:
    """The elementwise gain of an RMSNorm: Gemma's norms scale by (1 + w), Llama's by w."""
    original = getattr(norm_module, "original_component", norm_module)
    weight = original.weight.detach()
    return 1.0 + weight if "Gemma" in type(original).__name__ else weight
