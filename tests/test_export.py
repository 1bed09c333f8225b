"""ONNX export of subnets: quantizer codes, per-layer exactness, integer kernels, end-to-end agreement, bytes, refusals."""

import copy
import dataclasses
import json
import math
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from mpsupernet import SamSubnetForMaskGeneration, SamSupernetForMaskGeneration  # noqa: E402
from mpsupernet.cli import main  # noqa: E402
from mpsupernet.data import make_synthetic_segmentation_dataset  # noqa: E402
from mpsupernet.data.processing import SamSegmentationPreprocessor, collate_fn  # noqa: E402
from mpsupernet.metrics import evaluate_mean_iou  # noqa: E402
from mpsupernet.export import writer  # noqa: E402
from mpsupernet.export.graphs import ActivationQuantizerGraph, AttentionGraph, ConvGraph, LinearGraph  # noqa: E402
from mpsupernet.export.ops import ONNX_TRANSLATIONS  # noqa: E402
from mpsupernet.extraction import extract_subnet  # noqa: E402
from mpsupernet.layout import STAGING_MARKER  # noqa: E402
from mpsupernet.metrics import mask_iou  # noqa: E402
from mpsupernet.packing import pack_codes  # noqa: E402
from mpsupernet.pretrained import load_sam  # noqa: E402
from mpsupernet.quantization import LsqQuantizer, integer_range  # noqa: E402
from mpsupernet.runtime import OnnxSamModel  # noqa: E402
from mpsupernet.subnet_layers import QuantizedConv2d, QuantizedLinear  # noqa: E402

from conftest import TEST_SAM, make_tiny_sam  # noqa: E402

INTEGER_MATMULS = {"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul"}


def run_in_onnxruntime(module: nn.Module, inputs: tuple, folder) -> list[np.ndarray]:
    """Exports `module` with the package's op translations and runs it in onnxruntime with the export's settings
    (without `session.qdq_matmulnbits_accuracy_level=0`, a float-input Linear on int8 codes runs as MatMulNBits
    with int8-quantized inputs, off by 1e-2)."""
    path = folder / "module.onnx"
    program = torch.onnx.export(
        module.eval(), inputs, dynamo=True, opset_version=21, custom_translation_table=ONNX_TRANSLATIONS, verbose=False
    )
    program.save(path)
    settings = writer.ONNXRUNTIME_SETTINGS
    options = ort.SessionOptions()
    for key, value in settings["session_config_entries"].items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=settings["disabled_optimizers"]
    )
    return session.run(None, {node.name: x.numpy() for node, x in zip(session.get_inputs(), inputs)})


@pytest.fixture(scope="module")
def tiny_w8a8_subnet():
    """A W8A8 subnet of a tiny calibrated supernet (4 blocks, two of them global)."""
    supernet = SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    return extract_subnet(supernet, supernet.search_space.largest(8, 8)).eval()


# --- quantizer semantics ---------------------------------------------------------------------------------------------
QUANTIZER_CASES = [(bits, signed, offset) for bits in range(2, 9) for signed in (True, False) for offset in (False, True)]


def test_export_op_gives_the_integer_codes_of_lsq(tmp_path):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 2 + 0.7
    quantizers, expected = [], []
    for bits, signed, offset in QUANTIZER_CASES:
        quantizer = LsqQuantizer([bits], signed=signed, learn_offset=offset)
        quantizer.set_bits(bits)
        with torch.no_grad():
            quantizer.initialize(x, bits)
            fake = quantizer(x)
        step = float(quantizer.step_size.detach()[0, 0])
        shift = float(quantizer.offset.detach()[0, 0]) if offset else 0.0
        # the codes LSQ used, read back from its fake-quantized output; and which inputs sit near a .5 tie
        codes = torch.round((fake.double() - shift) / step).long()
        scaled = (x.double() - shift) / step
        away_from_ties = (scaled - scaled.floor() - 0.5).abs() > 1e-3
        quantizers.append(quantizer)
        expected.append((codes, away_from_ties, integer_range(bits, signed)))

    class Codes(nn.Module):
        def __init__(self):
            super().__init__()
            self.graphs = nn.ModuleList(ActivationQuantizerGraph(q) for q in quantizers)

        def forward(self, x):
            return tuple(graph.codes(x) for graph in self.graphs)

    module = Codes()
    onnx_codes = run_in_onnxruntime(module, (x,), tmp_path)
    torch_codes = module(x)
    for (bits, signed, offset), exported, eager, (codes, keep, (q_min, q_max)) in zip(
        QUANTIZER_CASES, onnx_codes, torch_codes, expected
    ):
        case = f"{bits} bits, signed={signed}, offset={offset}"
        # signed grids are stored shifted by 2^(b-1) in uint8
        assert exported.dtype == np.uint8, case
        assert codes.min() >= q_min and codes.max() <= q_max and codes.unique().numel() > 1, case
        assert keep.float().mean() > 0.99, case
        assert np.array_equal(exported.astype(np.int64)[keep.numpy()] + q_min, codes[keep].numpy()), case
        assert torch.equal(eager.long()[keep] + q_min, codes[keep]), case


