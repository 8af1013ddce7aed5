"""What "the same" means in this workbook, in one place.

* **Weights are compared bit for bit.** Every check that the base model came back after an edit,
  a mask, an attack or a widget compares the weights themselves: one SHA-256 digest per tensor
  (`weight_digests`), taken before and after (`assert_weights_restored`). A weight that moved by one
  ulp fails, and the error names it.
* **Evaluations are compared with a tolerance, `EVAL_ATOL`.** The same weights and inputs give the
  same numbers on one host in one setting, but not bit for bit across hosts of the same class, and
  not across changes of the memory layout of an input. Measured (`tests/test_reproducibility.py`):
  Intel MKL's fp32 GEMM, which torch's CPU build calls for every Linear, picks its kernel by the CPU
  model and by the alignment of its input; the same ``x @ W.T`` on a 64-byte-aligned copy of x and
  on a copy offset by 4 bytes differs by ~1e-6 (gemma-3-270m, one MLP matrix). Through 18 layers and
  a softmax that is up to ~5e-5 of a probability (issue 11: a restore check on another CI host
  failed by 4.5e-5 with the weights back in place). Hence: weights bitwise, evaluations within
  `EVAL_ATOL`, verdicts identical.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# Largest difference allowed between two evaluations of the same weights (probabilities, losses,
# accuracies): 20x the largest cross-host gap measured (4.5e-5, a normalized probability), and
# still 50x below any effect the workbook reads (edits move probabilities by > 0.05).
EVAL_ATOL = 1e-3


def text_seed(*parts) -> int:
    """A seed fixed by text alone (not by Python's per-process string hash): SHA-256 of the parts
    joined by "|", first 48 bits. Per-fact noise in tracing, the option order of an MCQ item."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


class WeightsChangedError(AssertionError):
    """The weights did not come back bit for bit; the message names the tensors that moved."""


class EvaluationDriftError(AssertionError):
    """Two evaluations of the same weights differ by more than `EVAL_ATOL`."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (any dtype, any layout)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weight_digests(model, names: list[str] | None = None) -> dict[str, str]:
    """{name: digest} of the model's parameters and buffers (all of them, or `names`).

    `model` is a workbook model (names as `model.named_parameters()`, stable whether or not the
    TransformerLens bridge was built) or any `torch.nn.Module`. About 1.5 s per GB of weights."""
    if isinstance(model, torch.nn.Module):
        tensors = dict(model.named_parameters())
        tensors.update({k: v for k, v in model.named_buffers() if k not in tensors})
    else:
        from mechunlearn_utils.core.models import canonical_name

        tensors = dict(model.named_parameters())
        for k, v in model.hf.named_buffers():
            tensors.setdefault(canonical_name(k), v)
    if names is not None:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"no weight named {missing[:3]} in the model")
        tensors = {n: tensors[n] for n in names}
    return {n: tensor_digest(t) for n, t in tensors.items()}


def changed_weights(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Names whose digest differs, or that exist on one side only."""
    return sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))


def assert_weights_restored(model, before: dict[str, str], what: str = "the experiment") -> None:
    """Raise `WeightsChangedError` unless every weight digested in `before` is bit-identical now."""
    moved = changed_weights(before, weight_digests(model, list(before)))
    if moved:
        raise WeightsChangedError(f"{what} left {len(moved)} weight tensor(s) changed, e.g. {moved[:3]}: "
                                  "the base model was not restored")


def eval_gap(a: dict, b: dict) -> float:
    """Largest |a[k] - b[k]| over the numeric keys both share (NaN where both are NaN counts as 0)."""
    keys = [k for k in a if k in b and isinstance(a[k], (int, float, np.floating)) and not isinstance(a[k], bool)]
    if not keys:
        raise ValueError("the two evaluations share no numeric measure")
    gaps = [0.0 if (np.isnan(a[k]) and np.isnan(b[k])) else abs(float(a[k]) - float(b[k])) for k in keys]
    return float(max(gaps))


def assert_evals_close(a: dict, b: dict, what: str = "two evaluations", atol: float = EVAL_ATOL) -> float:
    """The largest gap between two evaluations of the same weights; raises beyond `atol`."""
    gap = eval_gap(a, b)
    if not gap <= atol:
        raise EvaluationDriftError(f"{what} differ by {gap:.3g} > EVAL_ATOL {atol:g}: more than float "
                                   "rounding between kernels; the weights or the inputs changed")
    return gap


def restore_check(model, digests_before: dict[str, str], eval_before: dict, eval_after: dict,
                  what: str = "the experiment") -> dict:
    """The workbook's restore check: weights bit-identical (raises `WeightsChangedError` otherwise)
    and the re-evaluation within `EVAL_ATOL` of the first (raises `EvaluationDriftError`).
    Returns ``{"weights_restored": True, "restore_gap": <largest evaluation gap>}`` for metrics.json."""
    assert_weights_restored(model, digests_before, what)
    gap = assert_evals_close(eval_before, eval_after, f"evaluations before and after {what}")
    return {"weights_restored": True, "restore_gap": gap}
