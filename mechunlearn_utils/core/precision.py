"""Which floating-point type the model runs in, and fp32 master weights for what trains.

* `resolve_dtype(dtype, device)`  ``"float32"`` (exact fp32, the reference numbers), ``"bfloat16"``,
  or ``"auto"``: bf16 only where the hardware runs it natively (a CPU with AMX-BF16 or AVX512-BF16,
  a CUDA GPU with bf16) **and** a short micro-benchmark on the workbook's shapes (`bf16_speedup`,
  measured once per host and kept in the cache folder) finds it faster; fp32 otherwise. ``"auto"`` yields to the
  environment variable ``MECHUNLEARN_DTYPE`` (the unit tests set it to ``float32``); an explicit
  dtype wins.
* `fp32_masters(model, params)`   while a model held in bf16 trains, the trained tensors are fp32
  master weights (the optimizer's state follows their dtype); each forward casts them to bf16
  (differentiably: the gradient reaches the master in fp32), so an update of 1e-5 is not rounded
  away (in bf16, 1 + 1e-5 == 1); on exit they are rounded back to the model's dtype. Casting the
  master measured ~3x faster than running the trained Linear layers in fp32 (2-core AVX512-BF16
  Xeon). Under fp32 it does nothing (bit-identical).
* `host_description()`            the CPU a run ran on (model, cores, native bf16 or not), for metrics.json
* `loaded_dtype()`                the dtype the last `load_model` of this process ran in
  (``workbook.results.write_metrics`` records it as ``dtype``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

ENV_VAR = "MECHUNLEARN_DTYPE"
EMULATED_BF16 = ("bfloat16 was asked for, but this CPU has no native bf16 (neither AMX-BF16 nor AVX512-BF16): "
                 "torch emulates it, and a bf16 matrix product measured 150x slower than fp32 on a 2-core "
                 "AVX2 EPYC (0.5 vs 77 GFLOP/s). Use DTYPE='auto' (fp32 here) or 'float32'.")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of a CPU that runs bf16 natively
NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
BENCH_SHAPES = dict(tokens=256, d_model=640, d_mlp=2048)  # gemma-3-270m: a batch of prompts through one MLP
_SPEEDUP: dict[str, float] = {}  # device -> fp32 time / bf16 time, measured once per process
_LOADED: list[str] = []


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16 in /proc/cpuinfo (or torch's CPU capability says AMX)."""
    flags = set(_cpuinfo().split())
    if set(NATIVE_BF16_FLAGS) & flags:
        return True
    return "AMX" in str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()).upper()


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("cpu" where there is none)."""
    names = [l.split(":", 1)[1].strip() for l in _cpuinfo().splitlines() if l.startswith("model name")]
    return names[0] if names else "cpu"


def host_description() -> str:
    """The CPU a run ran on, for its metrics: model name, cores, and which of AMX-BF16,
    AVX512-BF16 or AVX2 it has (times and bf16 speed depend on them: README, *Measured*)."""
    flags = set(_cpuinfo().split())
    has = [f for f in (*NATIVE_BF16_FLAGS, "avx512f", "avx2") if f in flags]
    return f"{_cpu_model()} x{os.cpu_count()} ({', '.join(has) or 'no AVX2'})"


def native_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu_has_native_bf16()


def _mlp_step_seconds(dtype: torch.dtype, device: str, repeats: int = 3) -> float:
    """Best-of-`repeats` time of a Gemma-shaped MLP forward + backward (to its input) in `dtype`."""
    g = torch.Generator().manual_seed(0)
    t, d, f = BENCH_SHAPES["tokens"], BENCH_SHAPES["d_model"], BENCH_SHAPES["d_mlp"]
    gate, up, down = (torch.randn(a, b, generator=g).div_(b ** 0.5).to(device, dtype)
                      for a, b in ((f, d), (f, d), (d, f)))
    x = torch.randn(t, d, generator=g).to(device, dtype).requires_grad_(True)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms the kernels up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = torch.nn.functional.gelu(x @ gate.T, approximate="tanh") * (x @ up.T)
        (h @ down.T).float().square().mean().backward()
        x.grad = None
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _host_key(device: str) -> str:
    """The hardware and software a speed measurement holds for: CPU model (or GPU name) and torch."""
    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{_cpu_model()} x{torch.get_num_threads()}"
    return f"{device}|{hw}|torch {torch.__version__}"


def bf16_speedup(device: str = "cpu") -> float:
    """fp32 time / bf16 time of `_mlp_step_seconds` on `device` (> 1: bf16 faster). Measured once
    per host (CPU model, threads, torch version) and kept in the cache folder, so that ``"auto"``
    makes the same choice in every run on one host (a busy machine's noisy timing cannot flip it)."""
    if device in _SPEEDUP:
        return _SPEEDUP[device]
    from mechunlearn_utils.core.paths import cache_root
    path, key = cache_root() / "precision.json", _host_key(device)
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        known[key] = _mlp_step_seconds(torch.float32, device) / _mlp_step_seconds(torch.bfloat16, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1))
    _SPEEDUP[device] = float(known[key])
    return _SPEEDUP[device]


