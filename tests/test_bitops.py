"""The analytic MACs/BitOPs count against torch.utils.flop_counter, on a tiny SAM and at ViT-B size."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mpsupernet import SamSupernetConfig, SamSupernetForMaskGeneration, count_bitops
from mpsupernet.architecture import CONV_PATHS
from mpsupernet.testing_utils import make_vit_b_sam_config

from conftest import make_tiny_sam


def counted_flops(model, pixel_values):
    """FLOPs of one image-encoder forward, per module, as torch's flop counter sees them.

    A first pass fills the quantized-weight cache, so that the counted pass runs only inference operations (the
    adapter merge B·A is weight preparation that an extracted subnet no longer does).
    """
    with torch.no_grad():
        model.get_image_embeddings(pixel_values)
        with FlopCounterMode(display=False) as counter:
            model.get_image_embeddings(pixel_values)
    return counter


@pytest.fixture(scope="module")
def eager_supernet():
    sam = make_tiny_sam(attn_implementation="eager")
    return SamSupernetForMaskGeneration.from_sam(sam, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def feature_size_supernet():
    """Eager attention and an elastic feature size: 64 (the base), 48 or 32 channels."""
    sam = make_tiny_sam(attn_implementation="eager")
    return SamSupernetForMaskGeneration.from_sam(
        sam, attn_implementation="eager", hidden_size_choices=[64, 48, 32]
    ).eval()


def assert_rows_match_flop_counter(model, arch, pixel_values):
    """Total and per-module MACs of the Linears and convolutions against the flop counter; each row's bits are the
    layer's own (32 for a float one)."""
    model.set_subnet(arch)
    counter = counted_flops(model, pixel_values)
    report = model.bitops_report(arch)
    assert counter.get_total_flops() == 2 * report.total_macs, arch.to_dict()
    per_module = counter.get_flop_counts()
    for row in report.rows:
        if row.kind == "attention":
            continue
        # Rows are named like their layers: the module path inside the encoder.
        module_flops = sum(per_module[f"ElasticSamVisionEncoder.{row.name}"].values())
        assert module_flops == 2 * row.macs, row.name
        weight_bits, activation_bits = arch.bits_of(row.name)
        expected_bits = (weight_bits if weight_bits < 16 else 32) * (activation_bits if activation_bits < 16 else 32)
        assert row.bitops == row.macs * expected_bits
    return report


def test_macs_match_flop_counter_on_sampled_tiny_subnets(eager_supernet):
    pixel_values = torch.randn(1, 3, 128, 128)
    archs = [eager_supernet.sample_subnet(seed) for seed in range(20)]
    archs += [eager_supernet.largest_subnet(), eager_supernet.smallest_subnet()]
    assert len({arch.resolution for arch in archs}) == 3 and len({arch.depth for arch in archs}) == 3
    conv_bits = {arch.bits_of("neck.conv2") for arch in archs}
    assert len(conv_bits) > 3 and all(32 not in bits for bits in conv_bits)  # the convolutions are quantized too
    for arch in archs:
        assert_rows_match_flop_counter(eager_supernet, arch, pixel_values)


