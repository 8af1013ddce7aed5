"""Exercises of the workbook: a reference solution and a check per exercise.

Each notebook has one or two exercises in which the student writes a short function (the stub
``...`` in the notebook). `check_<name>(fn, ...)` runs the student's function and the library's
tested implementation on the same model and inputs, raises an AssertionError that names what
differs, and prints "correct" otherwise. `solution_<name>` is the reference solution that the
notebooks use when their parameter ``SOLUTIONS`` is True (how papermill runs them in CI).

| notebook | exercise (student writes) | compared with |
|---|---|---|
| 00 | `p_norm`: p(answer) normalized over the candidates | `evaluate.suite.score_prompts` |
| 01 | `logit_lens`: p(answer) at every layer via `run_with_cache` | `interp.lens.logit_lens` |
| 01 | `patch_hook`: a denoising hook for one position | `interp.patching.activation_patching` |
| 02 | `attribution`: grad . (corrupt - clean) for one site | `localize.attribution_patching` |
| 02b | `edit_loss`: -log p(new) | `edit.loop.forget_loss(mode="edit")` |
| 03 | `unlearn_loss`: -log(1 - p(true)), ignoring p < e^-5 | `edit.loop.forget_loss(mode="unlearn")` |
| 04 | `probe_curve`: one probe per layer, held-out accuracy | `evaluate.probes.fit_probes` + `probe_accuracy` |
| 05 | `fake_quantize`: symmetric per-row round trip | `attacks.quantize.fake_quantize` |
| 06 | `masked_weight`, `binary_mask` | `edit.masking._Mask`, `top_changed` + `binary_masks` |
| 07 | `verdict`: reproduced / mixed / not reproduced | `evaluate.verdicts.claim_verdict` |
"""

from __future__ import annotations

import numpy as np
import torch

from mechunlearn_utils.core.logits import logit_diff, unembed

# --------------------------------------------------------------------------- comparing


def _as_array(x, what: str) -> np.ndarray:
    if x is None or x is Ellipsis:
        raise AssertionError(f"{what} returned {x!r}: fill in the stub (or set SOLUTIONS = True)")
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def compare(what: str, got, want, atol: float = 1e-4, model=None) -> None:
    """Raise an AssertionError naming the first difference between `got` and `want`.

    With a `model` held in bfloat16 the tolerance widens (3e-2 absolute, 5% relative): the student's
    code and the library's take different paths through the model, which agree to fp32 rounding
    but not to bf16's."""
    got, want = _as_array(got, what), _as_array(want, "the library")
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {want.shape}")
    rtol = 0.0
    if model is not None and model.dtype != torch.float32:
        atol, rtol = max(atol, 3e-2), 5e-2
    bad = ~np.isclose(got, want, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} values differ by more than {atol}; "
                             f"first at index {i}: got {got[i]:.6g}, expected {want[i]:.6g}")


def _correct(what: str) -> None:
    print(f"{what}: correct")


# --------------------------------------------------------------------------- 00: p_norm


def solution_p_norm(model, prompt: str, candidates: list[str], answer: str) -> float:
    ids = torch.tensor([model.encode(prompt)], device=model.device)
    with torch.no_grad():
        logits = model.hf(ids).logits[0, -1].float()
    cand_ids = [model.answer_token_id(c) for c in candidates]
    return float(torch.softmax(logits[cand_ids], -1)[candidates.index(answer)])


def check_p_norm(fn, model, prompts: list[str], candidates: list[str], answers: list[str]) -> None:
    """`fn(model, prompt, candidates, answer)` against `score_prompts`' p_norm, prompt by prompt."""
    from mechunlearn_utils.data.prompts import PromptSet
    from mechunlearn_utils.evaluate.suite import score_prompts

    pset = PromptSet(list(prompts), [list(candidates)] * len(prompts), [candidates.index(a) for a in answers])
    want = score_prompts(model, pset).p_norm.to_numpy()
    got = [fn(model, p, list(candidates), a) for p, a in zip(prompts, answers)]
    compare("p_norm per prompt", got, want, model=model)
    _correct("p_norm")


# --------------------------------------------------------------------------- 01: logit lens, patching hook