# --- per layer -------------------------------------------------------------------------------------------------------
LINEAR_CASES = [(w, a, True) for w in range(2, 9) for a in range(4, 9)] + [
    (32, 8, True),
    (4, 32, True),
    (8, 8, False),
    (4, 4, False),
]


def make_linear(weight_bits, activation_bits, offset, calibration, seed) -> QuantizedLinear:
    """A `QuantizedLinear` with random codes and scales and its input step set from `calibration`."""
    config = SimpleNamespace(activation_offset=offset, step_size_min=1e-8)
    linear = QuantizedLinear(48, 40, True, weight_bits, activation_bits, config)
    return fill_randomly(linear, calibration, seed)


def fill_randomly(layer: QuantizedLinear, calibration: torch.Tensor, seed: int) -> QuantizedLinear:
    """Random codes and scales (or a random float weight), a random bias, the input step set from `calibration`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight_bits >= 16:
            layer.weight.copy_(torch.randn(layer.weight_shape, generator=generator) * 0.1)
        else:
            q_min, q_max = integer_range(layer.weight_bits, signed=True)
            codes = torch.randint(q_min, q_max + 1, layer.weight_shape, generator=generator, dtype=torch.int8)
            layer.packed_weight.copy_(pack_codes(codes, layer.weight_bits))
            layer.weight_scale.copy_(torch.rand(layer.out_features, generator=generator) * 0.02 + 0.005)
        layer.bias.copy_(torch.randn(layer.out_features, generator=generator) * 0.1)
        if layer.activation_bits < 16:
            layer.input_quantizer.initialize(calibration, layer.activation_bits)
    return layer.eval()


def test_exported_linears_match_pytorch_at_every_bit_width(tmp_path):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 48, generator=generator) * 1.5 + 0.4
    linears = [make_linear(*case, calibration=x, seed=i) for i, case in enumerate(LINEAR_CASES)]

    class Linears(nn.Module):
        def __init__(self):
            super().__init__()
            self.graphs = nn.ModuleList(LinearGraph(linear) for linear in linears)

        def forward(self, x):
            return tuple(graph(x) for graph in self.graphs)

    outputs = run_in_onnxruntime(Linears(), (x,), tmp_path)
    for case, linear, output in zip(LINEAR_CASES, linears, outputs):
        with torch.no_grad():
            reference = linear(x).numpy()
        scale = np.abs(reference).max()
        assert np.abs(output - reference).max() <= 1e-5 * scale, f"W{case[0]}A{case[1]} offset={case[2]}"


CONV_CASES = [
    # (weight_bits, activation_bits, offset, kernel_size, stride, padding): the patch embedding's and the neck's shapes
    (8, 8, True, 4, 4, 0),
    (4, 6, True, 1, 1, 0),
    (3, 4, True, 3, 1, 1),
    (8, 4, False, 3, 1, 1),
    (32, 8, True, 3, 1, 1),
    (2, 32, True, 4, 4, 0),
]


def make_conv(weight_bits, activation_bits, offset, kernel_size, stride, padding, calibration, seed) -> QuantizedConv2d:
    """A `QuantizedConv2d` (12 -> 10 channels) with random codes and scales, its input step set from `calibration`."""
    config = SimpleNamespace(activation_offset=offset, step_size_min=1e-8)
    conv = QuantizedConv2d(12, 10, kernel_size, stride, padding, True, weight_bits, activation_bits, config)
    return fill_randomly(conv, calibration, seed)


def test_exported_convolutions_match_pytorch_at_every_bit_width(tmp_path):
    """The patch embedding and neck convolutions, padded ones with an LSQ+ offset included (the offset comes back
    through a per-position map there: padded taps see 0, not the offset)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 8, 8, generator=generator) * 1.5 + 0.4
    convs = [make_conv(*case, calibration=x, seed=i) for i, case in enumerate(CONV_CASES)]

    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.graphs = nn.ModuleList(ConvGraph(conv, input_size=8) for conv in convs)

        def forward(self, x):
            return tuple(graph(x) for graph in self.graphs)

    outputs = run_in_onnxruntime(Convs(), (x,), tmp_path)
    for case, conv, output in zip(CONV_CASES, convs, outputs):
        with torch.no_grad():
            reference = conv(x).numpy()
        assert output.shape == reference.shape
        scale = np.abs(reference).max()
        assert np.abs(output - reference).max() <= 1e-5 * scale, f"W{case[0]}A{case[1]} offset={case[2]} k={case[3]}"
    assert abs(convs[2].input_quantizer.offset.item()) > 0.1  # the padded case has an offset to bring back


