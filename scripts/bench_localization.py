"""Cost of the localization methods on the same facts: CT vs AP vs probing (vs FLU path patching).

    .venv/bin/python scripts/bench_localization.py                       # gemma-3-270m, 8 athletes
    .venv/bin/python scripts/bench_localization.py --facts 16 --backend nnsight --out bench.json

Reports wall seconds, CPU seconds (less sensitive to other processes on a shared machine) and the
number of forward / backward passes (calls = batches, sequences = rows) of each method, and the
ratio CT / AP. CT needs a row per (fact, noise sample, component); AP needs 2 forward + 1 backward
passes per batch whatever the number of components. A benchmark, not a timed test.
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench import machine, report


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--facts", type=int, default=8, help="athletes (balanced over sports)")
    ap.add_argument("--noise-samples", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backend", default="tl", choices=["tl", "nnsight"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--skip-flu", action="store_true", help="skip FLU path patching")
    ap.add_argument("--out", default="", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    from mechunlearn_utils import load_model
    from mechunlearn_utils import localize as lz
    from mechunlearn_utils.data.datasets import load_athletes
    from mechunlearn_utils.evaluate.known import filter_known_athletes
    from mechunlearn_utils.evaluate.probes import cv_probe_accuracy, residuals_at

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    known = filter_known_athletes(model, load_athletes())
    facts = lz.sports_facts(model, known, n=args.facts, seed=0)
    if args.backend == "tl":
        model.tl  # build the bridge outside the timings
    else:
        model.nn
    lz.run_sites(model, facts.batch(torch.arange(2)), backend=args.backend)  # warm-up
    res: dict = dict(model=args.model, n_facts=len(facts), tokens=int(facts.input_ids.shape[1]),
                     backend=args.backend, **machine())

    ct, w, c = timed(lambda: lz.causal_tracing(model, facts, n_samples=args.noise_samples,
                                               batch_size=args.batch_size, backend=args.backend))
    res["ct"] = dict(wall_s=w, cpu_s=c, **ct.passes.as_dict(), noise_samples=args.noise_samples)
    apr, w, c = timed(lambda: lz.attribution_patching(model, facts, batch_size=args.batch_size,
                                                      backend=args.backend))
    res["ap"] = dict(wall_s=w, cpu_s=c, **apr.passes.as_dict())
    res["components_scored"] = dict(ct=sum(v.size for v in ct.scores.values()),
                                    ap=sum(v.size for v in apr.scores.values()))

    def probing():
        counter = lz.PassCounter()
        pos = [p[-1] for p in facts.subject_pos]
        feats = residuals_at(model, facts.prompts, pos, args.batch_size, args.backend, counter)
        folds = max(2, min(5, min(facts.labels.count(s) for s in set(facts.labels))))
        return cv_probe_accuracy(feats, facts.labels, folds=folds), counter
    (acc, counter), w, c = timed(probing)
    res["probing"] = dict(wall_s=w, cpu_s=c, **counter.as_dict(), best_accuracy=float(acc.max()))
    if not args.skip_flu:
        flu, w, c = timed(lambda: lz.flu_search(model, facts, batch_size=64, backend=args.backend,
                                                threshold=-1e9))
        res["flu_path_patching"] = dict(wall_s=w, cpu_s=c, **flu.passes.as_dict(),
                                        extraction_layer=flu.extraction_layer)
    res["ratio_ct_over_ap"] = dict(
        wall=res["ct"]["wall_s"] / res["ap"]["wall_s"], cpu=res["ct"]["cpu_s"] / res["ap"]["cpu_s"],
        forward_sequences=res["ct"]["forward_sequences"] / res["ap"]["forward_sequences"])
    return report(res, args.out)


if __name__ == "__main__":
    main()