def solution_logit_lens(model, prompt: str, answer_id: int) -> np.ndarray:
    ids = torch.tensor([model.encode(prompt)], device=model.device)
    with torch.no_grad():
        _, cache = model.tl.run_with_cache(ids)
        resid = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1] for l in range(model.n_layers)])
        logits = unembed(model, model.hf.model.norm(resid)).float()  # final norm, then unembedding
    return torch.softmax(logits, -1)[:, answer_id].cpu().numpy()


def check_logit_lens(fn, model, prompt: str, answer_id: int) -> None:
    """`fn(model, prompt, answer_id)` -> p(answer) per layer, against `interp.lens.logit_lens`."""
    from mechunlearn_utils.interp.lens import logit_lens

    want = logit_lens(model, [prompt], answer_id, [answer_id], progress=False).p_correct.to_numpy()
    compare("p(answer) by layer", fn(model, prompt, answer_id), want, model=model)
    _correct("logit lens")


def solution_patch_hook(clean_value: torch.Tensor, position: int):
    def hook(activation, hook):
        activation = activation.clone()
        activation[:, position] = clean_value[:, position]
        return activation
    return hook


def patched_score(make_hook, model, clean_prompt: str, corrupt_prompt: str, answer_id: int, other_ids,
                  layer: int, position: int) -> float:
    """Denoising score of `make_hook(clean resid_pre, position)` at `layer`: 0 corrupt, 1 clean."""
    ids = [torch.tensor([model.encode(p)], device=model.device) for p in (clean_prompt, corrupt_prompt)]
    cand = torch.tensor([answer_id, *other_ids], device=model.device)
    name = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        clean_logits, cache = model.tl.run_with_cache(ids[0], names_filter=[name])
        corrupt_logits = model.tl(ids[1])
        patched = model.tl.run_with_hooks(ids[1], fwd_hooks=[(name, make_hook(cache[name], position))])
    clean_ld, corrupt_ld, ld = (float(logit_diff(x[0, -1, cand].float()))
                                for x in (clean_logits, corrupt_logits, patched))
    return (ld - corrupt_ld) / (clean_ld - corrupt_ld)


def check_patch_hook(make_hook, model, clean_prompt: str, corrupt_prompt: str, answer_id: int, other_ids,
                     position: int, layers=None) -> None:
    """A denoising hook `make_hook(clean_value, position)` -> hook(activation, hook), used on
    resid_pre at each of `layers`, against `interp.patching.activation_patching`."""
    from mechunlearn_utils.interp.patching import activation_patching

    layers = list(range(model.n_layers)) if layers is None else list(layers)
    lib = activation_patching(model, clean_prompt, corrupt_prompt, answer_id, list(other_ids),
                              components=["resid_pre"], positions=[position], progress=False)
    want = [lib["resid_pre"][l, position] for l in layers]
    got = [patched_score(make_hook, model, clean_prompt, corrupt_prompt, answer_id, other_ids, l, position)
           for l in layers]
    compare(f"restore at position {position}, layers {layers}", got, want, atol=5e-3, model=model)
    _correct("denoising hook")


# --------------------------------------------------------------------------- 02: attribution patching


def solution_attribution(grad: torch.Tensor, clean_act: torch.Tensor, corrupt_act: torch.Tensor) -> torch.Tensor:
    return (grad * (corrupt_act - clean_act)).sum(dim=(1, 2))  # over positions and features


def check_attribution(fn, model, facts, layer: int, seed: int = 0) -> None:
    """`fn(grad, clean_act, corrupt_act)` ([fact, pos, d] each) -> AP estimate per fact at the MLP
    output of `layer`, against `localize.attribution_patching` (before its normalization)."""
    from mechunlearn_utils.localize import Site, attribution_patching, run_sites
    from mechunlearn_utils.localize.common import _ld_metric, corrupt_subject_tokens

    kind = "mlp_out_prenorm"
    lib = attribution_patching(model, facts, batch_size=len(facts), seed=seed, kinds=(kind,))
    site, idx = Site(kind, layer), torch.arange(len(facts))
    corrupt_ids = corrupt_subject_tokens(model, facts, seed)
    clean = run_sites(model, facts.batch(idx), capture=[site], grad_metric=_ld_metric(facts, idx))
    with torch.no_grad():
        corrupt = run_sites(model, facts.batch(idx, corrupt_ids), capture=[site])
    got = fn(clean.grads[site].float(), clean.acts[site].float(), corrupt.acts[site].float())
    compare(f"AP estimate per fact, MLP {layer}", got, lib.per_item[kind][:, layer], atol=1e-3, model=model)
    _correct("attribution patching")


