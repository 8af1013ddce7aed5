"""Quantization attack: symmetric per-output-row (optionally per group of input columns)
round-to-nearest int8 / int4, applied to the edited matrices or to every linear weight of the
decoder, then evaluated; and how much of an edit survives the rounding."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch

from mechunlearn_utils.attacks.relearning import decoder_linear_names
from mechunlearn_utils.attacks.scoring import AttackError, sports_p_true
from mechunlearn_utils.edit.storage import restore, snapshot


def quantize_codes(w: torch.Tensor, bits: int, group_size: int | None = None):
    """Symmetric round-to-nearest codes of a 2-D weight, one scale per output row (per group of
    `group_size` input columns when given). Returns (codes int, scales) with
    ``w ~= codes * scales`` (scales broadcast over each row / group)."""
    if w.dim() != 2:
        raise AttackError(f"quantization expects a 2-D weight matrix, got shape {tuple(w.shape)}")
    if bits not in (2, 3, 4, 8):
        raise AttackError(f"bits must be one of 2, 3, 4, 8; got {bits}")
    qmax = 2 ** (bits - 1) - 1
    x = w.detach().float()
    if group_size:
        if x.shape[1] % group_size:
            raise AttackError(f"group_size {group_size} does not divide the {x.shape[1]} input columns")
        x = x.reshape(x.shape[0], -1, group_size)
    scales = x.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.clamp(torch.round(x / safe), -qmax, qmax)
    codes = torch.where(scales > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scales


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-trip `w` through `bits`-bit symmetric per-row (per-group) quantization."""
    codes, scales = quantize_codes(w, bits, group_size)
    return (codes.float() * scales).reshape(w.shape).to(w.dtype)


def quant_param_names(model, scope, edited_names: list[str] | None = None) -> list[str]:
    """'edited': the localization's matrices; 'all': every linear weight of the decoder layers."""
    if scope == "edited":
        if not edited_names:
            raise AttackError("scope 'edited' needs the names of the edited matrices")
        return list(edited_names)
    if scope == "all":
        return [n + ".weight" for n in decoder_linear_names(model)]
    raise AttackError(f"quantization scope must be 'edited' or 'all', got {scope!r}")


@contextlib.contextmanager
def quantized(model, param_names: list[str], bits: int, group_size: int | None = None):
    """Quantize the named weights in place for the block; the exact weights come back after."""
    saved = snapshot(model, param_names)
    named = dict(model.hf.named_parameters())
    try:
        with torch.no_grad():
            for n in param_names:
                named[n].copy_(fake_quantize(named[n], bits, group_size))
        yield model
    finally:
        restore(model, saved)


QUANT_SETTINGS = {  # name -> (bits, group_size, scope)
    "int8": (8, None, "edited"), "int4": (4, None, "edited"),
    "int8_all": (8, None, "all"), "int4_all": (4, None, "all"),
}


def parse_quant(name: str) -> tuple[int, int | None, str]:
    """'int8', 'int4', 'int8_all', 'int4_g64', 'int4_g64_all' -> (bits, group_size, scope)."""
    if name in QUANT_SETTINGS:
        return QUANT_SETTINGS[name]
    parts = name.split("_")
    try:
        bits = int(parts[0].removeprefix("int"))
        group = next((int(p[1:]) for p in parts[1:] if p.startswith("g")), None)
    except ValueError:
        raise AttackError(f"cannot read quantization setting {name!r}; use e.g. int8, int4, int8_all, int4_g64") from None
    rest = [p for p in parts[1:] if not p.startswith("g")]
    if not parts[0].startswith("int") or rest not in ([], ["all"]):
        raise AttackError(f"cannot read quantization setting {name!r}; use e.g. int8, int4, int8_all, int4_g64")
    return bits, group, "all" if rest else "edited"


def quant_attack(model, athletes: pd.DataFrame, settings: list[str], edited_names: list[str] | None) -> dict:
    """{setting: forget p_true with the weights round-tripped through that quantization}."""
    out = {}
    for name in settings:
        bits, group, scope = parse_quant(name)
        with quantized(model, quant_param_names(model, scope, edited_names), bits, group):
            out[name] = sports_p_true(model, athletes)["p"]
    return out


def edit_survival(base: dict, edited_w: dict, bits: int, group_size: int | None = None) -> dict:
    """How much of an edit survives quantization: among weights the edit changed, the fraction
    whose quantized code equals the base model's (the edit is rounded away), and the mean
    |edit| in units of the quantization step."""
    changed = same = 0
    steps = []
    for n, w0 in base.items():
        w1 = edited_w[n].detach()
        c0, s0 = quantize_codes(w0, bits, group_size)
        c1, _ = quantize_codes(w1, bits, group_size)
        diff = (w1 != w0).reshape(c0.shape)
        changed += int(diff.sum())
        same += int(((c0 == c1) & diff).sum())
        delta = (w1.float() - w0.float()).abs().reshape(c0.shape)
        steps.append(float((delta / s0.clamp_min(1e-12))[diff].mean()) if diff.any() else 0.0)
    return {"erased_frac": same / changed if changed else 1.0, "edit_in_steps": float(np.mean(steps)),
            "n_changed": changed}
