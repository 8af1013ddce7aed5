"""The memory allocator the notebook kernels run with: tcmalloc where the system has it.

A training step of the workbook makes ~10,000 tensor allocations (the profile's `empty_strided`:
11 us each under glibc's malloc on the 2-core hosts). PyTorch's CPU performance guide and its own
launcher (`python -m torch.backends.xeon.run_cpu --enable-tcmalloc`) preload tcmalloc for this.
Measured on the 2-core AMX Xeon (2026-12-02, idle, 2 threads, bf16, two alternating runs each):
6 steps of a localized MLP edit 5.47-5.58 s with tcmalloc vs 6.46-6.48 s with glibc (-15%), 3
full fine-tuning steps 7.27-7.29 vs 8.69-8.73 s (-16%), 6 LoRA relearning steps 5.18-5.25 vs
6.42-6.44 s (-19%). The allocator changes no number (same operations, same order): runs with
and without it agree bit for bit (tests/test_allocator.py).

tcmalloc is not on PyPI: Debian / Ubuntu ``apt install libtcmalloc-minimal4``, conda
``gperftools`` (environment.yml). Without it everything runs as before, only slower.

* `tcmalloc_library()`     the library to preload (a path or a soname), or None
* `kernel_environment()`   context manager: ``LD_PRELOAD`` set for processes started inside it (the
                           runner starts each notebook's kernel inside it); ``$MECHUNLEARN_ALLOCATOR``
                           ``=system`` turns it off
* `allocator_in_use()`     "tcmalloc" or "system" for this process (recorded in metrics.json)
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import sys
from pathlib import Path

from mechunlearn_utils.core.paths import environment

ENV_VAR = "MECHUNLEARN_ALLOCATOR"  # "auto" (tcmalloc where found) or "system"
NAMES = ("tcmalloc_minimal", "tcmalloc")
# tcmalloc reports every allocation above 1 GB on stderr (the GGUF conversion makes some): quiet
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def _prefix_dirs() -> list[Path]:
    """lib/ of the conda environment and of this Python's prefix (where conda puts gperftools)."""
    dirs = [os.environ.get("CONDA_PREFIX"), sys.prefix, sys.base_prefix]
    return [Path(d) / "lib" for d in dict.fromkeys(d for d in dirs if d)]


def tcmalloc_library() -> str | None:
    """A tcmalloc shared library: in the environment's lib/ first, then the system's (ldconfig).
    None off Linux (LD_PRELOAD is the Linux loader's)."""
    if not sys.platform.startswith("linux"):
        return None
    for d in _prefix_dirs():
        for name in NAMES:
            hits = sorted(d.glob(f"lib{name}.so*"))
            if hits:
                return str(hits[0])
    for name in NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _wanted() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in ("auto", "system"):
        raise ValueError(f"${ENV_VAR} must be 'auto' or 'system', got {value!r}")
    return value


@contextlib.contextmanager
def kernel_environment():
    """Inside: processes started (a notebook kernel) preload tcmalloc, when found and not turned off."""
    lib = tcmalloc_library() if _wanted() == "auto" else None
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or "tcmalloc" in preload:
        yield lib
        return
    values = {**{k: os.environ.get(k, v) for k, v in QUIET.items()},
              "LD_PRELOAD": " ".join(x for x in (lib, preload) if x)}
    with environment(values):
        yield lib


def allocator_in_use() -> str:
    """"tcmalloc" when this process runs with it (mapped into its memory), else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing is preloaded (tcmalloc_library)
        return "system"
    return "tcmalloc" if "tcmalloc" in maps else "system"


def main(argv: list[str] | None = None) -> int:
    """``python -m mechunlearn_utils.core.allocator CMD ...``: run CMD with tcmalloc preloaded where
    found (`make lab` starts JupyterLab so, and its kernels inherit it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"tcmalloc: {tcmalloc_library() or 'not found (apt install libtcmalloc-minimal4, or conda gperftools)'}")
        return 0
    with kernel_environment():
        os.execvp(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
