"""DTYPE: resolving "auto" / "float32" / "bfloat16", recording it, and fp32 master weights in bf16."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mechunlearn_utils.core import precision as P


def test_explicit_dtypes_and_errors(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "bfloat16")  # an explicit dtype wins over the environment
    assert P.resolve_dtype("float32")[0] is torch.float32
    assert P.resolve_dtype(torch.bfloat16)[0] is torch.bfloat16
    assert P.resolve_dtype("bf16")[0] is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        P.resolve_dtype("float8")
    with pytest.raises(ValueError, match="not supported"):
        P.resolve_dtype(torch.float16)


def test_bf16_asked_for_on_a_cpu_without_it_warns(monkeypatch):
    """bf16 on a CPU that only emulates it (AVX2) is ~150x slower than fp32: loading so says why."""
    monkeypatch.setattr(P, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert P.resolve_dtype("bfloat16") == (torch.bfloat16, "as asked; emulated on this CPU, slow")
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_dtype("bfloat16") == (torch.bfloat16, "as asked")


def test_auto_follows_the_environment_then_the_hardware_and_the_measurement(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "float32")
    assert P.resolve_dtype("auto") == (torch.float32, f"from ${P.ENV_VAR}")
    monkeypatch.delenv(P.ENV_VAR)
    monkeypatch.setattr(P, "native_bf16", lambda device: False)
    assert P.resolve_dtype("auto")[0] is torch.float32
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    monkeypatch.setattr(P, "_SPEEDUP", {"cpu": 0.8})
    assert P.resolve_dtype("auto")[0] is torch.float32
    monkeypatch.setattr(P, "_SPEEDUP", {"cpu": 2.0})
    assert P.resolve_dtype("auto") == (torch.bfloat16, "auto: native bf16, measured 2.00x faster")


def test_the_tests_run_in_fp32_and_metrics_record_the_dtype(tiny, tmp_path):
    from mechunlearn_utils.workbook.results import write_metrics

    assert tiny.dtype is torch.float32 and P.loaded_dtype() == "float32"
    path = write_metrics(tmp_path, "00_x", {"a": 1.0})
    assert json.loads(path.read_text())["dtype"] == "float32"


@pytest.fixture(scope="module")
def tiny_bf16():
    from mechunlearn_utils import load_model

    return load_model("tiny-random", "cpu", dtype="bfloat16")


def _one_step(model, name, with_masters: bool):
    """One Adam step at lr 1e-5 on weight `name` (set to 1.0); returns (during, after) copies."""
    from mechunlearn_utils.edit.loop import train_loop

    p = model.named_parameters()[name]
    with torch.no_grad():
        p.fill_(1.0)
    p.requires_grad_(True)
    seen = {}
    ids = model.tokenize(["Fact : Michael Jordan plays the sport of"])

    def loss_fn(step):
        out = model.hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        return out.float().logsumexp(-1).mean(), {}

    opt = torch.optim.Adam([p], lr=1e-5)
    train_loop([p], loss_fn, opt, 1, after_step=lambda: seen.update(during=p.detach().clone()),
               progress=False, model=model if with_masters else None)
    p.requires_grad_(False)
    return seen["during"], p.detach().clone()


def test_fp32_masters_keep_an_update_that_bf16_rounds_away(tiny_bf16):
    from mechunlearn_utils.edit.storage import restore, snapshot

    name = "model.layers.1.mlp.down_proj.weight"
    base = snapshot(tiny_bf16, list(tiny_bf16.named_parameters()))
    during, after = _one_step(tiny_bf16, name, with_masters=False)
    assert during.dtype is torch.bfloat16 and (during == 1.0).all()  # pure bf16: 1 - 1e-5 == 1
    during, after = _one_step(tiny_bf16, name, with_masters=True)
    assert during.dtype is torch.float32 and (during != 1.0).any()  # the fp32 master moved
    assert ((during - 1.0).abs().max() - 1e-5).abs() < 1e-6
    assert after.dtype is torch.bfloat16  # rounded back to the model's dtype on exit
    restore(tiny_bf16, base)
    params = tiny_bf16.named_parameters()
    assert all(params[n].dtype == t.dtype and torch.equal(params[n], t) for n, t in base.items())


def test_a_bf16_edit_trains_and_restores_bitwise(tiny_bf16, task, text):
    from mechunlearn_utils.edit.storage import restore, snapshot
    from mechunlearn_utils.edit.train import EditConfig, train_edit

    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    everything = snapshot(tiny_bf16, list(tiny_bf16.named_parameters()))
    base = snapshot(tiny_bf16, names)
    cfg = EditConfig(steps=3, lr=1e-3, batch_size=4, lm_batch=1, lm_context=8)
    res = train_edit(tiny_bf16, names, task, text, cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    params = tiny_bf16.named_parameters()
    assert any(not torch.equal(params[n], base[n]) for n in names)
    assert all(params[n].dtype is torch.bfloat16 and params[n].grad is None for n in names)
    edited = snapshot(tiny_bf16, names)
    restore(tiny_bf16, base)
    assert all(torch.equal(params[n], t) and params[n].dtype == t.dtype for n, t in everything.items())
    again = train_edit(tiny_bf16, names, task, text, cfg, progress=False)  # same dtype, same seed: the same edit
    assert [r["loss"] for r in again.history] == [r["loss"] for r in res.history]
    assert all(torch.equal(params[n], edited[n]) for n in names)
    restore(tiny_bf16, base)
    mlp = tiny_bf16.layers[1].mlp
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in (mlp.up_proj, mlp.down_proj))


def test_auto_measures_once_per_host_and_keeps_the_choice(monkeypatch, tmp_path):
    """The speed measurement is stored per host in the cache folder: a later process (or a busy
    moment) reuses it instead of re-timing, so "auto" picks the same dtype in every run."""
    import json

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "_SPEEDUP", {})
    calls = []
    monkeypatch.setattr(P, "_mlp_step_seconds", lambda dtype, device: calls.append(dtype) or
                        (2.0 if dtype == torch.float32 else 1.0))
    assert P.bf16_speedup("cpu") == 2.0 and len(calls) == 2
    stored = json.loads((tmp_path / "precision.json").read_text())
    assert list(stored.values()) == [2.0] and "torch" in next(iter(stored))
    monkeypatch.setattr(P, "_SPEEDUP", {})  # a new process: read back, not measured again
    assert P.bf16_speedup("cpu") == 2.0 and len(calls) == 2


def test_unembed_is_one_matrix_product_in_both_dtypes(tiny, tiny_bf16):
    """3-d hidden states are folded to one [n, d] @ [d, vocab] product: in bf16, a 3-d input made
    torch run `bmm` on a copy of the whole unembedding (forward and backward), 43% of a LoRA step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mechunlearn_utils.core.logits import unembed

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for model, shape in [(m, s) for m in (tiny, tiny_bf16) for s in ((1, 7), (2, 5))]:
        d = model.hf.config.hidden_size
        leaf = torch.randn(shape[0], shape[1] + 1, d, dtype=model.dtype, requires_grad=True)
        h = leaf[:, :-1]  # as `lm_loss` slices it: with one sequence, "contiguous" but not foldable
        seen = set()
        with Ops():
            out = unembed(model, h)
            out.float().logsumexp(-1).sum().backward()
        assert out.shape == (*shape, model.hf.config.vocab_size) and "bmm" not in seen and "mm" in seen, seen
        rows = unembed(model, h.detach().reshape(-1, d)).view(*shape, -1)
        assert torch.equal(out.detach(), rows)  # the same numbers as row by row, bit for bit


