import json
import random
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from mpsupernet import SamSupernetConfig, SearchSpace
from mpsupernet.bitops import parse_budget
from mpsupernet.data import (
    SYNTHETIC_DATASET_NAME,
    SamSegmentationPreprocessor,
    collate_fn,
    make_synthetic_segmentation_dataset,
)
from mpsupernet.metrics import evaluate_mean_iou
from mpsupernet.search import (
    ArchitectureEncoding,
    ParetoEntry,
    ParetoFront,
    evolutionary_search,
    make_miou_evaluator,
    non_dominated_mask,
    run_search,
)
from mpsupernet.testing_utils import make_sam_config, make_vit_b_sam_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def supernet_config(sam_config, **overrides) -> SamSupernetConfig:
    return SamSupernetConfig(**{k: v for k, v in sam_config.to_dict().items() if k != "model_type"}, **overrides)


def synthetic_miou(arch) -> float:
    """A cheap, deterministic stand-in for mIoU: grows with the bits and width of the kept blocks, with depth and
    resolution, plus noise from a hash of the architecture."""
    kept = set(arch.kept_blocks)
    layer_bits = [
        min(w, 8) * min(a, 8)
        for name, w, a in zip(arch.layer_names, arch.weight_bits, arch.activation_bits)
        if arch.keeps_layer(name)
    ]
    width = np.mean([arch.num_heads[b] / 4 + arch.mlp_dims[b] / 256 for b in kept])
    noise = zlib.crc32(arch.to_json().encode()) / 2**32
    return float(
        0.4 * np.mean(layer_bits) / 64 + 0.1 * width + 0.1 * arch.resolution / 128 + 0.1 * arch.depth / 4 + 0.02 * noise
    )


class CountingEvaluator:
    def __init__(self):
        self.calls = []

    def __call__(self, arch) -> float:
        self.calls.append(arch)
        return synthetic_miou(arch)


def brute_force_non_dominated(points):
    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(dominates(other, point) for other in points) for point in points]


# --- non-dominated filtering -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_objectives", [2, 3])
def test_non_dominated_mask_matches_brute_force(num_objectives):
    rng = np.random.default_rng(0)
    for trial in range(20):
        # Small integers make ties (equal coordinates and equal points) common.
        points = rng.integers(0, 6, size=(int(rng.integers(1, 40)), num_objectives))
        assert non_dominated_mask(points).tolist() == brute_force_non_dominated(points.tolist())


