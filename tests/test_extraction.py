"""Extraction of standalone subnets: packing, budgets, BitOPs against torch's flop counter, equivalence, saving."""

import math
import os
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, AutoModelForMaskGeneration, SamModel

from mpsupernet import SamSubnetConfig, SamSubnetForMaskGeneration, SamSupernetForMaskGeneration, parse_budget
from mpsupernet.bitops import format_bitops
from mpsupernet.extraction import descent_path, extract_subnet
from mpsupernet.packing import pack_codes, packed_size, unpack_codes
from mpsupernet.quantization import integer_range
from mpsupernet.subnet_layers import QuantizedConv2d, QuantizedLinear
from mpsupernet.testing_utils import make_sam_config

from conftest import assert_same_output, drop_weights_digest, make_tiny_sam, run


def prepare_supernet(sam: SamModel, **overrides) -> SamSupernetForMaskGeneration:
    """A supernet with random adapters (so that merging them matters), its activation steps calibrated at all bits."""
    supernet = SamSupernetForMaskGeneration.from_sam(sam, **overrides).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in supernet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    supernet.calibrate_quantizers(torch.randn(1, 3, 128, 128, generator=generator), weight_bits=8)
    return supernet


@pytest.fixture(scope="module")
def supernet():
    """The tiny SAM's supernet (sdpa attention), calibrated."""
    return prepare_supernet(make_tiny_sam())


@pytest.fixture(scope="module")
def wide_supernet():
    """A supernet whose encoder dominates the model (hidden size 128) and whose attention is eager.

    In the tiny SAM the float patch embedding, neck and mask decoder weigh as much as the encoder blocks, so neither
    a 5% budget nor a 3x smaller file is reachable; with twice the hidden size both are.
    """
    sam = make_tiny_sam(attn_implementation="eager", hidden_size=128)
    return prepare_supernet(sam, attn_implementation="eager")


# --- packing ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_round_trips_every_bit_width(bits):
    q_min, q_max = integer_range(bits, signed=True)
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(q_min, q_max + 1, (37, 13), generator=generator).to(torch.int8)
    codes[0, :3] = torch.tensor([q_min, q_max, 0])
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_size(codes.numel(), bits) == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)
    # bits really shrink: against one int8 byte per code
    large = torch.zeros(1024, dtype=torch.int8)
    assert pack_codes(large, bits).numel() == 1024 * bits // 8
    single = torch.tensor([q_min], dtype=torch.int8)
    assert torch.equal(unpack_codes(pack_codes(single, bits), bits, (1,)), single)


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match=r"outside the 3-bit range \[-4, 3\]"):
        pack_codes(torch.tensor([4], dtype=torch.int8), 3)
    with pytest.raises(ValueError, match=r"9 bits cannot be packed; allowed bit-widths: \[2, 3, 4, 5, 6, 7, 8\]"):
        pack_codes(torch.tensor([1], dtype=torch.int8), 9)
    with pytest.raises(ValueError, match=r"10 codes of 4 bits need a 1-D uint8 tensor of 5 bytes"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 4, (10,))


