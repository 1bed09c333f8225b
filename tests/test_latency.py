"""Latency models: the pure price of an architecture, its file, its refusals, and searches and extraction under it."""

import json
import math
from dataclasses import replace

import pytest

from mpsupernet import LatencyModel, SamSupernetForMaskGeneration
from mpsupernet.bitops import count_bitops
from mpsupernet.latency import FEATURES, fit_coefficients, latency_features
from mpsupernet.search import ParetoFront
from mpsupernet.search.run import evolutionary_search


def fake_latency_model(supernet, **coefficients) -> LatencyModel:
    """A latency model with injected milliseconds per unit (every other coefficient 0)."""
    return LatencyModel(
        coefficients={name: float(coefficients.get(name, 0.0)) for name in FEATURES},
        config=supernet.config.to_dict(),
        runtime="onnxruntime",
        runtime_version="injected",
        num_threads=1,
        cpu="injected",
        date="2026-12-08T00:00:00+00:00",
    )


@pytest.fixture
def small_space_supernet(tiny_sam):
    """A supernet whose only choices are depth (4, 3, 2) and resolution (128, 64): six subnets."""
    return SamSupernetForMaskGeneration.from_sam(
        tiny_sam, resolution_choices=[128, 64], mlp_dim_choices=[256], num_heads_choices=[4],
        weight_bit_choices=[8], activation_bit_choices=[8],
    ).eval()


def all_architectures(space):
    return [space.uniform(r, d, 4, 256, 8, 8) for r in space.resolution_choices for d in space.depth_choices]


def test_prediction_is_the_weighted_counts(tiny_supernet):
    space = tiny_supernet.search_space
    model = fake_latency_model(tiny_supernet, constant=1.5, kept_blocks=2.0, integer_linear_gmacs=1000.0)
    for arch in (space.largest(), space.smallest(), space.largest(4, 4)):
        linear_macs = sum(row.macs for row in count_bitops(tiny_supernet.config, arch).rows if row.kind == "linear")
        assert model.predict(arch) == pytest.approx(1.5 + 2.0 * arch.depth + 1000.0 * linear_macs / 1e9, rel=1e-12)
    # Float Linears are priced apart from integer ones, whatever the integer bits.
    full = fake_latency_model(tiny_supernet, float_gmacs=1.0)
    assert full.predict(space.largest(8, 8)) < full.predict(space.full_precision())
    assert model.predict(space.largest(8, 8)) == model.predict(space.largest(2, 4))


def test_save_and_load_round_trip(tiny_supernet, tmp_path):
    model = fake_latency_model(tiny_supernet, constant=0.7, kept_blocks=3.0, attention_scores_millions=11.0)
    model.calibration = [{"architecture": tiny_supernet.search_space.largest().to_dict(), "measured_ms": 9.0}]
    path = model.save_pretrained(tmp_path / "lm")
    assert path.name == "latency_model.json" and json.loads(path.read_text())["format_version"] == 1
    loaded = LatencyModel.from_pretrained(tmp_path / "lm")
    assert loaded.to_dict() == model.to_dict()
    assert LatencyModel.from_pretrained(path).to_dict() == model.to_dict()
    arch = tiny_supernet.search_space.smallest()
    assert loaded.predict(arch) == model.predict(arch)
    with pytest.raises(FileNotFoundError, match="No latency model at"):
        LatencyModel.from_pretrained(tmp_path / "missing")


def test_refusals_name_the_value(tiny_supernet, tiny_sam):
    model = fake_latency_model(tiny_supernet, constant=2.0, kept_blocks=1.0)
    for bad in (0, -3.0, math.nan, "5"):
        with pytest.raises(ValueError, match=f"`max_latency_ms` must be a positive number of milliseconds, got {bad!r}"):
            model.parse_budget(bad)
    fastest, fastest_ms = model.fastest()
    assert fastest_ms == min(model.predict(arch) for arch in [tiny_supernet.search_space.smallest(), fastest])
    with pytest.raises(ValueError, match="no subnet meets it") as error:
        evolutionary_search(tiny_supernet, lambda arch: 0.5, latency_model=model, max_latency_ms=1.0, progress=False)
    assert fastest.to_json() in str(error.value) and f"{fastest_ms:.3f} ms" in str(error.value)
    other = SamSupernetForMaskGeneration.from_sam(tiny_sam, resolution_choices=[128])
    with pytest.raises(ValueError, match=r"another architecture space.*resolution_choices: \[128\]"):
        evolutionary_search(other, lambda arch: 0.5, latency_model=model, progress=False)
    with pytest.raises(ValueError, match="`max_latency_ms` is 5.0 but no `latency_model`"):
        evolutionary_search(tiny_supernet, lambda arch: 0.5, max_latency_ms=5.0, progress=False)
    with pytest.raises(ValueError, match="non-negative"):
        fake_latency_model(tiny_supernet, constant=-1.0)