def test_non_dominated_mask_keeps_equal_points_and_rejects_bad_input():
    assert non_dominated_mask([[1, 2], [1, 2], [2, 2]]).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="2-D"):
        non_dominated_mask([1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        non_dominated_mask([[1.0, float("nan")]])


# --- encoding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bit_granularity", ["layer", "block"])
def test_convolutions_and_feature_size_leave_the_blocks_drawn_by_a_seed(bit_granularity):
    sam_config, linears = make_sam_config(), ["qkv", "proj", "lin1", "lin2"]
    linears_only = SearchSpace(supernet_config(sam_config, bit_granularity=bit_granularity, quantized_layers=linears))
    full = SearchSpace(supernet_config(sam_config, bit_granularity=bit_granularity, hidden_size_choices=[64, 32]))
    assert full.layer_names[-3:] == ("patch_embed.projection", "neck.conv1", "neck.conv2")
    assert full.layer_blocks[-3:] == (4, 5, 6)  # each convolution a bit unit of its own
    for seed in range(10):
        before, after = linears_only.sample(seed), full.sample(seed)
        blocks = len(before.layer_names)
        assert (before.resolution, before.skipped_blocks, before.num_heads, before.mlp_dims) == (
            after.resolution, after.skipped_blocks, after.num_heads, after.mlp_dims
        )
        assert after.weight_bits[:blocks] == before.weight_bits and after.layer_names[:blocks] == before.layer_names
        full.validate(after)


@pytest.mark.parametrize("bit_granularity", ["layer", "block"])
@pytest.mark.parametrize("make_config", [make_sam_config, make_vit_b_sam_config], ids=["tiny", "vit_b"])
def test_encoding_round_trips_sampled_architectures(make_config, bit_granularity):
    space = SearchSpace(supernet_config(make_config(), bit_granularity=bit_granularity))
    encoding = ArchitectureEncoding(space)
    # Under block granularity each of the 3 quantized convolutions is a bit unit of its own.
    num_bit_units = space.num_blocks + 3 if bit_granularity == "block" else len(space.layer_names)
    assert encoding.num_genes == 2 + 2 * space.num_blocks + 2 * num_bit_units + 1  # the last gene: the feature size
    rng = random.Random(0)
    for arch in [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(50)]:
        genes = encoding.encode(arch)
        assert genes.dtype.kind == "i" and np.all(genes >= encoding.lower) and np.all(genes <= encoding.upper)
        assert encoding.decode(genes) == arch
    assert encoding.encode(space.largest()).tolist() == [0] * encoding.num_genes


def test_decode_canonicalises_random_genotypes_and_names_bad_genes(tiny_supernet):
    space = tiny_supernet.search_space
    encoding = ArchitectureEncoding(space)
    rng = np.random.default_rng(0)
    for _ in range(50):
        genes = rng.integers(encoding.lower, encoding.upper + 1)
        arch = encoding.decode(genes)
        space.validate(arch)
        assert arch == space.canonical(arch)
        assert encoding.decode(encoding.canonicalize(genes)) == arch
    # The genes of a skipped block do not matter: both genotypes are the same architecture.
    smallest = encoding.encode(space.smallest())
    skipped_block = space.smallest().skipped_blocks[0]
    other = smallest.copy()
    other[2 + skipped_block] = encoding.upper[2 + skipped_block]
    assert encoding.decode(other) == space.smallest()
    assert encoding.canonicalize(other).tolist() == smallest.tolist()

    too_high = smallest.copy()
    too_high[0] = 7
    with pytest.raises(ValueError, match="gene of the resolution is 7; allowed: 0 to 2"):
        encoding.decode(too_high)
    with pytest.raises(ValueError, match="genes"):
        encoding.decode(smallest[:-1])
    with pytest.raises(ValueError, match="32.*not a search choice"):
        encoding.encode(space.full_precision())


# --- the Pareto front ----------------------------------------------------------------------------------------------
def entry(bitops, mean_iou):
    return ParetoEntry(architecture={"name": f"{bitops}-{mean_iou}"}, bitops=bitops, mean_iou=mean_iou)


def test_pareto_front_filters_sorts_and_answers_budgets():
    points = [entry(100, 0.5), entry(300, 0.7), entry(200, 0.6), entry(250, 0.55), entry(400, 0.7), entry(50, 0.2)]
    front = ParetoFront(points, metadata={"full_precision": {"bitops": 1000, "mean_iou": 0.8}, "w8a8_bitops": 500})
    assert [(e.bitops, e.mean_iou) for e in front.entries] == [(50, 0.2), (100, 0.5), (200, 0.6), (300, 0.7)]
    assert front.evaluated == points
    assert front.best_under(300).bitops == 300
    assert front.best_under(299).bitops == 200
    assert front.best_under(10**9).mean_iou == 0.7
    assert front.best_under(50).bitops == 50
    assert front.best_under(49) is None
    assert front.best_under(120.7).bitops == 100
    with pytest.raises(ValueError, match="max_bitops.*got -5"):
        front.best_under(-5)
    table = front.to_table()
    assert list(table[0]) == ["GBitOPs", "% of FP", "% of W8A8", "mIoU"]
    assert table[1] == {"GBitOPs": 1e-07, "% of FP": 10.0, "% of W8A8": 20.0, "mIoU": 0.5}
    assert ParetoFront([]).best_under(100) is None


def test_budget_strings_go_through_parse_budget(tmp_path):
    front = ParetoFront([entry(100, 0.5), entry(200, 0.6)], metadata={"full_precision": {"bitops": 1000}})
    assert front.best_under("15%").bitops == 100
    assert front.best_under("0.2k").bitops == 200
    assert front.plot(tmp_path / "front.png", budgets=["15%"]).exists()
    with pytest.raises(ValueError, match="15%"):
        ParetoFront([entry(100, 0.5)]).best_under("15%")


def test_pareto_front_load_names_a_bad_file(tmp_path):
    path = tmp_path / "front.json"
    path.write_text(json.dumps({"points": []}))
    with pytest.raises(ValueError, match="entries"):
        ParetoFront.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        ParetoFront.load(path)
    image = tmp_path / "pareto_front.png"  # the plot beside the front, given by mistake
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ValueError, match=rf"^'{re.escape(str(image))}' is not a JSON file written by ParetoFront.save: 'utf-8' codec"):
        ParetoFront.load(image)


# --- the search, with a synthetic mIoU -----------------------------------------------------------------------------
def test_search_finds_a_constrained_front_and_saves_it(tiny_supernet, tmp_path):
    space = tiny_supernet.search_space
    full_precision_bitops = tiny_supernet.bitops_report(tiny_supernet.full_precision_subnet()).total_bitops
    max_bitops = full_precision_bitops // 20  # 5%: below uniform W8A8 (about 6% with quantized convolutions)
    evaluator = CountingEvaluator()
    front = evolutionary_search(
        tiny_supernet, evaluator, population_size=12, generations=4, max_bitops=max_bitops, seed=3, progress=False
    )

    objectives = [(e.bitops, -e.mean_iou) for e in front.entries]
    assert len(front) >= 3 and all(non_dominated_mask(objectives))
    assert all(e.bitops <= max_bitops for e in front.evaluated)
    assert [e.bitops for e in front.entries] == sorted(e.bitops for e in front.entries)
    # The smallest subnet is seeded and no architecture is cheaper, so it is on the front.
    assert front.entries[0].bitops == tiny_supernet.bitops_report(space.smallest()).total_bitops
    # Every architecture is evaluated once; the extra call is the full-precision model.
    assert len(evaluator.calls) == len(set(evaluator.calls)) == len(front.evaluated) + 1 <= 12 * 5 + 1
    assert evaluator.calls[0] == tiny_supernet.full_precision_subnet()
    for e in front.evaluated:
        assert e.mean_iou == synthetic_miou(e.to_architecture())
        assert e.bitops == tiny_supernet.bitops_report(e.architecture).total_bitops
    # The search does better than its initial population.
    initial_best = max(synthetic_miou(arch) for arch in evaluator.calls[1:13])
    assert front.entries[-1].mean_iou > initial_best

    metadata = front.metadata
    assert metadata["full_precision"] == {
        "bitops": full_precision_bitops,
        "macs": tiny_supernet.bitops_report(tiny_supernet.full_precision_subnet()).total_macs,
        "mean_iou": synthetic_miou(tiny_supernet.full_precision_subnet()),
    }
    assert metadata["w8a8_bitops"] == tiny_supernet.bitops_report(space.largest()).w8a8_bitops
    assert metadata["search"]["max_bitops"] == max_bitops and metadata["search"]["num_evaluations"] == len(
        front.evaluated
    )

    again = evolutionary_search(
        tiny_supernet, synthetic_miou, population_size=12, generations=4, max_bitops=max_bitops, seed=3, progress=False
    )
    assert [e.to_dict() for e in again.evaluated] == [e.to_dict() for e in front.evaluated]
    other_seed = evolutionary_search(
        tiny_supernet, synthetic_miou, population_size=12, generations=4, max_bitops=max_bitops, seed=4, progress=False
    )
    assert [e.architecture for e in other_seed.evaluated] != [e.architecture for e in front.evaluated]

    loaded = ParetoFront.load(front.save(tmp_path / "out" / "pareto_front.json"))
    assert [e.to_dict() for e in loaded.entries] == [e.to_dict() for e in front.entries]
    assert [e.to_dict() for e in loaded.evaluated] == [e.to_dict() for e in front.evaluated]
    assert loaded.metadata == metadata
    assert loaded.to_table() == front.to_table()
    assert loaded.best_under(max_bitops) == front.entries[-1]
    tiny_supernet.set_subnet(loaded.entries[0].to_architecture())

    image = front.plot(tmp_path / "out" / "pareto_front.png", title="tiny", budgets=[max_bitops])
    assert image.read_bytes().startswith(PNG_SIGNATURE)


def test_search_with_block_bits_min_bitops_and_sms_emoa(tiny_sam, tmp_path):
    from mpsupernet import SamSupernetForMaskGeneration

    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam, bit_granularity="block").eval()
    smallest = supernet.bitops_report(supernet.smallest_subnet()).total_bitops
    front = evolutionary_search(
        supernet,
        synthetic_miou,
        population_size=6,
        generations=2,
        min_bitops=2 * smallest,
        max_bitops="50%",
        algorithm="smsemoa",
        evaluate_full_precision=False,
        progress=False,
    )
    max_bitops = supernet.bitops_report(supernet.full_precision_subnet()).total_bitops // 2
    assert front.metadata["search"]["max_bitops"] == max_bitops
    assert front.evaluated and all(2 * smallest <= e.bitops <= max_bitops for e in front.evaluated)
    for e in front.evaluated:
        supernet.search_space.validate(e.to_architecture())
    assert front.full_precision_mean_iou is None
    # Without a measured full-precision mIoU the plot marks its BitOPs with a line.
    assert front.plot(tmp_path / "front.png").read_bytes().startswith(PNG_SIGNATURE)


