"""How close the workbook's steps come to the machine's matmul limit, in fp32 and in bf16-mixed.

    .venv/bin/python scripts/bench_roofline.py                # gemma-3-270m, both dtypes (~3 min, 2 idle cores)
    .venv/bin/python scripts/bench_roofline.py --profile      # + torch.profiler's top-15 ops of each step
    .venv/bin/python scripts/bench_roofline.py --quick        # the tiny random model (< 30 s; the unit test)
    .venv/bin/python scripts/bench_roofline.py --shapes         # + each product shape of a step, per dtype
    .venv/bin/python scripts/bench_roofline.py --dtypes float32 --out roofline.json

In one run: the matmul peak of each dtype (best of `--repeats` of [1024x640]@[640x2048] and
[256x640]@[640x2048]), then for each configuration and dtype the seconds per step and the achieved
matmul FLOP/s as a fraction of that dtype's peak. Configurations: a full fine-tune step (every
decoder weight and norm), a localized MLP edit step (MLPs 2-3 and 12-13, frozen prefix), an
evaluation (200-athlete recall) and a relearning step (LoRA rank 64 on every decoder linear).
"bfloat16" is the model held in bf16 with fp32 master weights for what trains
(`core.precision.fp32_masters`).

FLOPs are counted, not estimated: every ``nn.Linear`` call (the 262k x 640 unembedding included)
adds 2*m*k*n for its forward, the same again when the gradient of its input is computed (the
layers a gradient flows through) and again for its weight's gradient (trained weights). Attention's
score and value products (short prompts) are left out. A training step's figures are the
difference of a (1 + steps)-step run and a 1-step run, so the set-up (frozen prefix, tokenizing, the
relearning attack's step-0 evaluation) cancels. A benchmark, not a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from _bench import machine, report

PEAK_SHAPES = ((1024, 640, 2048), (256, 640, 2048))
DTYPES = ("float32", "bfloat16")
# The products a gemma-3-270m step is made of (`--shapes`): name -> (m, k, n, how the operands lie).
# "linear" = F.linear(x [m, k], W [n, k]) (every forward and input gradient), "wgrad" = g.T @ x with
# g [k, m] (a weight's gradient).
PRODUCT_SHAPES = {
    "MLP gate/up forward, 1600 tokens": (1600, 640, 2048, "linear"),
    "MLP down forward, 1600 tokens": (1600, 2048, 640, "linear"),
    "attention q forward, 1600 tokens": (1600, 640, 1024, "linear"),
    "attention k/v forward, 1600 tokens": (1600, 640, 256, "linear"),
    "MLP gate weight gradient, 1600 tokens": (2048, 1600, 640, "wgrad"),
    "MLP gate/up forward, 13 tokens (few-shot prefix)": (13, 640, 2048, "linear"),
    "unembedding, 200 rows (262k vocab)": (200, 640, 262144, "linear"),
}


def matmul_peak(dtype: torch.dtype, repeats: int) -> dict:
    """Best-of-`repeats` GFLOP/s of each of PEAK_SHAPES in `dtype`; 'peak' the best of them."""
    out = {}
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        out[f"{m}x{k}@{k}x{n}"] = _best_gflops(lambda: a @ b, 2 * m * k * n, repeats)
    out["peak"] = max(out.values())
    return out


def _best_gflops(fn, flop: int, repeats: int) -> float:
    """GFLOP/s of `fn` (doing `flop` FLOPs) from the best of `repeats` timed calls, after a warm-up."""
    fn()
    return flop / min(_seconds(fn) for _ in range(max(1, repeats))) / 1e9


def product_speeds(dtypes, repeats: int) -> dict:
    """GFLOP/s of each of PRODUCT_SHAPES in each dtype (best of `repeats`, one warm-up)."""
    F = torch.nn.functional
    out = {}
    for name, (m, k, n, how) in PRODUCT_SHAPES.items():
        for dt in dtypes:
            dtype = getattr(torch, dt)
            if how == "linear":
                x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
                fn = lambda: F.linear(x, w)  # noqa: E731
            else:  # "wgrad"
                g, x = torch.randn(k, m).to(dtype), torch.randn(k, n).to(dtype)
                fn = lambda: g.T @ x  # noqa: E731
            out.setdefault(name, {})[dt] = _best_gflops(fn, 2 * m * k * n, repeats if n < 100_000 else repeats // 3)
    return out


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def counted_flops(model):
    """Counts the matmul FLOPs of every nn.Linear call in the block (forward + the backward it implies)."""
    total = [0]

    def hook(module, args, out):
        x = args[0]
        fwd = 2 * x.numel() * module.out_features
        total[0] += fwd * (1 + (x.requires_grad and torch.is_grad_enabled())
                           + (module.weight.requires_grad and torch.is_grad_enabled()))

    handles = [m.register_forward_hook(hook) for m in model.hf.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def measure(model, run, steps: int) -> dict:
    """Seconds and GFLOP per step of `run(k)` (k steps): the difference of k = 1 + steps and k = 1
    (an evaluation, `steps` None: one call, no difference)."""
    rows = []
    for k in ((None,) if steps is None else (1, 1 + steps)):
        with counted_flops(model) as flops:
            seconds = _seconds(lambda: run(k))
        rows.append((seconds, flops[0]))
    if steps is None:
        seconds, flops = rows[0]
    else:
        seconds, flops = ((b - a) / steps for a, b in zip(*rows))
    return dict(s_per_step=seconds, gflop_per_step=flops / 1e9, gflops=flops / 1e9 / max(seconds, 1e-9))


def configurations(model, quick: bool) -> dict:
    """{name: (run(k), steps)}: the four steps measured, on `model` (restored after each)."""
    from mechunlearn_utils import localize as lz
    from mechunlearn_utils.attacks.relearning import RelearnConfig, relearn
    from mechunlearn_utils.data.datasets import load_athletes, load_general_text
    from mechunlearn_utils.data.tasks import athletes_to_sport
    from mechunlearn_utils.edit.storage import restore, snapshot
    from mechunlearn_utils.edit.train import EditConfig, train_edit
    from mechunlearn_utils.evaluate.suite import sports_recall

    athletes = load_athletes()
    task = athletes_to_sport(athletes, n=16, seed=0)
    text = load_general_text()[:64] if not quick else [" ".join(athletes.athlete)[i:i + 600] for i in range(0, 6000, 600)]
    L = model.n_layers
    mlps = [m.name for m in lz.weight_matrices(model)
            if m.block == "mlp" and m.layer in ({2, 3, 12, 13} if L > 13 else {L - 1})]
    cfg = dict(lm_context=16 if quick else 64)

    def edit(params, prefix):
        def run(k):
            base = snapshot(model, params)
            train_edit(model, params, task, text, EditConfig(steps=k, frozen_prefix=prefix, seed=0, **cfg), progress=False)
            restore(model, base)
        return run

    def relearn_lora(k):
        half = task.eval_forget
        relearn(model, half.head(len(half) // 2), half.tail(2), task.train_maintain, text,
                RelearnConfig(steps=k, eval_steps=(0,), lm_context=cfg["lm_context"] // 2), progress=False)

    return {
        "full fine-tune step": (edit(lz.nonlocalized(model, include_norms=True).params, False), 1),
        "MLP edit step (2-3, 12-13)": (edit(mlps, True), 1 if quick else 2),
        "evaluation (200-athlete recall)": (lambda k: sports_recall(model, athletes.head(200)), None),
        "relearning LoRA step": (relearn_lora, 1 if quick else 2),
    }


def profile_one(model, run, steps) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(None if steps is None else 1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def markdown(res: dict) -> str:
    lines = ["| configuration | dtype | s / step | GFLOP / step | GFLOP/s | % of the dtype's matmul peak |",
             "|---|---|---:|---:|---:|---:|"]
    for name, by_dtype in res["configurations"].items():
        for dt, r in by_dtype.items():
            lines.append(f"| {name} | {dt} | {r['s_per_step']:.3f} | {r['gflop_per_step']:.1f} | "
                         f"{r['gflops']:.0f} | {100 * r['fraction_of_peak']:.0f}% |")
    peaks = ", ".join(f"{dt} {p['peak']:.0f} GFLOP/s" for dt, p in res["peak"].items())
    text = "\n".join(lines) + f"\n\nmatmul peak: {peaks}"
    if res.get("products"):
        dts = list(next(iter(res["products"].values())))
        rows = ["| product | " + " | ".join(f"{dt} GFLOP/s" for dt in dts) + " |", "|---|" + "---:|" * len(dts)]
        rows += [f"| {name} | " + " | ".join(f"{by[dt]:.0f}" for dt in dts) + " |" for name, by in res["products"].items()]
        text += "\n\n" + "\n".join(rows)
    return text


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--quick", action="store_true", help="the tiny random model, one step each (< 30 s)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--repeats", type=int, default=10, help="matmul-peak repetitions (best of)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top-15 ops of each step")
    ap.add_argument("--shapes", action="store_true",
                    help="also time each product shape a step is made of (PRODUCT_SHAPES) in each dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default="", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    from mechunlearn_utils import load_model
    from mechunlearn_utils.workbook.notebook import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    name = "tiny-random" if args.quick else args.model
    res: dict = dict(model=name, **machine(), peak={}, configurations={})
    for dt in args.dtypes:
        res["peak"][dt] = matmul_peak(getattr(torch, dt), 3 if args.quick else args.repeats)
    if args.shapes:
        res["products"] = product_speeds(args.dtypes, args.repeats)
    for dt in args.dtypes:
        seed_everything(0)
        model = load_model(name, "cpu", dtype=dt)
        for cname, (run, steps) in configurations(model, args.quick).items():
            run(1)  # warm-up: allocator, kernels, peft import
            r = measure(model, run, steps)
            r["fraction_of_peak"] = r["gflops"] / res["peak"][dt]["peak"]
            res["configurations"].setdefault(cname, {})[dt] = r
            print(f"{cname} [{dt}]: {r['s_per_step']:.3f} s, {r['gflops']:.0f} GFLOP/s", flush=True)
            if args.profile:
                print(f"\n### {cname} [{dt}]: one step under torch.profiler\n\n{profile_one(model, run, steps)}\n")
        del model
    report(res, args.out)
    print("\n" + markdown(res) + "\n")
    return res


if __name__ == "__main__":
    main()