def test_search_under_latency_picks_the_hand_computed_subnet(small_space_supernet, tmp_path):
    space = small_space_supernet.search_space
    # Injected timings: 1 ms + 10 ms per kept block, and resizing (only below the base 128 px) costs 100 ms per
    # million elements: 64 px is cheaper in BitOPs but dearer in latency.
    model = fake_latency_model(small_space_supernet, constant=1.0, kept_blocks=10.0, resize_millions=100.0)

    def mean_iou(arch):
        return arch.depth / 10 + (0.01 if arch.resolution == 128 else 0.0)

    budget = 32.0
    archs = all_architectures(space)
    fitting = [arch for arch in archs if 1.0 + 10.0 * arch.depth + (5.12 if arch.resolution == 64 else 0.0) <= budget]
    expected = max(fitting, key=mean_iou)  # by hand: depth 3 at 128 px (31 ms); 64 px at depth 3 takes 36.12 ms
    assert (expected.resolution, expected.depth) == (128, 3)

    front = evolutionary_search(
        small_space_supernet, mean_iou, latency_model=model, max_latency_ms=budget, population_size=6, generations=2,
        seed=0, progress=False,
    )
    best = front.best_under(max_latency_ms=budget)
    assert best.to_architecture() == expected
    assert best.latency_ms == pytest.approx(31.0) and best.bitops == count_bitops(small_space_supernet.config, expected).total_bitops
    assert all(entry.latency_ms <= budget for entry in front.evaluated)
    assert front.objective == "latency_ms" and front.metadata["search"]["max_latency_ms"] == budget
    assert front.metadata["latency_model"]["runtime"] == "onnxruntime"
    loaded = ParetoFront.load(front.save(tmp_path / "front.json"))
    assert loaded.objective == "latency_ms" and loaded.best_under(max_latency_ms=budget) == best
    front.plot(tmp_path / "front.png", budgets=[budget])
    assert (tmp_path / "front.png").stat().st_size > 0
    assert front.to_table()[-1]["ms (predicted)"] == pytest.approx(31.0)
    with pytest.raises(ValueError, match="no predicted latencies"):
        ParetoFront([replace(best, latency_ms=None)]).best_under(max_latency_ms=budget)


