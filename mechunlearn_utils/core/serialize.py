"""One conversion to plain JSON values, for every file the workbook writes (metrics.json,
localization files): numpy and torch values become Python numbers and lists, objects with an
``as_dict()`` (a `core.sites.PassCounter`) their dict, tuples lists, mapping keys strings."""

from __future__ import annotations

import math

import numpy as np
import torch

PLAIN_SCALARS = (str, int, float, bool, type(None))


def to_plain(value, *, finite: bool = False, dicts: bool = True):
    """`value` as JSON-ready str / int / float / bool / None / list / dict, recursively.

    `finite`: a NaN or infinite float raises ValueError (metrics must be numbers); `dicts=False`:
    a mapping raises TypeError (metrics.json is flat). Anything else unknown raises TypeError."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    elif hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        if not dicts:
            raise TypeError("metrics must be flat: a value holds a dict (flatten it: 'key.sub')")
        return {str(k): to_plain(v, finite=finite, dicts=dicts) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, finite=finite, dicts=dicts) for v in value]
    if finite and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric value {value} is not finite")
    if not isinstance(value, PLAIN_SCALARS):
        raise TypeError(f"cannot store {type(value).__name__} as JSON: numbers, strings, bools, lists "
                        "and dicts only")
    return value
