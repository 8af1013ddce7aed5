"""The verdict rule of the workbook: is FLU better than every rival, by a margin? Used by the
attacks' verdicts (`attacks.report.attack_verdicts`) and notebook 07 (`workbook.results`)."""

from __future__ import annotations


def claim_verdict(values: dict, flu: str = "flu", rivals=("ap", "ct"), lower_is_better: bool = True,
                  margin: float = 0.05) -> tuple[str, str]:
    """Is FLU better than every rival by at least `margin`? -> (verdict, the numbers in words).

    'reproduced' when FLU beats every rival by the margin, 'not reproduced' when it beats none,
    'mixed' otherwise; 'not measured' when FLU or every rival is missing."""
    present = [r for r in rivals if r in values]
    if flu not in values or not present:
        return "not measured", "missing: " + ", ".join(m for m in (flu, *rivals) if m not in values)
    sign = 1 if lower_is_better else -1
    wins = [sign * (values[r] - values[flu]) >= margin for r in present]
    verdict = "reproduced" if all(wins) else ("not reproduced" if not any(wins) else "mixed")
    words = f"FLU {values[flu]:.3f} vs " + ", ".join(f"{r} {values[r]:.3f}" for r in present)
    return verdict, words
