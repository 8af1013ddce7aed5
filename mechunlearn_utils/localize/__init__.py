"""Localize factual recall: which weight matrices should an edit train?

Methods (Guo et al. 2024, section 3), one module each, following the authors' code
(github.com/magikarp01/mechanistic-unlearning; each module's docstring names the file it follows):

* `common`: fact sets (activation sites and the three backends, TransformerLens / nnsight / plain
  hooks, are `core.sites`), corruptions (Gaussian subject noise, random subject tokens), `TracingResult` and the paper's layer
  aggregation (`aggregate_layer_scores`).
* `tracing`: **CT**, causal tracing (`causal_tracing`).
* `attribution`: **AP**, attribution patching (`attribution_patching`), checked against real
  activation patching (`interp.patching.activation_patching`, ``direction="noise"``; `ap_agreement`).
* `flu`: **FLU** ("manual"): the contiguous early MLP range ending where the name-only probe
  saturates (`flu_range`), supported by path patching (`head_path_patching`, `mlp_path_patching`,
  `flu_search`: the threshold selection kept as ``flu_pp``).
* `matching`: parameters, `Localization` files, the paper's parameter matching (whole units) and
  the baselines (random, random_mlps, all_mlps, nonlocalized) and the ``extraction`` control.
* `report`: flat metrics, overlaps, depth tables, plots, design-choice comparisons.

Everything is re-exported here: ``from mechunlearn_utils import localize as lz; lz.X``.
"""

from mechunlearn_utils.localize.common import *  # noqa: F401,F403
from mechunlearn_utils.core.sites import (BACKENDS, HEAD_KINDS, MLP_KINDS, SITE_KINDS, PassCounter, RunResult,  # noqa: F401
                                          Site, add_rows, head_dim, replace_rows, run_sites)
from mechunlearn_utils.localize.common import _batched, _ld_metric, _softmax_p  # noqa: F401
from mechunlearn_utils.localize.tracing import *  # noqa: F401,F403
from mechunlearn_utils.localize.attribution import *  # noqa: F401,F403
from mechunlearn_utils.localize.attribution import _attr, _pearson, _ranks  # noqa: F401
from mechunlearn_utils.localize.flu import *  # noqa: F401,F403
from mechunlearn_utils.localize.flu import _attn_output, _candidate_logits, _mlp_output  # noqa: F401
from mechunlearn_utils.localize.matching import *  # noqa: F401,F403
from mechunlearn_utils.localize.matching import _MATRIX, _budget_check, _make, _matrix_params  # noqa: F401
from mechunlearn_utils.localize.report import *  # noqa: F401,F403
from mechunlearn_utils.localize.report import _finite, _ranges  # noqa: F401
from mechunlearn_utils.localize import attribution, common, flu, matching, report, tracing  # noqa: F401,E402