def test_reduced_feature_size_subnet_exports_and_agrees(tmp_path):
    """A subnet at half the feature size, convolutions quantized: the exported encoder computes what PyTorch does."""
    supernet = SamSupernetForMaskGeneration.from_sam(make_tiny_sam(), hidden_size_choices=[64, 32]).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    arch = supernet.search_space.uniform(128, 4, 4, 256, 8, 8, hidden_size=32)
    subnet = extract_subnet(supernet, arch).eval()
    subnet.export_onnx(tmp_path / "onnx", verify=False)
    pixel_values = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quantized = subnet.get_image_embeddings(pixel_values).numpy()
        supernet.set_subnet(dataclasses.replace(arch, weight_bits=(32,) * 19, activation_bits=(32,) * 19))
        full_precision = supernet.get_image_embeddings(pixel_values).numpy()
    exported = OnnxSamModel.from_pretrained(tmp_path / "onnx").get_image_embeddings(pixel_values.numpy())
    assert exported.shape == quantized.shape
    assert np.abs(exported - quantized).mean() <= 0.1 * np.abs(quantized - full_precision).mean()


def test_exported_attention_blocks_match_pytorch_at_a8(tiny_w8a8_subnet, tmp_path):
    layers = tiny_w8a8_subnet.sam.vision_encoder.layers
    windowed, global_ = layers[0].attn, layers[1].attn
    assert windowed.probs_quantizer.active_bits == 8 and windowed.value_quantizer.offset is not None
    inputs = {}

    def keep_input(module, args, kwargs):
        inputs[module] = kwargs["hidden_states"]

    hooks = [attention.register_forward_pre_hook(keep_input, with_kwargs=True) for attention in (windowed, global_)]
    with torch.no_grad():
        tiny_w8a8_subnet.get_image_embeddings(torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)))
    for hook in hooks:
        hook.remove()

    class Attentions(nn.Module):
        def __init__(self):
            super().__init__()
            self.windowed, self.global_ = AttentionGraph(windowed), AttentionGraph(global_)

        def forward(self, windows, grid):
            return self.windowed(windows)[0], self.global_(grid)[0]

    outputs = run_in_onnxruntime(Attentions(), (inputs[windowed], inputs[global_]), tmp_path)
    for attention, output in zip((windowed, global_), outputs):
        with torch.no_grad():
            reference = attention(inputs[attention])[0].numpy()
        assert np.abs(output - reference).max() <= 1e-5 * np.abs(reference).max()