# --- budgets and BitOPs ----------------------------------------------------------------------------------------------
def bitops_counted_by_torch(subnet: SamSubnetForMaskGeneration, pixel_values: torch.Tensor) -> int:
    """BitOPs of the subnet's image encoder from `FlopCounterMode`: per module, FLOPs / 2 times the module's own bits.

    Bits come from the extracted modules (a plain Linear or convolution is float). The act×act products are what
    an attention module counts besides its Linears; the relative-position part of them (query × float table) is
    measured by running once more without it.
    """
    encoder = subnet.sam.vision_encoder
    float_bits = subnet.config.float_bits

    def bits(value):
        return float_bits if value >= 16 else value

    def flops_per_module():
        with FlopCounterMode(display=False) as counter:
            encoder(pixel_values)
        counts = counter.get_flop_counts()
        return {name.split(".", 1)[1]: sum(ops.values()) for name, ops in counts.items() if "." in name}, sum(
            counts["Global"].values()
        )

    with torch.no_grad():
        encoder(pixel_values)  # fills the dequantized-weight caches: the counted pass only runs inference
        flops, total = flops_per_module()
        for layer in encoder.layers:
            layer.attn.use_rel_pos = False
        flops_without_rel_pos, _ = flops_per_module()
        for layer in encoder.layers:
            layer.attn.use_rel_pos = True

    def layer_bits(module):
        if isinstance(module, QuantizedLinear):  # QuantizedConv2d included
            return bits(module.weight_bits) * bits(module.activation_bits)
        return float_bits * float_bits

    bitops = counted = 0
    for path in ("patch_embed.projection", "neck.conv1", "neck.conv2"):
        bitops += flops[path] // 2 * layer_bits(encoder.get_submodule(path))
        counted += flops[path]
    for index, layer in enumerate(encoder.layers):
        prefix = f"layers.{index}"
        for path in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"):
            linear = layer.get_submodule(path)
            weight_bits, activation_bits = (
                (linear.weight_bits, linear.activation_bits) if isinstance(linear, QuantizedLinear) else (32, 32)
            )
            bitops += flops[f"{prefix}.{path}"] // 2 * bits(weight_bits) * bits(activation_bits)
            counted += flops[f"{prefix}.{path}"]
        products = flops[f"{prefix}.attn"] - flops[f"{prefix}.attn.qkv"] - flops[f"{prefix}.attn.proj"]
        without = flops_without_rel_pos[f"{prefix}.attn"] - flops[f"{prefix}.attn.qkv"] - flops[f"{prefix}.attn.proj"]
        product_bits = bits(layer.attn.query_quantizer.active_bits)
        bitops += without // 2 * product_bits * product_bits + (products - without) // 2 * float_bits * product_bits
        counted += products
    assert counted == total, "some FLOPs were not attributed to a module"
    return bitops


@pytest.mark.parametrize("budget", ["5%", "20%", 30_000_000_000, "12.5G"])
def test_budget_gives_a_subnet_within_it_whose_bitops_torch_confirms(wide_supernet, budget):
    supernet = wide_supernet
    full_precision = supernet.bitops_report(supernet.full_precision_subnet()).total_bitops
    max_bitops = parse_budget(budget, full_precision)
    subnet = supernet.extract_subnet(budget)
    assert isinstance(subnet.config.bitops, int) and subnet.config.bitops <= max_bitops
    pixel_values = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    assert bitops_counted_by_torch(subnet, pixel_values) == subnet.config.bitops
    arch = subnet.architecture
    assert subnet.bitops_report().to_dict() == supernet.bitops_report(arch).to_dict()
    assert subnet.config.bitops_report == supernet.bitops_report(arch).summary()

    inputs = {
        "pixel_values": torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3)),
        "input_boxes": torch.tensor([[[10.0, 12.0, 90.0, 100.0]], [[30.0, 5.0, 120.0, 64.0]]]),
    }
    supernet.set_subnet(arch)
    assert_same_output(run(supernet, inputs), run(subnet, inputs))


def test_budgets_pick_deterministic_descending_architectures(wide_supernet):
    space = wide_supernet.search_space
    path = list(descent_path(space))
    costs = [wide_supernet.bitops_report(arch).total_bitops for arch in path]
    assert path[0] == space.full_precision() and path[-1] == space.smallest()
    assert costs == sorted(costs, reverse=True)
    # bits go down before any width
    first_narrow = next(i for i, arch in enumerate(path) if arch.mlp_dims != path[0].mlp_dims)
    assert path[first_narrow - 1].weight_bits[0] == min(space.weight_bit_choices)
    assert path[first_narrow - 1].activation_bits[0] == min(space.activation_bit_choices)
    assert list(descent_path(space)) == path


class FakeParetoFront:
    """What extraction needs of `mpsupernet.search.ParetoFront`: `best_under` returning an entry or None."""

    def __init__(self, entry):
        self.entry, self.budgets = entry, []

    def best_under(self, max_bitops):
        self.budgets.append(max_bitops)
        return self.entry if self.entry is not None and self.entry.bitops <= max_bitops else None


class FakeEntry:
    def __init__(self, architecture, bitops):
        self.architecture, self.bitops, self.mean_iou = architecture, bitops, 0.5