def test_search_rejects_impossible_settings(tiny_supernet):
    smallest = tiny_supernet.bitops_report(tiny_supernet.smallest_subnet()).total_bitops
    with pytest.raises(ValueError, match=f"smallest subnet costs {smallest:,}"):
        evolutionary_search(tiny_supernet, synthetic_miou, max_bitops=smallest - 1, progress=False)
    with pytest.raises(ValueError, match="Unknown search algorithm 'ga'; allowed: \\['nsga2', 'smsemoa'\\]"):
        evolutionary_search(tiny_supernet, synthetic_miou, algorithm="ga")
    with pytest.raises(ValueError, match="population_size.*got 1"):
        evolutionary_search(tiny_supernet, synthetic_miou, population_size=1)
    with pytest.raises(ValueError, match="finite mean IoU"):
        evolutionary_search(tiny_supernet, lambda arch: float("nan"), progress=False)


# --- the real wiring -----------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate_state():
    yield
    # Accelerate keeps its state per process; reset it so that later tests may configure their own.
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("max_eval_batches", [0, -1, 1.5, True])
def test_run_search_refuses_a_batch_limit_that_evaluates_nothing(tmp_path, max_eval_batches):
    dataset = make_synthetic_segmentation_dataset(2, image_size=128, seed=0)
    message = rf"^`max_eval_batches` must be a positive integer or None, got {max_eval_batches!r}\.$"
    with pytest.raises(ValueError, match=message):
        run_search(str(tmp_path / "no-supernet"), dataset, output_dir=tmp_path / "search", max_eval_batches=max_eval_batches)
    assert list(tmp_path.iterdir()) == []