# --- structure -------------------------------------------------------------------------------------------------------
def integer_matmul_count(path, tmp_path, **session_kwargs) -> int:
    """Integer-matmul nodes in the graph onnxruntime saves after its extended optimisation."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **session_kwargs)
    ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    return sum(ops[op] for op in INTEGER_MATMULS)


def test_w8a8_encoder_runs_its_linears_on_integer_kernels(exported_w8a8, tmp_path):
    subnet, folder, report = exported_w8a8
    blocks = len(subnet.architecture.kept_blocks)
    settings = json.loads((folder / "config.json").read_text())["export"]["runtime"]["onnxruntime"]
    disabled = settings["disabled_optimizers"]
    count = integer_matmul_count(folder / "vision_encoder.onnx", tmp_path, disabled_optimizers=disabled)
    assert count >= 4 * blocks and count == report.integer_matmul_nodes
    # With a fixed batch (a common deployment step), onnxruntime's default MatMulAddFusion turns each Linear's
    # MatMul + Add into a float Gemm before the QDQ fusion sees it; the exported settings prevent that.
    model = onnx.load(folder / "vision_encoder.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "batch1.onnx")
    assert integer_matmul_count(tmp_path / "batch1.onnx", tmp_path, disabled_optimizers=disabled) == count
    assert integer_matmul_count(tmp_path / "batch1.onnx", tmp_path) < 4 * blocks


# --- end to end ------------------------------------------------------------------------------------------------------
def sample_pixel_values(num_images=4):
    dataset = make_synthetic_segmentation_dataset(num_images, image_size=128, seed=3)
    preprocessor = SamSegmentationPreprocessor(load_sam(TEST_SAM).config, prompts_per_image=2, seed=0)
    transformed = dataset.with_transform(preprocessor)
    return collate_fn([transformed[i] for i in range(num_images)])


def test_w8a8_embeddings_agree_far_below_the_quantization_error(exported_w8a8):
    subnet, folder, report = exported_w8a8
    batch = sample_pixel_values()
    pixel_values = batch["pixel_values"]
    with torch.no_grad():
        quantized = subnet.get_image_embeddings(pixel_values).numpy()
        full_precision = load_sam(TEST_SAM).get_image_embeddings(pixel_values).numpy()
    exported = OnnxSamModel.from_pretrained(folder).get_image_embeddings(pixel_values.numpy())
    export_error = np.abs(exported - quantized).mean()
    quantization_error = np.abs(quantized - full_precision).mean()
    assert export_error <= 0.1 * quantization_error
    assert report.embedding_mean_abs_error <= 0.1 * quantization_error


@pytest.fixture(scope="module")
def exported_mixed(embedded_supernet, tmp_path_factory):
    """An elastic, mixed-precision subnet of the embedded SAM at A4/A6 with float layers, codes stored as INT4."""
    space = embedded_supernet.search_space
    largest = space.largest(8, 8)
    weight_cycle, activation_cycle = (2, 3, 4, 6, 8, 32, 4), (4, 6, 6, 4, 4, 32, 6)
    arch = space.canonical(
        dataclasses.replace(
            largest,
            resolution=space.resolution_choices[1],
            skipped_blocks=space.skipped_blocks(space.depth_choices[1]),
            num_heads=tuple(space.num_heads_choices[i % 2] for i in range(space.num_blocks)),
            mlp_dims=tuple(space.mlp_dim_choices[(i + 1) % 3] for i in range(space.num_blocks)),
            weight_bits=tuple(weight_cycle[i % 7] for i in range(len(largest.layer_names))),
            activation_bits=tuple(activation_cycle[i % 7] for i in range(len(largest.layer_names))),
        )
    )
    space.validate(arch)
    subnet = extract_subnet(embedded_supernet, arch).eval()
    folder = tmp_path_factory.mktemp("export") / "mixed"
    return subnet, folder, subnet.export_onnx(folder, weight_container="int4")


class OnnxForEvaluation:
    """`evaluate_mean_iou`'s model interface over an `OnnxSamModel` (numpy in, torch out)."""

    def __init__(self, model: OnnxSamModel):
        self.model = model

    def __call__(self, multimask_output=True, **inputs):
        outputs = self.model(**{name: value.numpy() for name, value in inputs.items()}, multimask_output=multimask_output)
        return {"pred_masks": torch.from_numpy(outputs.pred_masks), "iou_scores": torch.from_numpy(outputs.iou_scores)}


def test_a4_a6_masks_and_mean_iou_agree_with_pytorch(exported_mixed):
    subnet, folder, report = exported_mixed
    assert {4, 6} <= set(subnet.architecture.activation_bits)
    model = OnnxSamModel.from_pretrained(folder)
    batch = sample_pixel_values(8)
    inputs = {name: batch[name] for name in ("pixel_values", "input_boxes")}
    with torch.no_grad():
        reference = subnet(**inputs).pred_masks > 0
    exported = torch.from_numpy(model(**{name: value.numpy() for name, value in inputs.items()}).pred_masks)
    assert mask_iou(exported, reference).mean() >= 0.99

    dataset = make_synthetic_segmentation_dataset(8, image_size=128, seed=5)
    preprocessor = SamSegmentationPreprocessor(subnet.config, prompts_per_image=4, seed=0)
    loader = torch.utils.data.DataLoader(dataset.with_transform(preprocessor), batch_size=4, collate_fn=collate_fn)
    pytorch_miou = evaluate_mean_iou(subnet, loader, multimask_output=True, show_progress=False)
    onnx_miou = evaluate_mean_iou(OnnxForEvaluation(model), loader, multimask_output=True, device="cpu", show_progress=False)
    assert abs(onnx_miou - pytorch_miou) <= 0.005


