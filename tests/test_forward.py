"""Shared-prefix and frozen-prefix forwards equal a plain forward, values and gradients alike."""

from __future__ import annotations

import pytest
import torch

from mechunlearn_utils.core.forward import (common_prefix_length, embed_scale, last_token_hidden, layers_from,
                                       prefix_hidden)
from mechunlearn_utils.data.prompts import sport_prompts

ATHLETES = ["Michael Jordan", "LeBron James", "Babe Ruth", "Derek Jeter", "Tom Brady", "Peyton Manning"]
SPORTS = ["basketball", "basketball", "baseball", "baseball", "football", "football"]


def _batch(model, fmt="normal", n=len(ATHLETES)):
    prompts = sport_prompts(ATHLETES[:n], SPORTS[:n], fmt).prompts
    return model.tokenize(prompts)


def _plain(model, b):
    out = model.hf.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    return out[torch.arange(len(b["last_index"])), b["last_index"]]


def test_common_prefix_length():
    ids = torch.tensor([[2, 5, 6, 7, 9], [2, 5, 6, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert common_prefix_length(ids, mask) == 3
    # identical prompts: every row keeps at least its last token
    same = torch.tensor([[2, 5, 6], [2, 5, 6]])
    assert common_prefix_length(same, torch.ones_like(same)) == 2


@pytest.mark.parametrize("fmt", ["normal", "question", "mcq"])
def test_shared_prefix_forward_equals_plain_forward(tiny, fmt):
    b = _batch(tiny, fmt)
    assert common_prefix_length(b["input_ids"], b["attention_mask"]) > 3
    with torch.no_grad():
        torch.testing.assert_close(last_token_hidden(tiny, b["input_ids"], b["attention_mask"], b["last_index"]),
                                   _plain(tiny, b), atol=1e-5, rtol=1e-5)


def test_shared_and_frozen_prefix_together_equal_plain_forward(tiny):
    b = _batch(tiny)
    frozen = prefix_hidden(tiny.hf, b["input_ids"], b["attention_mask"], 1)
    with torch.no_grad():
        got = last_token_hidden(tiny, b["input_ids"], b["attention_mask"], b["last_index"], 1, frozen)
        torch.testing.assert_close(got, _plain(tiny, b), atol=1e-5, rtol=1e-5)
    attn = tiny.hf.model.layers[1].self_attn
    assert attn.layer_idx == 1 and len(tiny.hf.model.layers) == 2  # renumbering undone


def test_layers_from_renumbers_and_restores(tiny):
    with layers_from(tiny.hf, 1):
        assert len(tiny.hf.model.layers) == 1 and tiny.hf.model.layers[0].self_attn.layer_idx == 0
    assert [layer.self_attn.layer_idx for layer in tiny.hf.model.layers] == [0, 1]


@pytest.mark.parametrize("start", [0, 1])
def test_gradients_through_the_shared_prefix_match(tiny, start):
    """Training uses the cached prefix: the gradient of a trained weight must be the plain one."""
    b = _batch(tiny)
    weight = tiny.hf.model.layers[1].self_attn.q_proj.weight
    frozen = prefix_hidden(tiny.hf, b["input_ids"], b["attention_mask"], start)
    weight.requires_grad_(True)
    try:
        _plain(tiny, b).pow(2).sum().backward()
        want, weight.grad = weight.grad.clone(), None
        last_token_hidden(tiny, b["input_ids"], b["attention_mask"], b["last_index"], start, frozen).pow(2).sum().backward()
        got = weight.grad.clone()
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_padding_columns_are_trimmed(tiny):
    """A batch padded wider than its longest row gives the same answer."""
    b = _batch(tiny, n=3)
    pad = torch.zeros(3, 4, dtype=b["input_ids"].dtype)
    with torch.no_grad():
        ref = last_token_hidden(tiny, b["input_ids"], b["attention_mask"], b["last_index"])
        wide = last_token_hidden(tiny, torch.cat([b["input_ids"], pad], 1),
                                 torch.cat([b["attention_mask"], pad], 1), b["last_index"])
    torch.testing.assert_close(wide, ref)


def test_soft_prompt_goes_right_after_bos(tiny):
    torch.manual_seed(0)
    soft = torch.randn(3, tiny.d_model)
    b = _batch(tiny, n=3)
    with torch.no_grad():
        got = last_token_hidden(tiny, b["input_ids"], b["attention_mask"], b["last_index"], soft=soft)
        emb = tiny.hf.get_input_embeddings()(b["input_ids"])
        scaled = soft * embed_scale(tiny)
        full = torch.cat([emb[:, :1], scaled.expand(3, -1, -1), emb[:, 1:]], 1)
        mask = torch.cat([torch.ones(3, 3, dtype=torch.long), b["attention_mask"]], 1)
        ref = tiny.hf.model(inputs_embeds=full, attention_mask=mask).last_hidden_state
        ref = ref[torch.arange(3), b["last_index"] + 3]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert embed_scale(tiny) == pytest.approx(tiny.d_model ** 0.5, rel=1e-3)  # Gemma scales embeddings


def test_bad_combinations_are_refused(tiny):
    b = _batch(tiny, n=2)
    with pytest.raises(ValueError, match="frozen"):
        last_token_hidden(tiny, b["input_ids"], b["attention_mask"], b["last_index"], start=1)
    frozen = prefix_hidden(tiny.hf, b["input_ids"], b["attention_mask"], 1)
    with pytest.raises(ValueError, match="soft prompt"):
        last_token_hidden(tiny, b["input_ids"], b["attention_mask"], b["last_index"], 1, frozen,
                          soft=torch.zeros(2, tiny.d_model))