def test_fp32_masters_round_once_per_step_with_the_per_call_gradient(tiny_bf16):
    """Inside `fp32_masters` a master is rounded once per step however often its module runs; the
    gradient is bit for bit the one per-call roundings give; an in-place change of the master (an
    optimizer step) or `new_step` rounds it again."""
    from torch.func import functional_call

    lin = tiny_bf16.layers[1].mlp.down_proj
    torch.manual_seed(0)
    xs = [torch.randn(3, lin.in_features).bfloat16() for _ in range(3)]
    ref = lin.weight.detach().float().requires_grad_(True)  # per call: ref.to(bf16), as before
    sum(functional_call(lin, {"weight": ref.to(torch.bfloat16)}, (x,)).float().square().sum() for x in xs).backward()
    used, seen = [], []  # where the rounded weight each call sees lives, and its values
    w = lin.weight
    w.requires_grad_(True)
    hook = None
    try:
        with P.fp32_masters(tiny_bf16, [w]) as casts:
            hook = lin.register_forward_pre_hook(lambda mod, args: used.append(mod.weight.data_ptr())
                                                 or seen.append(mod.weight.detach().clone()))  # after the rounding's
            sum(lin(x).float().square().sum() for x in xs).backward()
            assert used[0] == used[1] == used[2]  # three calls, one rounding (kept alive by the cache)
            assert torch.equal(w.grad, ref.grad)  # each call's bf16 gradient added to the master in fp32
            with torch.no_grad():
                w.mul_(2)  # in place, as an optimizer step: the version counter moves (x2: exact)
            lin(xs[0])
            assert used[3] != used[2] and torch.equal(seen[3], (ref.detach() * 2).bfloat16())
            w.data.div_(2)  # through .data the version counter does not move ...
            lin(xs[0])
            assert used[4] == used[3] and torch.equal(seen[4], seen[3])
            casts.new_step()  # ... but the loop starts every step afresh
            lin(xs[0])
            assert torch.equal(seen[5], ref.detach().bfloat16())
            assert all(t.dtype is torch.bfloat16 for t in seen)
    finally:
        if hook is not None:
            hook.remove()
        w.requires_grad_(False)
        w.grad = None
    assert torch.equal(lin.weight, ref.detach().bfloat16())  # the fixture's weight as it was