# --- bytes -----------------------------------------------------------------------------------------------------------
def expected_encoder_bytes(subnet: SamSubnetForMaskGeneration, container: str) -> float:
    """Codes at their container's bits, 4-byte scales and biases (a padded convolution's with an input offset is a
    map over its output grid), every other float tensor of the encoder at 4 bytes."""
    total = 0.0
    counted = set()
    encoder = subnet.sam.vision_encoder
    grid = encoder.resolution // encoder.patch_size
    for name, module in encoder.named_modules():
        if isinstance(module, QuantizedLinear):  # convolutions included
            counted.update(f"{name}.{key}" for key, _ in module.named_parameters(recurse=False))
            counted.update(f"{name}.{key}" for key, _ in module.named_buffers(recurse=False))
            if module.weight_bits < 16:
                bits = 4 if container == "int4" and module.weight_bits <= 4 else 8
                total += math.prod(module.weight_shape) * bits / 8 + 4 * module.out_features
            else:
                total += 4 * module.weight.numel()
            padded = isinstance(module, QuantizedConv2d) and module.padding
            offset_map = padded and module.input_quantizer.offset is not None
            total += 4 * module.out_features * (grid * grid if offset_map else 1)
    for name, tensor in subnet.sam.vision_encoder.state_dict().items():
        if name not in counted and "quantizer" not in name and tensor.is_floating_point():
            total += 4 * tensor.numel()
    return total


@pytest.fixture(scope="module")
def wide_mixed_subnet():
    """A subnet whose encoder weights outweigh the graph's own structure (hidden size 256), at W2/W4/W8 and float."""
    sam = make_tiny_sam(hidden_size=256, num_hidden_layers=2, global_attn_indexes=(1,), num_attention_heads=4)
    supernet = SamSupernetForMaskGeneration.from_sam(sam).eval()
    supernet.calibrate_quantizers(torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    largest = supernet.search_space.largest(8, 8)
    weight_bits = (2, 4, 8, 32, 4, 8, 2, 8, 4, 8, 2)[: len(largest.layer_names)]  # 8 Linears, then 3 convolutions
    return extract_subnet(supernet, dataclasses.replace(largest, weight_bits=weight_bits)).eval()


def test_encoder_file_is_as_small_as_its_codes(wide_mixed_subnet, tmp_path):
    report = wide_mixed_subnet.export_onnx(tmp_path / "onnx", weight_container="int4", verify=False)
    size = (tmp_path / "onnx" / "vision_encoder.onnx").stat().st_size
    assert size == report.file_bytes["vision_encoder.onnx"]
    assert size <= 1.05 * expected_encoder_bytes(wide_mixed_subnet, "int4")
    assert size < 0.95 * expected_encoder_bytes(wide_mixed_subnet, "int8")
    storage = json.loads((tmp_path / "onnx" / "config.json").read_text())["export"]["layers"]
    assert {layer["weight_storage"] for layer in storage.values()} == {"int4", "int8", "float32"}


# --- files and every architecture ------------------------------------------------------------------------------------
def test_export_folder_files_and_config(exported_w8a8):
    subnet, folder, report = exported_w8a8
    names = {"vision_encoder.onnx", "prompt_encoder_mask_decoder.onnx", "config.json", "preprocessor_config.json"}
    assert {path.name for path in folder.iterdir()} == names == set(report.file_bytes)
    config = json.loads((folder / "config.json").read_text())
    export = config["export"]
    assert export["target"] == "onnxruntime" and export["weight_container"] == "int8" and export["opset"] == 21
    assert export["layers"]["layers.0.attn.qkv"] == {"weight_bits": 8, "activation_bits": 8, "weight_storage": "int8"}
    assert config["architecture"] == subnet.config.architecture
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"longest_edge": 128} and processor["pad_size"] == {"height": 128, "width": 128}
    assert not [path for path in folder.parent.iterdir() if "staging" in path.name]
    assert "integer matmul nodes" in str(report)


