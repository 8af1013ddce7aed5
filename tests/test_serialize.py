"""The one JSON conversion (`core.serialize.to_plain`) and the one text seed (`core.reproducibility.text_seed`)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from mechunlearn_utils.core.reproducibility import text_seed
from mechunlearn_utils.core.serialize import to_plain
from mechunlearn_utils.core.sites import PassCounter


def test_to_plain_turns_numpy_torch_and_counters_into_json_values():
    counter = PassCounter()
    value = {"a": np.float32(0.5), 3: (np.arange(3), torch.tensor([[1.0, 2.0]])), "c": counter,
             "d": [np.int64(7), None, True, "x"]}
    out = to_plain(value)
    assert out == {"a": 0.5, "3": [[0, 1, 2], [[1.0, 2.0]]], "c": counter.as_dict(), "d": [7, None, True, "x"]}
    assert type(out["a"]) is float and type(out["d"][0]) is int
    assert json.loads(json.dumps(out)) == out  # round-trips unchanged
    assert math.isnan(to_plain(float("nan")))  # localization scores may hold NaN


def test_to_plain_rejects_what_a_metrics_file_cannot_hold():
    with pytest.raises(ValueError, match="not finite"):
        to_plain([1.0, np.float64("inf")], finite=True)
    with pytest.raises(TypeError, match="flat"):
        to_plain([{"a": 1}], dicts=False)
    with pytest.raises(TypeError, match="object"):
        to_plain(object())


def test_text_seed_is_fixed_by_the_text():
    assert text_seed(3, "Michael Jordan") == int(hashlib.sha256(b"3|Michael Jordan").hexdigest()[:12], 16)
    assert text_seed("key", 1) == text_seed("key|1") != text_seed("key", 2)