# --------------------------------------------------------------------------- 02b / 03: the forget losses


def solution_edit_loss(logp_new: torch.Tensor) -> torch.Tensor:
    return -logp_new.mean()


def solution_unlearn_loss(logp_true: torch.Tensor) -> torch.Tensor:
    from mechunlearn_utils.edit.loop import UNLEARN_FLOOR

    p = logp_true.exp()
    keep = p > UNLEARN_FLOOR  # the paper ignores answers already below e^-5
    if not keep.any():
        return logp_true.sum() * 0.0
    return -torch.log1p(-p[keep].clamp(max=1 - 1e-6)).mean()


LOSS_CASES = {"mixed": [0.9, 0.5, 0.1, 0.001], "all confident": [0.99, 0.95],
              "all below e^-5": [1e-4, 1e-5], "one certain": [1.0, 0.3]}


def _check_loss(fn, mode: str, what: str) -> None:
    from mechunlearn_utils.edit.loop import forget_loss

    for case, ps in LOSS_CASES.items():
        logp = torch.tensor(ps, dtype=torch.float32).log().requires_grad_(True)
        got = fn(logp)
        if not isinstance(got, torch.Tensor) or got.dim() != 0:
            raise AssertionError(f"{what} ({case}): return a scalar tensor, got {got!r}")
        compare(f"{what} ({case}, p = {ps})", got, forget_loss(logp.detach(), mode), atol=1e-4)
        if got.requires_grad:
            got.backward()  # a loss must be differentiable to train with
    _correct(what)


def check_edit_loss(fn) -> None:
    """`fn(logp_new)` (log p of the injected answer per example) against `forget_loss(mode="edit")`."""
    _check_loss(fn, "edit", "edit loss")


def check_unlearn_loss(fn) -> None:
    """`fn(logp_true)` against `forget_loss(mode="unlearn")`, including the e^-5 floor."""
    _check_loss(fn, "unlearn", "unlearn loss")


# --------------------------------------------------------------------------- 04: probes across layers


def solution_probe_curve(train_x, train_y, test_x, test_y, C: float = 0.1, seed: int = 0) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    acc = []
    for layer in range(train_x.shape[0]):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
        probe.fit(train_x[layer], train_y)
        acc.append((probe.predict(test_x[layer]) == np.asarray(test_y)).mean())
    return np.array(acc)


def probe_split(model, athletes, n: int = 48, seed: int = 0):
    """Final-token residuals [layer, athlete, d] of up to `n` athletes (balanced over sports), split
    in two halves stratified by sport: (train_x, train_y, test_x, test_y)."""
    from mechunlearn_utils.data.prompts import sport_prompt
    from mechunlearn_utils.evaluate.probes import residuals_at

    df = athletes.sample(frac=1.0, random_state=seed).groupby("sport").head(max(2, n // 3))
    df = df.reset_index(drop=True)
    train = (df.groupby("sport").cumcount() % 2 == 0).to_numpy()  # every other athlete of each sport
    prompts = [sport_prompt(a) for a in df.athlete]
    x, y = residuals_at(model, prompts, [len(model.encode(p)) - 1 for p in prompts]), df.sport.to_numpy()
    return x[:, train], y[train], x[:, ~train], y[~train]


def check_probe_curve(fn, model, athletes, n: int = 48, seed: int = 0) -> None:
    """`fn(train_x, train_y, test_x, test_y)` -> held-out accuracy per layer, against
    `evaluate.probes.fit_probes` + `probe_accuracy` (C = 0.1, random_state 0) on final-token
    residuals of `athletes` (`seed` draws them)."""
    from mechunlearn_utils.evaluate.probes import fit_probes, probe_accuracy

    train_x, train_y, test_x, test_y = probe_split(model, athletes, n, seed)
    want = probe_accuracy(fit_probes(train_x, train_y, C=0.1, seed=0), test_x, test_y)
    compare("held-out probe accuracy by layer", fn(train_x, train_y, test_x, test_y), want, atol=1e-6)
    _correct("probe curve")


# --------------------------------------------------------------------------- 05: quantization


def solution_fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / qmax  # one scale per output row
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / safe), -qmax, qmax) * scale