def test_cli_exports_the_smallest_architecture(tiny_w8a8_subnet, tmp_path, capsys):
    supernet = SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    arch = supernet.search_space.smallest()
    assert arch.resolution < 128 and arch.skipped_blocks
    extract_subnet(supernet, arch).save_pretrained(tmp_path / "subnet")
    output = tmp_path / "onnx"
    assert main(["export", "--subnet", str(tmp_path / "subnet"), "--output-dir", str(output), "--weight-container", "int4"]) == 0
    printed = capsys.readouterr().out
    assert "vision_encoder.onnx" in printed and float(re.search(r"mask IoU (\S+)", printed).group(1)) >= 0.99
    assert json.loads((output / "config.json").read_text())["export"]["resolution"] == arch.resolution


# --- refusals --------------------------------------------------------------------------------------------------------
def listing(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "tflite"}, r"Unknown export target 'tflite'; allowed targets: \['onnxruntime', 'openvino'\]\."),
        ({"target": "tensorrt"}, r"Unknown export target 'tensorrt' \(TensorRT's signed, zero-point-0 variant is not"),
        ({"weight_container": "int2"}, r"Unknown weight container 'int2'; allowed: \['int8', 'int4'\]\."),
        ({"opset": 17}, r"opset 17 is not supported; the export needs an integer opset of at least 21\."),
    ],
)
def test_unknown_options_are_refused(tiny_w8a8_subnet, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_w8a8_subnet.export_onnx(tmp_path / "out", **kwargs)
    assert listing(tmp_path) == []


def test_non_finite_and_uncalibrated_steps_are_refused(tiny_w8a8_subnet, tmp_path):
    broken = copy.deepcopy(tiny_w8a8_subnet)
    with torch.no_grad():
        broken.sam.vision_encoder.layers[0].mlp.lin1.input_quantizer.step_size.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the step size of vision_encoder\.layers\.0\.mlp\.lin1\.input_quantizer at 8 bits is \[nan\]"):
        broken.export_onnx(tmp_path / "out")
    broken = copy.deepcopy(tiny_w8a8_subnet)
    broken.sam.vision_encoder.layers[1].attn.probs_quantizer.initialized.fill_(False)
    with pytest.raises(ValueError, match=r"quantizer vision_encoder\.layers\.1\.attn\.probs_quantizer at 8 bits was never calibrated"):
        broken.export_onnx(tmp_path / "out")
    never_extracted = SamSubnetForMaskGeneration(tiny_w8a8_subnet.config)
    message = r"weight scales of vision_encoder\.patch_embed\.projection \(8 bits\) include \[0\."
    with pytest.raises(ValueError, match=message):
        never_extracted.export_onnx(tmp_path / "out")
    assert listing(tmp_path) == []


def test_folder_with_foreign_files_is_refused(tiny_w8a8_subnet, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that an ONNX export did not write \(notes\.txt\)"):
        tiny_w8a8_subnet.export_onnx(folder)
    assert listing(tmp_path) == ["out", "out/notes.txt"] and (folder / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"it is a file, not a folder"):
        tiny_w8a8_subnet.export_onnx(folder / "notes.txt")


def test_failed_export_leaves_nothing_behind(tiny_w8a8_subnet, tmp_path, monkeypatch):
    def failing_export(*args):
        next(tmp_path.glob(f".out{STAGING_MARKER}*")).joinpath("vision_encoder.onnx").write_bytes(b"half")
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(writer, "_export_graph", failing_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        tiny_w8a8_subnet.export_onnx(tmp_path / "out")
    assert listing(tmp_path) == []


def test_quiet_exporter_notices_hides_the_exporters_notices_and_nothing_else(caplog):
    import logging
    import warnings

    from mpsupernet.export.notices import quiet_exporter_notices

    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_exporter_notices():
            registry.warning("torchvision is not installed. Skipping torchvision::nms")
            registry.warning("another registry notice")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn_explicit(
                "# The axis name: num_points will not be used, since it shares the same shape constraints with "
                "another axis: num_points.", UserWarning, "_onnx_program.py", 1, module="torch.onnx._internal.x",
            )  # fmt: skip
            warnings.warn("# The axis name: x will not be used, since it shares the same shape constraints", UserWarning)
            warnings.warn("a FutureWarning of ours", FutureWarning)
        registry.warning("torchvision is not installed. Skipping torchvision::roi_align")
    assert [record.getMessage() for record in caplog.records] == [
        "another registry notice",
        "torchvision is not installed. Skipping torchvision::roi_align",
    ]
    # The axis notice is hidden only when torch's exporter raises it; ours would show.
    assert [str(warning.message)[:20] for warning in caught] == ["# The axis name: x w", "a FutureWarning of o"]
