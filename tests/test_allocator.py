"""core.allocator: the notebook kernels preload tcmalloc where found, and it changes no number."""

import os
import subprocess
import sys

import pytest

from mechunlearn_utils.core import allocator

HAVE = allocator.tcmalloc_library() is not None
# A tiny model's logits and one training step's gradient, hashed bit for bit, in a fresh process.
PROBE = r"""
import hashlib, torch
from mechunlearn_utils import load_model
from mechunlearn_utils.core.allocator import allocator_in_use
torch.manual_seed(0)
m = load_model("tiny-random", "cpu")
ids = m.tokenize(["Fact: Tiger Woods plays the sport of", "Fact: Lionel Messi plays"])["input_ids"]
w = m.hf.model.layers[0].mlp.down_proj.weight
w.requires_grad_(True)
out = m.hf(input_ids=ids).logits
out.float().logsumexp(-1).sum().backward()
h = hashlib.sha256(out.detach().numpy().tobytes() + w.grad.numpy().tobytes()).hexdigest()
print(allocator_in_use(), h)
"""


def _probe(env: dict) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    name, digest = r.stdout.split()[-2:]
    return name, digest


def test_environment_is_restored_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    with allocator.kernel_environment() as lib:
        inside = os.environ.get("LD_PRELOAD")
    assert "LD_PRELOAD" not in os.environ  # put back as it was
    assert (inside == lib) if HAVE else inside is None
    monkeypatch.setenv(allocator.ENV_VAR, "system")
    with allocator.kernel_environment() as lib:
        assert lib is None and "LD_PRELOAD" not in os.environ
    monkeypatch.setenv(allocator.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match="MECHUNLEARN_ALLOCATOR"):
        with allocator.kernel_environment():
            pass


@pytest.mark.skipif(not HAVE, reason="no tcmalloc on this system (apt install libtcmalloc-minimal4)")
def test_tcmalloc_is_used_and_changes_no_number():
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = _probe({**base, allocator.ENV_VAR: "system"})
    with allocator.kernel_environment():
        fast = _probe(dict(os.environ))
    assert plain[0] == "system" and fast[0] == "tcmalloc"
    assert fast[1] == plain[1]  # the same logits and gradient, bit for bit


def test_nothing_is_preloaded_off_linux(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.tcmalloc_library() is None
    with allocator.kernel_environment() as lib:
        assert lib is None