def check_fake_quantize(fn, weight: torch.Tensor, bits=(8, 4)) -> None:
    """`fn(w, bits)` (symmetric round-to-nearest, one scale per row) against
    `attacks.quantize.fake_quantize`, on `weight` with one row set to zero."""
    from mechunlearn_utils.attacks.quantize import fake_quantize

    w = weight.detach().float().clone()
    w[0] = 0.0  # an all-zero row must stay zero
    for b in bits:
        compare(f"{b}-bit round trip", fn(w.clone(), b), fake_quantize(w, b), atol=1e-6)
    _correct("fake quantization")


# --------------------------------------------------------------------------- 06: masks


def solution_masked_weight(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return mask.clamp(0.0, 1.0) * weight


def check_masked_weight(fn, weight: torch.Tensor, seed: int = 0) -> None:
    """`fn(mask, weight)` against the masking parametrization `edit.masking._Mask`, with mask
    values inside and outside [0, 1]."""
    from mechunlearn_utils.edit.masking import _Mask

    w = weight.detach().float()
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(w.shape, generator=g) * 1.6 - 0.3  # some below 0, some above 1
    compare("masked weight", fn(mask.clone(), w), _Mask(mask)(w), atol=1e-6)
    _correct("mask parametrization")


def solution_binary_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones_like(scores).flatten()
    mask[torch.topk(scores.flatten(), n).indices] = 0.0  # zero the n most-changed weights
    return mask.view_as(scores)


def check_binary_mask(fn, scores: torch.Tensor, ns=(1, 10, 100)) -> None:
    """`fn(scores, n)` -> a 0/1 mask zeroing the `n` highest scores, against `edit.masking`'s
    `top_changed` + `binary_masks` (scores are made distinct and positive first)."""
    from mechunlearn_utils.edit.masking import binary_masks, top_changed

    s = scores.detach().float().abs() + torch.linspace(1e-6, 2e-6, scores.numel()).view_as(scores)
    for n in ns:
        n = min(n, s.numel())
        want = binary_masks({"w": s}, top_changed({"w": s}, n), n)["w"]
        compare(f"binary mask for N = {n}", fn(s.clone(), n), want, atol=0)
    _correct("binary mask")


# --------------------------------------------------------------------------- 07: verdicts


def solution_verdict(values: dict, margin: float = 0.05, lower_is_better: bool = True) -> str:
    rivals = [values[r] for r in ("ap", "ct") if r in values]
    sign = 1 if lower_is_better else -1
    wins = [sign * (r - values["flu"]) >= margin for r in rivals]
    return "reproduced" if all(wins) else ("not reproduced" if not any(wins) else "mixed")


VERDICT_CASES = [({"flu": 0.01, "ap": 0.40, "ct": 0.30}, True), ({"flu": 0.01, "ap": 0.40, "ct": 0.03}, True),
                 ({"flu": 0.20, "ap": 0.10, "ct": 0.12}, True), ({"flu": 0.90, "ap": 0.80, "ct": 0.95}, False),
                 ({"flu": 0.90, "ap": 0.80, "ct": 0.84}, False), ({"flu": 0.10, "ap": 0.15}, True)]


def check_verdict(fn) -> None:
    """`fn(values, margin, lower_is_better)` against `evaluate.verdicts.claim_verdict`."""
    from mechunlearn_utils.evaluate.verdicts import claim_verdict

    for values, lower in VERDICT_CASES:
        want = claim_verdict(values, lower_is_better=lower, margin=0.05)[0]
        got = fn(dict(values), 0.05, lower)
        if got != want:
            raise AssertionError(f"verdict for {values} (lower is better: {lower}): got {got!r}, expected {want!r}")
    _correct("verdict")