def test_pareto_front_choice_is_extracted(supernet):
    arch = supernet.sample_subnet(seed=4)
    bitops = supernet.bitops_report(arch).total_bitops
    front = FakeParetoFront(FakeEntry(arch.to_dict(), bitops))
    subnet = supernet.extract_subnet(bitops + 10, pareto_front=front)
    assert subnet.architecture == arch and front.budgets == [bitops + 10]
    supernet.pareto_front = front
    try:
        assert supernet.extract_subnet("100%").architecture == arch
        with pytest.raises(ValueError, match=r"Pareto front has no architecture under the budget"):
            supernet.extract_subnet(bitops - 1)
    finally:
        del supernet.pareto_front


@pytest.mark.parametrize(
    "overrides, detail",
    [
        ({"weight_bit_choices": [4, 8]}, r"`weight_bits` of layers\.\d\.\w+\.\w+ is (2|3|6); allowed: \[4, 8, 32\]"),
        ({"quantized_layers": ["qkv", "proj"]}, r"The architecture quantizes layers \['layers.0.attn.qkv', "),
    ],
)
def test_a_pareto_front_of_another_supernet_is_refused_as_such(supernet, tmp_path, overrides, detail):
    arch = supernet.search_space.smallest()
    front = FakeParetoFront(FakeEntry(arch.to_dict(), supernet.bitops_report(arch).total_bitops))
    other = SamSupernetForMaskGeneration.from_sam(make_tiny_sam(), **overrides)
    message = r"The Pareto front's choice under '100%' does not fit this supernet \(" + detail
    with pytest.raises(ValueError, match=message + r".*\): the front was made for another supernet configuration"):
        other.extract_subnet("100%", pareto_front=front, save_directory=tmp_path / "subnet")
    assert not (tmp_path / "subnet").exists()


def test_parse_budget_reads_numbers_prefixes_and_shares():
    full_precision = 1794100690944
    assert parse_budget(35e9) == parse_budget("35e9") == parse_budget("35G") == 35_000_000_000
    assert parse_budget("1.5T") == parse_budget("1.5 TBitOPs") == 1_500_000_000_000
    assert parse_budget("900M") == parse_budget(" 900 m ") == 900_000_000
    assert parse_budget(120.9) == 120  # rounded down: never above the budget
    assert parse_budget("5%", full_precision) == full_precision * 5 // 100
    assert parse_budget("100%", full_precision) == full_precision
    with pytest.raises(ValueError, match=r"'5%' is a share of the full-precision model, whose BitOPs are not known"):
        parse_budget("5%")
    for bad in (True, None, float("nan"), "1..2G", "12 apples", "0.4"):
        with pytest.raises(ValueError, match=r"Budget .* give a positive number of BitOPs"):
            parse_budget(bad, full_precision)


@pytest.mark.parametrize(
    "budget, message",
    [
        ("abc", r"Budget 'abc' is not understood; give a positive number of BitOPs .*'120G'.* such as '5%'"),
        (0, r"Budget 0 is not a positive number of BitOPs"),
        (-5, r"Budget -5 is not a positive number of BitOPs"),
        ("0%", r"Budget '0%' is a share outside \(0%, 100%\]"),
        ("150%", r"Budget '150%' is a share outside \(0%, 100%\]"),
        ("0.05%", r"below the cheapest subnet .* smallest reachable BitOPs is 42.6 MBitOPs \(\"42598400\"\)"),
        (1000, r"Budget 1000 \(1000 BitOPs\) is below the cheapest subnet"),
    ],
)
def test_bad_budget_is_rejected_and_writes_nothing(wide_supernet, tmp_path, budget, message):
    target = tmp_path / "subnet"
    with pytest.raises(ValueError, match=message):
        wide_supernet.extract_subnet(budget, save_directory=target)
    assert not target.exists()


@pytest.mark.parametrize("as_budget", [np.int64, np.float64, torch.tensor, np.array], ids=["int64", "float64", "tensor", "array"])
def test_numpy_and_tensor_budgets_extract_as_numbers(wide_supernet, as_budget):
    budget = parse_budget("20%", wide_supernet.bitops_report(wide_supernet.full_precision_subnet()).total_bitops)
    subnet = wide_supernet.extract_subnet(as_budget(budget))
    assert subnet.architecture == wide_supernet.extract_subnet(budget).architecture
    assert subnet.config.bitops <= budget


def test_format_bitops():
    assert format_bitops(1794100690944, exact=True) == '1.79 TBitOPs ("1794100690944")'
    assert format_bitops(1794100690944) == "1.79 TBitOPs"
    assert format_bitops(512, exact=True) == '512 BitOPs ("512")'


