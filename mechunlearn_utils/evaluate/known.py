"""Which facts does a model know? Filters scored once per set of weights and cached.

* `filter_known_athletes`   athletes whose sport the model ranks first with p >= a threshold
* `filter_known_facts`      CounterFact facts whose true object beats the new one with p >= a threshold
* `weights_fingerprint`     the digest of every parameter: the cache key (not the model's name, so an
                            edited model is never served the base model's scores)

Scores are cached under ``cache_root()/known_facts/<model name>/<weights fingerprint>/`` as parquet
(exact floats: a cache hit returns the numbers a fresh scoring would).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from mechunlearn_utils.core.models import TINY_MODEL
from mechunlearn_utils.core.paths import cache_root
from mechunlearn_utils.core.reproducibility import weight_digests
from mechunlearn_utils.data.datasets import DataError
from mechunlearn_utils.data.prompts import counterfact_prompts, sport_prompts
from mechunlearn_utils.evaluate.suite import score_prompts

UNCACHED_MODELS = {TINY_MODEL}  # rebuilt in a second; unit tests should not fill the cache


def weights_fingerprint(model) -> str:
    """SHA-256 over the name and digest of every parameter (buffers are fixed by the config).

    Hashes all the weights each call (about 0.6-0.9 s for gemma-3-270m on one CPU core): correct
    whatever changed them, with no invalidation to forget."""
    names = list(model.named_parameters())
    digests = weight_digests(model, names)
    return hashlib.sha256("".join(f"{n}:{digests[n]}\n" for n in names).encode()).hexdigest()[:16]


def cache_file(model, kind: str, df: pd.DataFrame, **params) -> Path:
    """Where the scores of `df` by these weights of `model` are cached."""
    digest = hashlib.sha256(pd.util.hash_pandas_object(df.astype(str), index=False).values.tobytes()
                            + json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "known_facts" / model.name / weights_fingerprint(model) / f"{kind}-{digest}.parquet"


def _cached_filter(model, kind: str, df: pd.DataFrame, score_fn, min_prob: float, use_cache: bool):
    """Score every row with `score_fn(model, df) -> DataFrame(p_norm, hit, p_correct)`; cache it."""
    if len(df) == 0:
        raise DataError(f"cannot filter an empty {kind} set")
    cacheable = model.name not in UNCACHED_MODELS
    cache = cache_file(model, kind, df) if cacheable else None  # scores do not depend on the threshold
    if use_cache and cache is not None and cache.exists():
        scores = pd.read_parquet(cache)
    else:
        scores = score_fn(model, df).reset_index(drop=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".partial")
            scores.to_parquet(tmp)
            tmp.replace(cache)
    known = scores.hit & (scores.p_correct >= min_prob)
    out = df.reset_index(drop=True).copy()
    out["p_correct"] = scores.p_correct.values
    out["p_norm"] = scores.p_norm.values
    kept = out[known.values].reset_index(drop=True)
    kept.attrs.update(threshold=min_prob, n_total=len(df), n_known=len(kept), cache=str(cache))
    return kept


def filter_known_athletes(model, athletes: pd.DataFrame, min_prob: float = 0.5,
                          use_cache: bool = True) -> pd.DataFrame:
    """Athletes whose sport the model ranks first (3-way) with p(sport token) >= `min_prob` on
    the paper's one-shot prompt (default 0.5: the paper keeps facts known with p >= about 0.5).
    Result attrs record the threshold and the counts."""
    def score(model, df):
        return score_prompts(model, sport_prompts(list(df.athlete), list(df.sport)))

    return _cached_filter(model, "athletes", athletes, score, min_prob, use_cache)


def filter_known_facts(model, facts: pd.DataFrame, min_prob: float = 0.1,
                       use_cache: bool = True) -> pd.DataFrame:
    """CounterFact facts whose true object beats the new one with p(true) >= `min_prob`.

    Facts whose answers are not single tokens for this model are dropped (and counted in
    ``attrs['n_multi_token']``)."""
    single = facts.apply(lambda r: all(_is_one_token(model, a) for a in
                                       [r.target_true, r.target_new, *r.neighborhood_answers]), axis=1)
    candidates = facts[single].reset_index(drop=True)

    def score(model, df):
        return score_prompts(model, counterfact_prompts(df, "prompt"))

    kept = _cached_filter(model, "counterfact", candidates, score, min_prob, use_cache)
    kept.attrs.update(n_total=len(facts), n_multi_token=int((~single).sum()))
    return kept


def _is_one_token(model, answer: str) -> bool:
    return len(model.tokenizer(answer, add_special_tokens=False).input_ids) == 1
