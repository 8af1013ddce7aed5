"""Shared by the benchmark scripts: the machine's state and writing the numbers."""

from __future__ import annotations

import json
import os

import torch


def machine() -> dict:
    from mechunlearn_utils.core.precision import host_description

    return dict(threads=torch.get_num_threads(), cpu=host_description(),
                load_average_at_start=list(os.getloadavg()))


def report(res: dict, out: str = "") -> dict:
    """Print `res` as JSON (and write it to `out`), with the load average at the end."""
    res["load_average_at_end"] = list(os.getloadavg())
    print(json.dumps(res, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    return res