# --- equivalence -----------------------------------------------------------------------------------------------------
def test_sampled_subnets_reproduce_the_supernet(supernet, prompt_inputs):
    archs = [supernet.sample_subnet(seed) for seed in (0, 2, 5, 8)]
    assert any(arch.skipped_blocks for arch in archs)
    assert any(min(arch.num_heads) < 4 for arch in archs)
    assert any(arch.resolution < 128 for arch in archs)
    for arch in archs:
        subnet = extract_subnet(supernet, arch)
        layers = subnet.sam.vision_encoder.layers
        assert len(layers) == arch.depth  # skipped blocks are gone, not skipped
        for layer, block in zip(layers, arch.kept_blocks):
            heads, mlp_dim = arch.num_heads[block], arch.mlp_dims[block]
            assert layer.attn.num_attention_heads == heads
            assert float_shape(layer.attn.qkv) == (3 * heads * 16, 64)
            assert float_shape(layer.attn.proj) == (64, heads * 16)
            assert float_shape(layer.mlp.lin1) == (mlp_dim, 64) and float_shape(layer.mlp.lin2) == (64, mlp_dim)
            source = supernet.sam.vision_encoder.layers[block]
            supernet.set_subnet(arch)
            for path, linear in source.quantized_linears().items():
                target = layer.get_submodule(path)
                assert target.weight_bits == arch.bits_of(f"layers.{block}.{path}")[0]
                assert target.packed_weight.dtype == torch.uint8
                with torch.no_grad():
                    assert torch.equal(target.dequantized_weight(), linear.quantized_weight())
        supernet.set_subnet(arch)
        assert_same_output(run(supernet, prompt_inputs), run(subnet, prompt_inputs))
        assert subnet.bitops_report().to_dict() == supernet.bitops_report(arch).to_dict()


def test_quantized_convolutions_are_stored_as_packed_codes(supernet, prompt_inputs):
    arch = supernet.sample_subnet(seed=3)
    subnet = extract_subnet(supernet, arch)
    source, target = supernet.sam.vision_encoder, subnet.sam.vision_encoder
    supernet.set_subnet(arch)
    for path in ("patch_embed.projection", "neck.conv1", "neck.conv2"):
        conv = target.get_submodule(path)
        assert isinstance(conv, QuantizedConv2d) and conv.packed_weight.dtype == torch.uint8
        assert (conv.weight_bits, conv.activation_bits) == arch.bits_of(path)
        assert conv.packed_weight.numel() == packed_size(math.prod(conv.weight_shape), conv.weight_bits)
        with torch.no_grad():
            assert torch.equal(conv.dequantized_weight(), source.get_submodule(path).quantized_weight())
    assert_same_output(run(supernet, prompt_inputs), run(subnet, prompt_inputs))


@pytest.fixture(scope="module")
def feature_size_supernet():
    """The tiny SAM's supernet with an elastic feature size (64, 48 or 32 channels), calibrated."""
    return prepare_supernet(make_tiny_sam(), hidden_size_choices=[64, 48, 32])


def test_reduced_feature_size_subnets_reproduce_the_supernet(feature_size_supernet, prompt_inputs, tmp_path):
    supernet = feature_size_supernet
    space = supernet.search_space
    archs = [space.uniform(128, 4, 4, 256, 8, 8, 48), space.smallest()]
    archs += [arch for arch in map(supernet.sample_subnet, range(8)) if arch.hidden_size is not None][:2]
    assert {arch.hidden_size for arch in archs} == {48, 32}
    for arch in archs:
        subnet = extract_subnet(supernet, arch)
        hidden = arch.hidden_size
        encoder = subnet.sam.vision_encoder
        assert encoder.pos_embed.shape[-1] == hidden and encoder.neck.conv1.in_features == hidden
        assert encoder.patch_embed.projection.out_features == hidden
        for layer, block in zip(encoder.layers, arch.kept_blocks):
            assert layer.layer_norm1.normalized_shape == (hidden,)
            assert float_shape(layer.attn.qkv) == (3 * arch.num_heads[block] * 16, hidden)
            assert float_shape(layer.mlp.lin2) == (hidden, arch.mlp_dims[block])
        supernet.set_subnet(arch)
        assert_same_output(run(supernet, prompt_inputs), run(subnet, prompt_inputs))
        assert subnet.bitops_report().to_dict() == supernet.bitops_report(arch).to_dict()
    subnet.save_pretrained(tmp_path)
    loaded = SamSubnetForMaskGeneration.from_pretrained(tmp_path).eval()
    assert loaded.architecture.to_dict() == arch.to_dict() and loaded.config.architecture["hidden_size"] == 32
    assert torch.equal(run(loaded, prompt_inputs).pred_masks, run(subnet, prompt_inputs).pred_masks)
    with pytest.raises(ValueError, match=r"Feature size is not uniform .* keeps 32 channels"):
        extract_subnet(supernet, space.uniform(128, 4, 4, 256, 8, 32, 32)).to_sam_model()


