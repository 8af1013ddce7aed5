"""The roofline benchmark runs end to end on the tiny model and prints its table (not a timing test)."""

from __future__ import annotations

import sys

from mechunlearn_utils.core.paths import REPO_ROOT


def test_bench_roofline_quick_prints_the_table(capsys):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import bench_roofline
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    res = bench_roofline.main(["--quick", "--dtypes", "float32", "--repeats", "1", "--shapes"])
    out = capsys.readouterr().out
    assert "| configuration | dtype |" in out and "matmul peak: float32" in out
    assert "| product | float32 GFLOP/s |" in out
    assert set(res["products"]) == set(bench_roofline.PRODUCT_SHAPES)
    assert all(by["float32"] > 0 for by in res["products"].values())
    assert set(res["configurations"]) == {"full fine-tune step", "MLP edit step (2-3, 12-13)",
                                          "evaluation (200-athlete recall)", "relearning LoRA step"}
    for row in res["configurations"].values():
        assert row["float32"]["gflop_per_step"] > 0 and row["float32"]["fraction_of_peak"] > 0