def test_miou_evaluator_and_run_search_on_synthetic_data(tiny_supernet, tmp_path, fresh_accelerate_state):
    dataset = make_synthetic_segmentation_dataset(2, image_size=128, seed=0)
    dataloader = torch.utils.data.DataLoader(
        dataset.with_transform(SamSegmentationPreprocessor(tiny_supernet.config, prompts_per_image=2)),
        batch_size=1,
        collate_fn=collate_fn,
    )
    smallest, before = tiny_supernet.smallest_subnet(), tiny_supernet.active_subnet
    value = make_miou_evaluator(tiny_supernet, dataloader, max_batches=2)(smallest)
    assert value == pytest.approx(evaluate_mean_iou(tiny_supernet, dataloader, max_batches=2, subnet=smallest))
    assert 0.0 <= value <= 1.0 and smallest != before and tiny_supernet.active_subnet == before

    # run_search wires a saved supernet, the preprocessor, make_miou_evaluator and evolutionary_search together.
    tiny_supernet.save_pretrained(tmp_path / "supernet")
    max_bitops = tiny_supernet.bitops_report(tiny_supernet.largest_subnet()).total_bitops
    front = run_search(
        str(tmp_path / "supernet"),
        dataset,
        output_dir=tmp_path / "search",
        population_size=4,
        generations=1,
        max_bitops=max_bitops,
        eval_batch_size=1,
        max_eval_batches=2,
        progress=False,
    )
    assert 1 <= len(front) and len(front.evaluated) <= 8
    assert all(0.0 <= e.mean_iou <= 1.0 and e.bitops <= max_bitops for e in front.evaluated)
    assert ParetoFront.load(tmp_path / "search" / "pareto_front.json").to_table() == front.to_table()
    assert (tmp_path / "search" / "pareto_front.png").read_bytes().startswith(PNG_SIGNATURE)
    # Provenance: the supernet's folder, and what it records (a SAM built in memory has no base model name).
    assert front.metadata["supernet"] == str(tmp_path / "supernet") and front.metadata["base_model"] is None
    assert front.metadata["dataset"] == {"name": SYNTHETIC_DATASET_NAME, "size": 2, "max_eval_batches": 2}
    assert 0.0 <= front.full_precision_mean_iou <= 1.0


def test_readers_of_a_saved_front_import_neither_pymoo_nor_matplotlib():
    code = (
        "import sys\n"
        "import mpsupernet.extraction, mpsupernet.hub, mpsupernet.search.front\n"
        "from mpsupernet.search import ParetoFront\n"
        "print(sorted(name for name in ('pymoo', 'matplotlib') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    # The lazy names still resolve, and only then load pymoo.
    code = "import sys, mpsupernet.search as s; s.evolutionary_search; print('pymoo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_parse_budget_names_the_argument_and_takes_numpy_numbers():
    with pytest.raises(ValueError, match=r"^`min_bitops` got 'abc': Budget 'abc' is not understood; give a positive"):
        parse_budget("abc", name="min_bitops")
    with pytest.raises(ValueError, match=r"^Budget 0.5 is not a positive number of BitOPs"):
        parse_budget(0.5)
    assert parse_budget(np.int64(2**40 + 1)) == 2**40 + 1
    assert parse_budget(np.float32(120.5)) == 120
    front = ParetoFront([entry(100, 0.5), entry(200, 0.6)])
    assert front.best_under(np.int64(150)).bitops == 100