def float_shape(linear):
    with torch.no_grad():
        return tuple(linear.dequantized_weight().shape)


def test_extraction_leaves_the_active_subnet(supernet):
    active = supernet.sample_subnet(seed=1)
    supernet.set_subnet(active)
    extract_subnet(supernet, supernet.smallest_subnet())
    assert supernet.active_subnet == active


def test_uncalibrated_activation_step_is_reported(tiny_sam):
    fresh = SamSupernetForMaskGeneration.from_sam(tiny_sam)
    with pytest.raises(
        ValueError, match=r"8-bit step size of the input quantizer of patch_embed.projection was never calib"
    ):
        extract_subnet(fresh, fresh.largest_subnet())


# --- saving and loading ----------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(supernet, prompt_inputs, tmp_path):
    arch = supernet.sample_subnet(seed=2)
    subnet = extract_subnet(supernet, arch)
    expected = run(subnet, prompt_inputs)
    subnet.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        name = "sam.vision_encoder.layers.0.mlp.lin1.packed_weight"
        packed = weights.get_tensor(name)
    lin1 = subnet.sam.vision_encoder.layers[0].mlp.lin1
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(64 * lin1.out_features, lin1.weight_bits)
    for loader in (SamSubnetForMaskGeneration, AutoModel, AutoModelForMaskGeneration):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, SamSubnetForMaskGeneration) and isinstance(loaded.config, SamSubnetConfig)
        state, loaded_state = subnet.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        for key in state:
            assert torch.equal(loaded_state[key], state[key]), key
        output = run(loaded, prompt_inputs)
        assert torch.equal(output.pred_masks, expected.pred_masks) and torch.equal(
            output.iou_scores, expected.iou_scores
        )
    assert loaded.config.bitops == supernet.bitops_report(arch).total_bitops
    assert loaded.bitops_report().to_dict() == supernet.bitops_report(arch).to_dict()


def test_a_checkpoint_of_another_model_type_is_refused_by_name(supernet, tmp_path):
    supernet.save_pretrained(tmp_path / "supernet")
    extract_subnet(supernet, supernet.smallest_subnet()).save_pretrained(tmp_path / "subnet")
    make_tiny_sam().save_pretrained(tmp_path / "sam")
    refused = [
        (SamSubnetForMaskGeneration, "supernet", "`sam_supernet` checkpoint, not a `sam_subnet` one: load the supernet "
         "with `SamSupernetForMaskGeneration.from_pretrained` and extract a subnet with its `extract_subnet\\(budget\\)`"),
        (SamSupernetForMaskGeneration, "subnet", "`sam_subnet` checkpoint, not a `sam_supernet` one: load an extracted "
         "subnet with `SamSubnetForMaskGeneration.from_pretrained`, or a tiers folder with `mpsupernet.load_subnet`"),
        (SamSupernetForMaskGeneration, "sam", "`sam` checkpoint, not a `sam_supernet` one: a plain SAM becomes a "
         "supernet with `SamSupernetForMaskGeneration.from_sam`"),
        (SamSubnetForMaskGeneration, "sam", "`sam` checkpoint, not a `sam_subnet` one"),
    ]
    for loader, folder, message in refused:
        with pytest.raises(ValueError, match=f"^'{re.escape(str(tmp_path / folder))}' holds a {message}"):
            loader.from_pretrained(tmp_path / folder)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "supernet"), SamSupernetForMaskGeneration)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "subnet"), SamSubnetForMaskGeneration)