def test_every_feature_size_matches_flop_counter(feature_size_supernet):
    model = feature_size_supernet
    space = model.search_space
    assert space.hidden_size_choices == (64, 48, 32)
    pixel_values = torch.randn(1, 3, 128, 128)
    sampled = [model.sample_subnet(seed) for seed in range(12)]
    assert {space.hidden_size_of(arch) for arch in sampled} == {64, 48, 32}
    for hidden_size in space.hidden_size_choices:
        uniform = [
            space.uniform(128, 4, 4, 256, 32, 32, hidden_size),
            space.uniform(96, 3, 3, 128, 4, 6, hidden_size),
        ]
        for arch in uniform + [a for a in sampled if space.hidden_size_of(a) == hidden_size]:
            report = assert_rows_match_flop_counter(model, arch, pixel_values)
            patch = next(row for row in report.rows if row.name == CONV_PATHS["patch_embed"])
            assert patch.macs == (arch.resolution // 16) ** 2 * hidden_size * 3 * 16 * 16
    assert space.smallest().hidden_size == 32 and space.largest().hidden_size is None


def test_bitops_follow_from_macs_and_bits(eager_supernet):
    arch = eager_supernet.sample_subnet(seed=7)
    report = eager_supernet.bitops_report(arch)
    assert report.total_bitops == sum(row.macs * row.weight_bits * row.activation_bits for row in report.rows)
    qkv_bits = dict(zip(arch.layer_names, arch.activation_bits))
    for row in report.rows:
        if row.name.endswith(("query_key", "probs_value")):
            block_qkv = row.name.rsplit(".", 2)[0] + ".attn.qkv"
            assert row.weight_bits == row.activation_bits == qkv_bits[block_qkv]
        if row.kind == "conv":
            assert (row.weight_bits, row.activation_bits) == arch.bits_of(row.name)
    assert report.attention_bitops == sum(r.bitops for r in report.rows if r.kind == "attention") > 0


def test_references_and_reductions(eager_supernet):
    space = eager_supernet.search_space
    full = eager_supernet.bitops_report(space.full_precision())
    assert full.total_bitops == full.full_precision_bitops == full.total_macs * 32 * 32
    assert full.reduction_vs_full_precision == 0.0
    w8a8 = eager_supernet.bitops_report(space.largest(8, 8))
    assert w8a8.total_bitops == w8a8.w8a8_bitops
    small = eager_supernet.bitops_report(space.smallest())
    assert 0 < small.total_bitops < w8a8.total_bitops < full.total_bitops
    assert small.reduction_vs_w8a8 == pytest.approx(1 - small.total_bitops / w8a8.total_bitops)
    summary = small.to_dict()
    assert summary["bitops"] == small.total_bitops and len(summary["rows"]) == len(small.rows)


def test_the_counter_prices_each_architecture_with_one_count_and_the_references_once(eager_supernet, monkeypatch):
    from mpsupernet import bitops

    config, space = eager_supernet.config, eager_supernet.search_space
    archs = [space.smallest(), space.largest(4, 8), space.sample(3)]
    expected = [count_bitops(config, arch).to_dict() for arch in archs]
    counted = []
    original = bitops.count_operations
    monkeypatch.setattr(bitops, "count_operations", lambda config, arch: counted.append(arch) or original(config, arch))
    counter = bitops.BitOpsCounter(config)
    assert counted[0] == space.full_precision() and set(counted[1].weight_bits) == {8} and len(counted) == 2
    for arch, report in zip(archs, expected):
        counted.clear()
        assert counter.report(arch).to_dict() == report
        assert counted == [arch]  # one count per price
    assert counter.bitops(archs[0]) == expected[0]["bitops"]
    with pytest.raises(ValueError, match="Resolution 80 is not in the search space"):
        counter.report(dataclasses.replace(archs[0], resolution=80))


def test_extraction_and_the_search_price_without_calling_the_model(tiny_sam, monkeypatch):
    from mpsupernet.search import evolutionary_search

    def refuse(*args, **kwargs):
        raise AssertionError("priced through the model")

    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(SamSupernetForMaskGeneration, "bitops_report", refuse)
    subnet = supernet.extract_subnet("30%")
    assert subnet.config.bitops <= 0.3 * subnet.config.bitops_report["full_precision_bitops"]
    front = evolutionary_search(
        supernet, lambda arch: 0.5, population_size=2, generations=0, progress=False, evaluate_full_precision=False
    )
    assert front.entries and all(entry.bitops > 0 for entry in front.entries)


def test_the_w8a8_reference_does_not_need_8_bits_in_the_space(tiny_sam, eager_supernet):
    space = eager_supernet.search_space
    w8a8 = eager_supernet.bitops_report(space.largest(8, 8))
    low = SamSupernetForMaskGeneration.from_sam(tiny_sam, weight_bit_choices=[2, 4], activation_bit_choices=[4, 6])
    report = low.bitops_report(low.largest_subnet())
    assert report.w8a8_bitops == w8a8.total_bitops


def test_float_bits_setting_changes_how_float_counts(tiny_sam):
    fp16 = SamSupernetForMaskGeneration.from_sam(tiny_sam, float_bits=16)
    report = fp16.bitops_report(fp16.full_precision_subnet())
    assert report.total_bitops == report.total_macs * 16 * 16


def test_a_config_without_the_convolutions_keeps_them_float(tiny_sam):
    """Configurations saved before the convolutions could be quantized list only Linears in `quantized_layers`."""
    saved = SamSupernetForMaskGeneration.from_sam(tiny_sam).config.to_dict()
    assert saved["quantized_layers"][-3:] == ["patch_embed", "neck_conv1", "neck_conv2"]
    saved["quantized_layers"] = ["qkv", "proj", "lin1", "lin2"]
    model = SamSupernetForMaskGeneration(SamSupernetConfig.from_dict(saved))
    arch = model.smallest_subnet()
    assert all(name.startswith("layers.") for name in arch.layer_names)
    convs = [row for row in model.bitops_report(arch).rows if row.kind == "conv"]
    assert len(convs) == 3 and all(row.weight_bits == row.activation_bits == 32 for row in convs)
    assert model.sam.vision_encoder.neck.conv1.weight_quantizer is None
    # Its checkpoint holds what such a supernet always held: no convolution quantizers, SAM's own conv names.
    conv_keys = {key for key in model.state_dict() if ".patch_embed." in key or ".neck.conv" in key}
    assert conv_keys == {
        "sam.vision_encoder.patch_embed.projection.weight",
        "sam.vision_encoder.patch_embed.projection.bias",
        "sam.vision_encoder.neck.conv1.weight",
        "sam.vision_encoder.neck.conv2.weight",
    }


def test_unquantized_attention_products_count_in_float(tiny_sam):
    model = SamSupernetForMaskGeneration.from_sam(tiny_sam, quantize_attention_products=False)
    report = model.bitops_report(model.smallest_subnet())
    products = [row for row in report.rows if row.name.endswith("query_key")]
    assert products and all(row.weight_bits == row.activation_bits == 32 for row in products)


def test_vit_b_largest_and_smallest_match_flop_counter_on_meta():
    config = SamSupernetConfig(
        **{k: v for k, v in make_vit_b_sam_config().to_dict().items() if k != "model_type"},
        attn_implementation="eager",
    )
    with torch.device("meta"):
        model = SamSupernetForMaskGeneration(config)
    pixel_values = torch.empty(1, 3, 1024, 1024, device="meta")
    for arch in (model.largest_subnet(), model.smallest_subnet()):
        model.set_subnet(arch)
        counter = counted_flops(model, pixel_values)
        assert counter.get_total_flops() == 2 * count_bitops(config, arch).total_macs
    # SAM ViT-B's image encoder: about 487 GMACs at 1024 px
    full = count_bitops(config, model.full_precision_subnet())
    assert 480e9 < full.total_macs < 495e9