def resolve_dtype(dtype="auto", device: str = "cpu", min_speedup: float = 1.1) -> tuple[torch.dtype, str]:
    """(the torch dtype to load the model in, why). See the module docstring for ``"auto"``."""
    if dtype is None or dtype == "auto":
        dtype = os.environ.get(ENV_VAR, "").strip() or "auto"
        if dtype != "auto":
            return resolve_dtype(dtype, device)[0], f"from ${ENV_VAR}"
    else:
        asked = _as_dtype(dtype)
        if asked is torch.bfloat16 and device == "cpu" and not native_bf16(device):
            warnings.warn(EMULATED_BF16, stacklevel=2)
            return asked, "as asked; emulated on this CPU, slow"
        return asked, "as asked"
    if not native_bf16(device):
        return torch.float32, "auto: no native bf16 on this device"
    speedup = bf16_speedup(device)
    if speedup < min_speedup:
        return torch.float32, f"auto: bf16 measured {speedup:.2f}x, not faster"
    return torch.bfloat16, f"auto: native bf16, measured {speedup:.2f}x faster"


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype {dtype} is not supported: use float32, bfloat16 or auto")
        return dtype
    if str(dtype).lower() in NAMES:
        return NAMES[str(dtype).lower()]
    raise ValueError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'auto'")


def note_loaded(dtype: torch.dtype) -> None:
    _LOADED.append(dtype_name(dtype))


def loaded_dtype() -> str | None:
    """The dtype (name) of the last model `load_model` loaded in this process; None if none."""
    return _LOADED[-1] if _LOADED else None


# --------------------------------------------------------------------------- fp32 master weights

class _GradToMaster(torch.autograd.Function):
    """``low`` (the master rounded to the model's dtype, computed once) in the forward; the
    gradient reaches the fp32 master as ``grad.to(fp32)``, exactly what a per-call ``master.to(low
    dtype)`` (ToCopyBackward) gives, so each use still accumulates into the master in fp32."""

    @staticmethod
    def forward(ctx, master, low):
        ctx.master_dtype = master.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.master_dtype), None


class MasterCasts:
    """The rounded copies of fp32 masters, made once per training step (`new_step`) instead of at
    every call of their module: a step runs the decoder up to three times (the shared one-shot
    prefix, the prompts, the retain text), and for full fine-tuning's 100M weights each rounding
    reads 400 MB. A master changed in place (its version counter moved) is rounded again anyway."""

    def __init__(self, low: dict):
        self.low, self.casts = low, {}

    def new_step(self) -> None:
        self.casts.clear()

    def use(self, master: torch.Tensor) -> torch.Tensor:
        hit = self.casts.get(id(master))
        if hit is None or hit[0] != master._version:
            hit = self.casts[id(master)] = (master._version, master.detach().to(self.low[id(master)]))
        if torch.is_grad_enabled() and master.requires_grad:
            return _GradToMaster.apply(master, hit[1])
        return hit[1]


@contextlib.contextmanager
def fp32_masters(model, params):
    """Hold the low-precision tensors of `params` (parameters of ``model.hf``) in fp32 inside the
    block: the optimizer steps these fp32 masters (its state follows their dtype), and each call of
    a module owning one uses the master rounded to the model's dtype, differentiably (gradients
    reach the master in fp32). The rounding is made once per step: the block yields a `MasterCasts`
    whose ``new_step()`` the training loop calls before each step (None when nothing is converted).
    fp32 tensors (an fp32 model, LoRA adapters, masks, soft prompts) are left alone: under fp32
    this does nothing. On exit: rounded back, gradients dropped."""
    ids = {id(p) for p in params if p.is_floating_point() and p.dtype != torch.float32}
    if not ids:
        yield None
        return
    low = {id(p): p.dtype for p in params if id(p) in ids}
    casts = MasterCasts(low)
    owners = [(m, [n for n, p in m._parameters.items() if p is not None and id(p) in ids]) for m in model.hf.modules()]
    owners = [(m, names) for m, names in owners if names]

    def cast_in(module, args, names):  # the master leaves the module's parameters for the call
        for n in names:
            master = module._parameters.pop(n)
            module.__dict__[n] = casts.use(master)
            module.__dict__["_fp32_master_" + n] = master

    def put_back(module, names):
        for n in names:
            if "_fp32_master_" + n in module.__dict__:
                del module.__dict__[n]
                module._parameters[n] = module.__dict__.pop("_fp32_master_" + n)

    handles = [h for m, names in owners for h in (
        m.register_forward_pre_hook(lambda mod, args, names=names: cast_in(mod, args, names)),
        m.register_forward_hook(lambda mod, args, out, names=names: put_back(mod, names)))]
    converted = [p for p in params if id(p) in ids]
    with torch.no_grad():
        for p in converted:
            p.data = p.data.float()
    try:
        yield casts
    finally:
        casts.new_step()
        for h in handles:
            h.remove()
        for m, names in owners:
            put_back(m, names)  # after a forward that raised
        with torch.no_grad():
            for p in converted:
                p.data = p.data.to(low[id(p)])
                p.grad = None
