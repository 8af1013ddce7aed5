"""How does the model recall a fact? Logit lens, direct logit attribution, activation patching,
attention and extraction heads; the plots of these analyses live in `viz.circuits_plots` (a higher layer: viz imports interp, never the reverse).

* `lens`       `logit_lens`, `direct_logit_attribution`, `dla_matrix`
* `patching`   `activation_patching` (one entry, ``direction="denoise" | "noise"``; prompt pairs or
               fact sets), `head_patching`, `corruption_pairs`, `patch_sites`, `restore_by_layer`
* `heads`      `attention_to_subject`, `extraction_heads`, `heads_by_effect`, `align_by_role`,
               `select_athletes`
* `common`     argument checks, batching, hooked runs (`token_labels`)

Everything is re-exported here (plots included): ``from mechunlearn_utils import interp as C; C.X``.
"""

from mechunlearn_utils.core.sites import PATCH_COMPONENTS, SITE_POSITIONS, position_roles  # noqa: F401
from mechunlearn_utils.interp.common import token_labels  # noqa: F401
from mechunlearn_utils.interp.heads import (align_by_role, attention_to_subject, extraction_heads,  # noqa: F401
                                            heads_by_effect, select_athletes)
from mechunlearn_utils.interp.lens import direct_logit_attribution, dla_matrix, logit_lens  # noqa: F401
from mechunlearn_utils.interp.patching import (DEFAULT_SITES, DIRECTIONS, PAIR_COMPONENTS, Component,  # noqa: F401
                                               PatchingResult, activation_patching, activation_patching_many,
                                               corruption_pairs, head_patching, head_patching_many, patch_sites,
                                               patching_score, restore_by_layer)
