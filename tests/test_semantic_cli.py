"""`--task semantic` on the command line (train, search, extract, export) and the semantic demo at toy size."""

import json

import pytest

from mpsupernet import SamSubnetForSemanticSegmentation, SamSupernetForSemanticSegmentation
from mpsupernet.cli import main
from mpsupernet.data import SYNTHETIC_SEMANTIC_ID2LABEL
from mpsupernet.demo_semantic import run_semantic_demo


def test_train_search_and_extract_with_task_semantic(tmp_path, capsys):
    supernet, front = tmp_path / "supernet", tmp_path / "front"
    data = ["--task", "semantic", "--num-train", "4", "--num-validation", "4"]
    assert main(["train", "--supernet", "shapes-sam", *data, "--max-steps", "1", "--batch-size", "2",
                 "--output-dir", str(supernet)]) == 0
    loaded = SamSupernetForSemanticSegmentation.from_pretrained(supernet)
    assert loaded.config.id2label == SYNTHETIC_SEMANTIC_ID2LABEL
    assert main(["search", "--supernet", str(supernet), *data, "--population-size", "2", "--generations", "0",
                 "--output-dir", str(front)]) == 0
    entries = json.loads((front / "pareto_front.json").read_text())["entries"]
    assert entries and all(0.0 <= entry["mean_iou"] <= 1.0 for entry in entries)
    capsys.readouterr()
    assert main(["extract", "--task", "semantic", "--supernet", str(supernet), "--budget", "100%",
                 "--pareto-front", str(front / "pareto_front.json"), "--output-dir", str(tmp_path / "tier")]) == 0
    assert isinstance(SamSubnetForSemanticSegmentation.from_pretrained(tmp_path / "tier"), SamSubnetForSemanticSegmentation)
    # The saved supernet is semantic: the default (promptable) task is refused, naming both.
    assert main(["extract", "--supernet", str(supernet), "--budget", "100%", "--output-dir", str(tmp_path / "x")]) == 2
    assert "is a semantic supernet, but --task is 'promptable'; give --task semantic" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_semantic_demo_end_to_end_at_toy_size(tmp_path):
    summary = run_semantic_demo(
        output_dir=str(tmp_path), train_steps=1, num_train=4, num_validation=4, population_size=2, generations=0,
        export_onnx=False,
    )
    rows = summary["rows"]
    assert rows[0]["model"] == "supernet, full precision" and rows[0]["share_of_full_precision"] == 1.0
    assert [row["model"] for row in rows[1:]] and all(0.0 <= row["mean_iou"] <= 1.0 for row in rows)
    assert all(row["share_of_full_precision"] <= 0.10 for row in rows[1:])
    manifest = json.loads((tmp_path / "tiers" / "tiers.json").read_text())
    assert {row["model"] for row in rows[1:]} == {f"tier {name}" for name in manifest["tiers"]}
    with pytest.raises(ValueError, match="`train_steps` must be a positive integer"):
        run_semantic_demo(output_dir=str(tmp_path / "never"), train_steps=0)
    assert not (tmp_path / "never").exists()
