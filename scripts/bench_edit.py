"""Cost of one localized-editing step (notebook 03) against a plain full fine-tune step.

    .venv/bin/python scripts/bench_edit.py                    # gemma-3-270m, 8 timed steps each
    .venv/bin/python scripts/bench_edit.py --steps 4 --out bench_edit.json
    .venv/bin/python scripts/bench_edit.py --dtype bfloat16         # bf16 model, fp32 master weights

Same task (athletes_to_sport, 16 known athletes), same batches, same loss, for:
  * full fine-tune: every decoder weight (`nonlocalized`), no frozen prefix;
  * late layers (AP-like: attention + MLP of the last two layers), without and with the frozen
    prefix (the layers below the lowest trainable one run once, before the first step);
  * mid MLPs (FLU-like: MLPs of layers 2, 3, 5, 7, 9), without and with the frozen prefix.
Selecting parameters costs nothing per step (untrained weights just get no gradient), so the
"overhead of localization" is the difference to the full fine-tune. Reports wall seconds per
step (the training loop only; the prefix is computed once, outside it, and reported separately).
A benchmark, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _bench import machine, report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                    help="bfloat16: the model in bf16, trained weights as fp32 masters (scripts/bench_roofline.py"
                         " compares both against the matmul peak)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default="", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    from mechunlearn_utils import load_model
    from mechunlearn_utils import localize as lz
    from mechunlearn_utils.data.datasets import load_athletes, load_general_text
    from mechunlearn_utils.evaluate.known import filter_known_athletes
    from mechunlearn_utils.edit.storage import restore, snapshot
    from mechunlearn_utils.edit.train import EditConfig, train_edit
    from mechunlearn_utils.data.tasks import athletes_to_sport

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu", dtype=args.dtype)
    task = athletes_to_sport(filter_known_athletes(model, load_athletes()), n=16, seed=0)
    text = load_general_text()[:64]
    L = model.n_layers
    mats = lz.weight_matrices(model)

    def layer_params(layers, block=None):
        return [m.name for m in mats if m.layer in layers and (block is None or m.block == block)]

    configs = {
        "full_finetune": (lz.nonlocalized(model, include_norms=True).params, False),
        "late_layers": (layer_params({L - 2, L - 1}), False),
        "late_layers+frozen_prefix": (layer_params({L - 2, L - 1}), True),
        "mid_mlps": (layer_params({2, 3, 5, 7, 9}, "mlp"), False),
        "mid_mlps+frozen_prefix": (layer_params({2, 3, 5, 7, 9}, "mlp"), True),
    }
    res: dict = dict(model=args.model, dtype=str(model.dtype).removeprefix("torch."), steps=args.steps, **machine())
    for name, (params, prefix) in configs.items():
        base = snapshot(model, params)
        cfg = EditConfig(steps=1, frozen_prefix=prefix, seed=0)
        train_edit(model, params, task, text, cfg, progress=False)  # warm-up (allocator, kernels)
        restore(model, base)
        t0 = time.perf_counter()
        out = train_edit(model, params, task, text, EditConfig(steps=args.steps, frozen_prefix=prefix, seed=0),
                         progress=False)
        total = time.perf_counter() - t0
        restore(model, base)
        res[name] = dict(n_params=out.n_params, start_layer=out.start_layer, s_per_step=out.seconds_per_step,
                         setup_s=total - out.seconds, final_loss=out.history[-1]["loss"])
        print(name, json.dumps(res[name]), flush=True)
    full = res["full_finetune"]["s_per_step"]
    res["speedup_vs_full"] = {k: full / v["s_per_step"] for k, v in res.items()
                              if isinstance(v, dict) and "s_per_step" in v}
    return report(res, args.out)


if __name__ == "__main__":
    main()