def test_extract_subnet_under_latency(small_space_supernet):
    import torch

    supernet = small_space_supernet
    supernet.calibrate_quantizers(torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    model = fake_latency_model(supernet, constant=1.0, kept_blocks=10.0, resize_millions=100.0)
    # Cost-only choice: the first architecture of the descent (bits, then depth, then resolution) that fits 32 ms.
    subnet = supernet.extract_subnet(max_latency_ms=32.0, latency_model=model)
    assert (subnet.architecture.resolution, subnet.architecture.depth) == (128, 3)
    with pytest.raises(ValueError, match="Give one budget"):
        supernet.extract_subnet("5%", max_latency_ms=32.0, latency_model=model)
    with pytest.raises(ValueError, match="no subnet meets it"):
        supernet.extract_subnet(max_latency_ms=20.0, latency_model=model)


def test_fit_recovers_injected_coefficients(tiny_supernet):
    space = tiny_supernet.search_space
    import random

    rng = random.Random(0)
    archs = [space.largest(), space.full_precision(), space.smallest()] + [space.sample(rng) for _ in range(12)]
    truth = {"constant": 2.0, "kept_blocks": 0.5, "integer_linear_gmacs": 300.0, "float_gmacs": 900.0}
    features = [latency_features(tiny_supernet.config, arch) for arch in archs]
    measured = [sum(truth.get(name, 0.0) * row[name] for name in FEATURES) for row in features]
    fitted = fit_coefficients(features, measured)
    for name in FEATURES:
        assert fitted[name] == pytest.approx(truth.get(name, 0.0), abs=1e-6 * max(truth.values()))


@pytest.mark.parametrize("sample", range(4))
def test_weight_bytes_match_the_exported_encoder_tensors(embedded_supernet, sample):
    import random

    from mpsupernet.export.graphs import VisionEncoderGraph
    from mpsupernet.extraction import extract_subnet
    from mpsupernet.weight_bytes import count_weight_bytes

    space = embedded_supernet.search_space
    arch = [space.largest(), space.smallest(), space.full_precision(), space.sample(random.Random(sample))][sample]
    encoder = VisionEncoderGraph(extract_subnet(embedded_supernet, arch).eval())
    stored = sum(tensor.numel() * tensor.element_size() for tensor in encoder.state_dict().values())
    assert count_weight_bytes(embedded_supernet.config, arch) == stored
    int4 = count_weight_bytes(embedded_supernet.config, arch, "int4")
    narrow = [name for name, bits in zip(arch.layer_names, arch.weight_bits) if bits <= 4 and arch.keeps_layer(name)]
    assert (int4 < stored) == bool(narrow)


def test_search_under_weight_bytes(tiny_supernet):
    from mpsupernet.weight_bytes import count_weight_bytes

    space = tiny_supernet.search_space
    lightest, heaviest = (count_weight_bytes(tiny_supernet.config, arch) for arch in (space.smallest(), space.largest()))
    budget = (lightest + heaviest) // 2
    front = evolutionary_search(
        tiny_supernet, lambda arch: arch.depth / 10 + sum(arch.mlp_dims) / 1e5, max_weight_bytes=budget,
        population_size=6, generations=1, progress=False, evaluate_full_precision=False,
    )
    assert front.evaluated and all(entry.weight_bytes <= budget for entry in front.evaluated)
    assert all(entry.weight_bytes == count_weight_bytes(tiny_supernet.config, entry.to_architecture()) for entry in front.evaluated)
    assert front.best_under(max_weight_bytes=budget) == max(front.entries, key=lambda entry: entry.mean_iou)
    with pytest.raises(ValueError, match=f"`max_weight_bytes` is {lightest - 1:,} but no subnet is that small"):
        evolutionary_search(tiny_supernet, lambda arch: 0.5, max_weight_bytes=lightest - 1, progress=False)
    with pytest.raises(ValueError, match="`max_weight_bytes` must be a positive whole number of bytes, got 0"):
        evolutionary_search(tiny_supernet, lambda arch: 0.5, max_weight_bytes=0, progress=False)


def test_a_busy_machine_is_refused_or_flagged(tiny_supernet):
    from mpsupernet.latency import BusyMachineError, EncoderTiming, check_spread, fit_latency_model

    quiet = [EncoderTiming(10.0, 0.05, [10.0] * 5), EncoderTiming(20.0, 0.1, [20.0] * 5)]
    busy = quiet + [EncoderTiming(30.0, 0.6, [20.0, 30.0, 45.0])]
    assert check_spread(quiet, 0.25) is False
    assert check_spread(busy, None) is True
    with pytest.raises(BusyMachineError, match="spread by up to 60% of their median.*above `max_spread` \\(25%\\)"):
        check_spread(busy, 0.25)
    with pytest.raises(ValueError, match="`runtime` must be one of \\['onnxruntime', 'openvino'\\], got 'tensorrt'"):
        fit_latency_model(tiny_supernet, runtime="tensorrt")
    with pytest.raises(ValueError, match="`num_subnets` must be an integer of at least 7, got 3"):
        fit_latency_model(tiny_supernet, num_subnets=3)
    with pytest.raises(ValueError, match="`max_spread` must be a positive number or None, got 0"):
        fit_latency_model(tiny_supernet, max_spread=0)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # seven dynamo exports: minutes on a loaded machine
def test_fit_latency_model_measures_exported_subnets(tiny_supernet, tmp_path):
    import onnxruntime

    from mpsupernet import fit_latency_model
    from mpsupernet.runtime import cpu_model

    active = tiny_supernet.active_subnet
    model = fit_latency_model(tiny_supernet, num_subnets=7, rounds=3, warmup=1, max_spread=None, progress=False)
    assert (model.runtime, model.runtime_version, model.num_threads, model.cpu) == (
        "onnxruntime", onnxruntime.__version__, 1, cpu_model()
    )
    assert len(model.calibration) == 7 and all(len(entry["runs_ms"]) == 3 for entry in model.calibration)
    for entry in model.calibration:
        assert entry["measured_ms"] == pytest.approx(sorted(entry["runs_ms"])[1])
        assert entry["predicted_ms"] == pytest.approx(model.predict(entry["architecture"]))
    assert model.fit_error["count"] == 7
    assert LatencyModel.from_pretrained(model.save_pretrained(tmp_path)).to_dict() == model.to_dict()
    assert tiny_supernet.active_subnet == active  # the subnets were extracted from a copy
