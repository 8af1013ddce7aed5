"""Attacks on edited models: does the forgotten fact come back?

Every attack starts from an edited model saved by notebook 03 (`find_edits`, `over_edits`) and
measures the **forget accuracy** (`sports_p_true`): the probability of the *true* sport normalized
over `evaluate.suite.EDIT_CANDIDATES` (the paper's "continuous accuracy", the same candidates and
scoring core `evaluate_task` uses), on athletes the attack did not train on.

* `scoring`      forget accuracy (a view of the evaluation suite), the half split, `AttackError`
* `edits`        the saved edits of several tasks, put on the model one after the other
* `relearning`   relearning: LoRA or full fine-tuning on half the athletes (the one training loop)
* `soft_prompt`  a norm-bounded soft prompt after BOS; the paper's adversary (attention over learned
                 vectors added to every token embedding), both through the one training loop
* `formats`      alternative English formats and other languages
* `quantize`     int8 / int4 round-to-nearest of the edited or all decoder weights
* `report`       records, recovery table, verdicts, relearning curves, positive control, plots
* `depth`        notebook 02b: edit windows of k MLP layers at every depth, measure and attack each
                 (``from mechunlearn_utils.attacks import depth as D``; not re-exported here)

**Shared prefix.** All prompts of a format start with the same one-shot example, which runs once
per batch with and without gradients (`forward.last_token_hidden`; the soft prompt sits inside
that shared prefix). Where relearning trains only upper layers (``layers=``), the lower layers'
output is computed once as well (`forward.prefix_hidden`).

``from mechunlearn_utils import attacks as A`` gives every public name as ``A.<name>``.
"""

from mechunlearn_utils.attacks.edits import SPORTS_TASKS, edit_weights, find_edits, over_edits, over_splits
from mechunlearn_utils.attacks.formats import (ALT_FORMATS, LANGUAGE_CSV, answer_token_ids, format_athlete_p_true,
                                               format_p_true, formats_p_true, language_p_true, language_row, languages_p_true,
                                               load_language_templates)
from mechunlearn_utils.attacks.quantize import (QUANT_SETTINGS, edit_survival, fake_quantize, parse_quant,
                                                quant_attack, quant_param_names, quantize_codes, quantized)
from mechunlearn_utils.attacks.relearning import (RelearnConfig, RelearnResult, decoder_linear_names,
                                               decoder_parameter_names, full_finetune, lora_adapter, relearn,
                                               relearn_over_splits)
from mechunlearn_utils.attacks.report import (attack_records, attack_verdicts, control_check, per_athlete_ci_verdicts,
                                              plot_ci_bars, plot_recovery, plot_relearn_curves, pooled_heldout,
                                              recovery_table, relearn_ci_frame, relearn_ci_verdicts, relearn_curve_frame,
                                              split_ci_verdicts)
from mechunlearn_utils.attacks.scoring import (AttackError, athlete_p_true, candidate_scores, check_budget,
                                               split_forget, sports_p_true, summary)
from mechunlearn_utils.attacks.soft_prompt import (PaperSoftPrompt, PaperSoftPromptConfig, SoftPrompt, SoftPromptConfig,
                                                   UniversalSoftPromptAdversary, embedding_adversary,
                                                   paper_soft_prompt_p_true, project_norm_, train_paper_soft_prompt,
                                                   train_soft_prompt)
from mechunlearn_utils.edit.storage import (EDITS_NOTEBOOK, EDITS_STEM, available_methods, edit_info, edit_path,
                                            edits_dir, task_kwargs)
from mechunlearn_utils.evaluate.suite import EDIT_CANDIDATES
from mechunlearn_utils.evaluate.verdicts import bootstrap_ci, ci_verdict, diff_ci

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("edits", "formats", "quantize", "relearning",
                                                                    "report", "scoring", "soft_prompt")]
