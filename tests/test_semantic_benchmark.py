"""`benchmarks/semantic_quality.py` at toy size: every figure it reports is measured and in range."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import semantic_quality  # noqa: E402


@pytest.mark.slow  # trains two models, searches, exports and quantizes: minutes on two cores
def test_semantic_quality_reports_supernet_and_float_baseline(tmp_path):
    results = semantic_quality.main(
        ["--seeds", "1", "--train-steps", "1", "--num-train", "4", "--num-validation", "4", "--num-test", "4",
         "--population-size", "2", "--generations", "0", "--calibration-images", "2", "--output-dir", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "semantic_quality.json").read_text())
    assert saved["budgets"] == json.loads(json.dumps(results["budgets"]))
    assert [budget["budget_share"] for budget in saved["budgets"]] == [0.03, 0.05, 0.10]
    seed = saved["per_seed"]["0"]
    for key in ("test_mean_iou_full_precision_fine_tuned", "test_mean_iou_supernet_w8a8",
                "test_mean_iou_float_fine_tune", "test_mean_iou_float_fine_tune_ptq_w8a8"):
        assert 0.0 <= seed[key] <= 1.0
    assert saved["w8a8_supernet_minus_ptq"]["mean"] == pytest.approx(
        seed["test_mean_iou_supernet_w8a8"] - seed["test_mean_iou_float_fine_tune_ptq_w8a8"]
    )


def test_semantic_quality_refuses_bad_settings():
    with pytest.raises(SystemExit):
        semantic_quality.parse_args(["--seeds", "0"])
