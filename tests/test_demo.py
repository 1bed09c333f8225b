"""`mpsupernet demo` end to end at toy size on the embedded default: the real-3 column, tiers under the demo's share
of full-precision BitOPs, and the summary that `make demo` prints and writes."""

import json

import pytest

from mpsupernet.data import is_real3_available, load_real3_dataset
from mpsupernet.demo import MAX_TIER_SHARE, TIER_NAMES, run_demo
from mpsupernet.metrics import evaluate_real3_mean_iou
from mpsupernet.hub import read_tiers_manifest
from mpsupernet.pretrained import load_sam


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    summary = run_demo(
        str(output), train_steps=2, num_train=8, num_validation=4, population_size=4, generations=1, seed=0
    )
    return output, summary


def test_the_demo_runs_on_the_embedded_default_and_writes_its_summary(demo_run, capsys):
    output, summary = demo_run
    assert json.loads((output / "summary.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    manifest = read_tiers_manifest(output / "tiers")
    assert manifest["base_model"] == "embedded-sam"
    assert set(manifest["tiers"]) <= set(TIER_NAMES) and manifest["tiers"]
    for tier in manifest["tiers"].values():
        assert tier["share_of_full_precision"] <= MAX_TIER_SHARE
        assert tier["latency_ms"] > 0  # exported to ONNX and timed on onnxruntime
    assert [row["model"] for row in summary["rows"]] == ["pretrained SAM (float)"] + [
        f"tier {name}" for name in manifest["tiers"]
    ]
    assert summary["training"]["steps"] == 2 and (output / "pareto_front.png").is_file()


@pytest.mark.skipif(not is_real3_available(), reason="real-3 is not installed")
def test_the_demo_measures_every_row_on_real3(demo_run):
    _, summary = demo_run
    pretrained = summary["rows"][0]["real3_mean_iou"]
    assert pretrained == pytest.approx(evaluate_real3_mean_iou(load_sam(), load_real3_dataset(), seed=0))
    for row in summary["rows"][1:]:
        assert set(row["real3_mean_iou"]) == set(pretrained) and 0 <= row["real3_mean_iou"]["instances"] <= 1
