"""Linear probes on the residual stream, layer by layer (sklearn logistic regression).

* `residuals_at(model, prompts, positions)`   residual stream at one token per prompt (or at several
                                             named ones), every layer
* `cv_probe_accuracy(features, labels)`       cross-validated accuracy of a probe per layer
* `fit_probes` / `probe_accuracy`            train probes on one set, score them on another
                                             (notebook 04: trained on maintain, applied to forget)

"Layer l" is the residual stream *after* block l (l = 0 .. n_layers-1), i.e. what block l's
attention and MLP have written (the embeddings themselves are not probed).
Residuals are read with the site machinery of `localize` (plain PyTorch hooks by default, so
probing never builds the TransformerLens bridge; ``backend="tl"`` or ``"nnsight"`` give the same
numbers), so any model `localize` supports can be probed.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from tqdm.auto import tqdm


@torch.no_grad()
def residuals_at(model, prompts: list[str], positions, batch_size: int = 32,
                 backend: str = "hf", counter=None, progress: bool = False):
    """Residual stream after every block at one position per prompt: array [layer, prompt, d_model].

    `positions[i]` indexes `model.encode(prompts[i])` (BOS included), e.g. the last subject token.
    With a dict ``{name: positions}`` every named position is read from the same forward pass and
    the result is ``{name: array [layer, prompt, d_model]}`` (the one residual reader of the
    workbook; notebook 04 reads the final and the last subject token this way).
    """
    from mechunlearn_utils.localize import Site, run_sites

    named = positions if isinstance(positions, dict) else {None: positions}
    if len(prompts) == 0:
        raise ValueError("no prompts to probe: the set is empty")
    if not named:
        raise ValueError("name at least one position to read")
    for name, pos in named.items():
        if len(pos) != len(prompts):
            raise ValueError(f"position {name!r}: {len(pos)} positions for {len(prompts)} prompts "
                             "(one position per prompt is needed)")
    n_layers = model.n_layers
    sites = [Site("resid_pre", l) for l in range(1, n_layers)] + [Site("resid_final")]
    out = {name: np.zeros((n_layers, len(prompts), model.d_model), dtype=np.float32) for name in named}
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="residuals", disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        batch = model.tokenize([prompts[i] for i in idx])
        pos = {name: torch.tensor([p[i] for i in idx], device=batch["input_ids"].device) for name, p in named.items()}
        for name, p in pos.items():
            if (p > batch["last_index"]).any() or (p < 0).any():
                raise ValueError(f"a {'probe' if name is None else repr(name)} position lies outside its prompt")
        run = run_sites(model, batch, capture=sites, backend=backend, counter=counter)
        rows = torch.arange(len(idx))
        for name, p in pos.items():
            for layer, site in enumerate(sites):
                out[name][layer, start:start + len(idx)] = run.acts[site][rows, p].float().cpu().numpy()
    return out if isinstance(positions, dict) else out[None]


def _make_probe(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))


def usable_labels(labels, min_per_class: int) -> np.ndarray:
    """Mask of examples whose class has at least `min_per_class` examples."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    keep = set(values[counts >= min_per_class])
    return np.array([y in keep for y in labels])


def cv_probe_accuracy(features: np.ndarray, labels, folds: int = 5, C: float = 0.1,
                      seed: int = 0) -> np.ndarray:
    """Cross-validated accuracy of a logistic-regression probe at every layer.

    `features` is [layer, example, d] (from `residuals_at`). Classes with fewer examples than
    `folds` are dropped (there is nothing to cross-validate them with); at least two classes must
    remain. Returns an array [layer] of mean held-out accuracy.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    labels = np.asarray(labels)
    if features.ndim != 3 or features.shape[1] != len(labels):
        raise ValueError(f"features must be [layer, example, d] with {len(labels)} examples, "
                         f"got shape {features.shape}")
    keep = usable_labels(labels, folds)
    if len(np.unique(labels[keep])) < 2:
        counts = dict(zip(*np.unique(labels, return_counts=True)))
        raise ValueError(f"a probe needs two classes with at least {folds} examples each; "
                         f"label counts are {counts}")
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    acc = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
        for layer in range(features.shape[0]):
            scores = cross_val_score(_make_probe(C, seed), features[layer][keep], labels[keep], cv=cv)
            acc.append(float(scores.mean()))
    return np.array(acc)


def fit_probes(features: np.ndarray, labels, C: float = 0.1, seed: int = 0) -> list:
    """One fitted probe per layer (sklearn pipelines) trained on all examples."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("a probe needs at least two classes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [_make_probe(C, seed).fit(features[layer], labels) for layer in range(features.shape[0])]


def probe_accuracy(probes: list, features: np.ndarray, labels) -> np.ndarray:
    """Accuracy of each layer's probe on new examples (`features` [layer, example, d])."""
    labels = np.asarray(labels)
    if len(probes) != features.shape[0]:
        raise ValueError(f"{len(probes)} probes for {features.shape[0]} layers of features")
    return np.array([float((p.predict(features[i]) == labels).mean()) for i, p in enumerate(probes)])


def plot_probe_curves(curves: dict, chance: float | None = None, title: str = "", ax=None):
    """Probe accuracy by layer, one line per setting ({'full prompt': acc[layer], ...})."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    for name, acc in curves.items():
        ax.plot(range(len(acc)), acc, marker="o", ms=3, label=name)
    if chance is not None:
        ax.axhline(chance, ls=":", c="gray", label="chance")
    ax.set(xlabel="layer (residual after block)", ylabel="cross-validated accuracy", ylim=(0, 1.02),
           title=title)
    ax.legend()
    return ax.figure