def test_low_bit_subnet_file_is_a_third_of_float(wide_supernet, tmp_path):
    space = wide_supernet.search_space
    sizes = {}
    for name, arch in (("w4a8", space.largest(weight_bits=4, activation_bits=8)), ("float", space.full_precision())):
        extract_subnet(wide_supernet, arch).save_pretrained(tmp_path / name)
        sizes[name] = os.path.getsize(tmp_path / name / "model.safetensors")
    assert sizes["w4a8"] <= sizes["float"] / 3, sizes


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors_is_reported(supernet, tmp_path, damage):
    extract_subnet(supernet, supernet.smallest_subnet()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a tensor" * 8)
    with pytest.raises(OSError, match=r"The weights of .* do not match its config: config.json records sha256 [0-9a-f]{64} for 'model.safetensors', but the file has sha256 [0-9a-f]{64}\. The file is damaged"):
        SamSubnetForMaskGeneration.from_pretrained(tmp_path)
    drop_weights_digest(tmp_path)  # as an older save, without digests: safetensors itself finds the damage
    with pytest.raises(OSError, match=r"not a readable safetensors file \(corrupted or truncated"):
        SamSubnetForMaskGeneration.from_pretrained(tmp_path)


# --- plain SamModel ---------------------------------------------------------------------------------------------------
def test_to_sam_model_reproduces_a_uniform_float_activation_subnet(supernet, prompt_inputs):
    space = supernet.search_space
    for depth in (4, 3):
        arch = space.largest(weight_bits=4, activation_bits=32)
        arch = arch.__class__(**{**arch.__dict__, "skipped_blocks": space.skipped_blocks(depth)})
        subnet = extract_subnet(supernet, arch)
        sam = subnet.to_sam_model()
        assert type(sam) is SamModel and len(sam.vision_encoder.layers) == depth
        kept = arch.kept_blocks
        assert sam.config.vision_config.global_attn_indexes == [kept.index(block) for block in (1, 3)]
        assert_same_output(run(subnet, prompt_inputs), run(sam, prompt_inputs))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_heads": (2, 4, 4, 4)}, r"Heads are not uniform: the kept blocks \[0, 1, 2, 3\] keep \[2, 4, 4, 4\]"),
        ({"mlp_dims": (128, 256, 256, 256)}, r"MLP width is not uniform: .* keep \[128, 256, 256, 256\] units"),
        ({"resolution": 64}, r"Resolution is not uniform .* runs at 64 px, .* base image size 128"),
    ],
)
def test_to_sam_model_rejects_non_uniform_subnets(supernet, change, message):
    arch = supernet.largest_subnet()
    subnet = extract_subnet(supernet, arch.__class__(**{**arch.__dict__, **change}))
    with pytest.raises(ValueError, match=message):
        subnet.to_sam_model()


# --- configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a: a.update(skipped_blocks=[1], depth=3),
            r"skips blocks \[1\]; only distinct windowed blocks .*\[0, 2\]",
        ),
        (lambda a: a.update(resolution=100), r"resolution is 100; it must be a multiple of the patch size 16"),
        (lambda a: a["weight_bits"].update({"layers.0.attn.qkv": 9}), r"`weight_bits` of layers.0.attn.qkv is 9"),
        (
            lambda a: (a.pop("depth"), a.update(num_heads=[4, 4, 4])),
            r"gives 3 head counts and 4 MLP widths; .* 4 blocks",
        ),
    ],
)
def test_subnet_config_rejects_an_architecture_that_does_not_fit(supernet, change, message):
    architecture = supernet.largest_subnet().to_dict()
    change(architecture)
    sam_config = make_sam_config().to_dict()
    with pytest.raises(ValueError, match=message):
        SamSubnetConfig(
            **{key: sam_config[key] for key in ("vision_config", "prompt_encoder_config", "mask_decoder_config")},
            architecture=architecture,
        )


def test_extraction_and_forward_under_inference_mode(supernet, prompt_inputs):
    """Weights made under `torch.inference_mode` carry no version counter; the weight caches must cope."""
    arch = supernet.sample_subnet(seed=4)
    supernet.set_subnet(arch)
    expected = run(supernet, prompt_inputs)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(supernet(**prompt_inputs).pred_masks, expected.pred_masks)
        subnet = extract_subnet(supernet, arch)
        for _ in range(2):
            assert torch.equal(subnet(**prompt_inputs).pred_masks, expected.pred_masks)
