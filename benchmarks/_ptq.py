"""The plain route a user would otherwise take: fine-tune SAM in float once, then quantize it after training.

The float model's image encoder is exported to ONNX (the package's own exporter, on the full-precision subnet: a
plain float graph), quantized with onnxruntime's `quantize_static` (QDQ, per-channel weights, uint8 activations,
calibrated on training images) at W8A8 or W4A8, and run by onnxruntime; the prompt encoder and mask decoder stay the
float model's own in PyTorch, as they do in every subnet of the supernet. Its BitOPs are priced by the package's own
counter from what the quantized graph really quantizes (`ptq_architecture`): a layer the graph leaves in float counts
at 32 × 32 there.
"""

import itertools
from pathlib import Path

import onnx
import torch
from onnxruntime import GraphOptimizationLevel, InferenceSession, SessionOptions
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from mpsupernet.architecture import FLOAT_BITS, SubnetArchitecture
from mpsupernet.data import SamSegmentationPreprocessor, collate_fn
from mpsupernet.search_space import SearchSpace

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}
"""The weight bit-widths `quantize_static` offers for integer kernels (int8, and int4 in QDQ form)."""
ACTIVATION_BITS = 8
_INTEGER_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
ENCODER_FILE = "vision_encoder.onnx"


def session(path: Path, num_threads: int = 1) -> InferenceSession:
    options = SessionOptions()
    options.intra_op_num_threads = num_threads
    options.graph_optimization_level = GraphOptimizationLevel.ORT_ENABLE_ALL
    return InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_float_encoder(float_subnet, directory: Path) -> Path:
    """The float image encoder of `float_subnet` (an extracted full-precision subnet) as ONNX, pre-processed for
    quantization (shape inference and graph folding, as onnxruntime asks); returns its path."""
    float_subnet.export_onnx(directory / "float")
    prepared = directory / "float_prepared.onnx"
    quant_pre_process(str(directory / "float" / ENCODER_FILE), str(prepared))
    return prepared


class PixelValuesReader(CalibrationDataReader):
    """Calibration batches for `quantize_static`: the pixel values of `dataset`'s images, one image per batch."""

    def __init__(self, dataset, config, input_name: str, num_images: int):
        preprocessor = SamSegmentationPreprocessor(config, seed=0)
        loader = torch.utils.data.DataLoader(dataset.with_transform(preprocessor), batch_size=1, collate_fn=collate_fn)
        self.batches = [
            {input_name: batch["pixel_values"].numpy()} for batch in itertools.islice(loader, num_images) if batch
        ]
        self.rewind()

    def get_next(self):
        return next(self._iterator, None)

    def rewind(self):
        self._iterator = iter(self.batches)


def quantize_encoder(
    float_path: Path, output_path: Path, reader: PixelValuesReader, weight_bits: int, method: str
) -> Path:
    """`quantize_static` of the float encoder's MatMuls and Convs at `weight_bits` weights (per channel) and uint8
    activations (QDQ)."""
    reader.rewind()
    quantize_static(
        str(float_path),
        str(output_path),
        reader,
        quant_format=QuantFormat.QDQ,
        # The products BitOPs count; other ops stay float, as in the package's own QDQ graphs.
        op_types_to_quantize=["MatMul", "Conv"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=WEIGHT_TYPES[weight_bits],
        calibrate_method=CALIBRATION_METHODS[method],
    )
    return output_path


def ptq_architecture(graph_path: Path, config, layer_of_node: dict[str, str]):
    """The `SubnetArchitecture` whose BitOPs equal those of a quantized encoder graph: per quantized layer of the
    search space, the bits of its weight initializer in the graph and 8 for an input that a `DequantizeLinear` feeds;
    32 for a weight or input the graph keeps in float.

    `layer_of_node` maps the graph's weighted MatMul and Conv nodes to layer names of the search space (see
    `layer_nodes`). Attention products are priced at their block's `qkv` activation bits, as the package counts them;
    raises a `ValueError` where the graph's attention products disagree with that (then the price would be wrong).
    """
    model = onnx.load(str(graph_path))
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}

    def dequantized_source(name: str):
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return node.input[0]

    bits = {}
    attention_bits = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Conv", "Gemm"):
            continue
        activation, weight = node.input[0], node.input[1]
        weight_source = dequantized_source(weight)
        activation_bits = ACTIVATION_BITS if dequantized_source(activation) is not None else FLOAT_BITS
        if node.name in layer_of_node:
            weight_bits = _INTEGER_BITS[initializers[weight_source].data_type] if weight_source in initializers else FLOAT_BITS
            bits[layer_of_node[node.name]] = (weight_bits, activation_bits)
        elif weight not in initializers:  # an activation x activation product (queries x keys, probabilities x values)
            both = weight_source is not None and activation_bits == ACTIVATION_BITS
            attention_bits.append(ACTIVATION_BITS if both else FLOAT_BITS)
    space = SearchSpace(config)
    largest = space.largest()
    weight_bits = tuple(bits.get(layer, (FLOAT_BITS, FLOAT_BITS))[0] for layer in space.layer_names)
    activation_bits = tuple(bits.get(layer, (FLOAT_BITS, FLOAT_BITS))[1] for layer in space.layer_names)
    qkv_bits = {bits.get(layer, (FLOAT_BITS, FLOAT_BITS))[1] for layer in space.layer_names if layer.endswith("qkv")}
    if set(attention_bits) - qkv_bits:
        raise ValueError(
            f"The graph's attention products run at {sorted(set(attention_bits))} bits and its qkv inputs at "
            f"{sorted(qkv_bits)}: the package's counter cannot price that graph."
        )
    return space.canonical(
        SubnetArchitecture(
            resolution=largest.resolution,
            skipped_blocks=(),
            num_heads=largest.num_heads,
            mlp_dims=largest.mlp_dims,
            layer_names=space.layer_names,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            hidden_size=largest.hidden_size,
        )
    )


def layer_nodes(float_path: Path, float_subnet, config) -> dict[str, str]:
    """Maps the float encoder graph's weighted MatMul and Conv nodes (by node name, which `quantize_static` keeps)
    to the search space's layer names (`"layers.0.attn.qkv"`, `"patch_embed.projection"`, ...).

    The exporter names a convolution's weight after its parameter but folds each Linear's weight into an anonymous
    transposed constant; Linears are matched in graph order (blocks in order; `qkv`, `proj`, `lin1`, `lin2` in each,
    the search space's order), each checked against the transposed shape of `float_subnet`'s weight.
    """
    model = onnx.load(str(float_path))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    encoder = float_subnet.sam.vision_encoder
    layers = SearchSpace(config).layer_names
    linears = [layer for layer in layers if layer.startswith("layers.")]
    weighted = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm", "Conv") and node.input[1] in initializers]
    matmuls = [node for node in weighted if node.op_type != "Conv"]
    if len(matmuls) != len(linears):
        raise ValueError(f"{float_path} has {len(matmuls)} weighted MatMuls for {len(linears)} quantizable Linears.")
    found = {}
    for layer, node in zip(linears, matmuls):
        expected = tuple(reversed(encoder.get_submodule(layer).weight.shape))
        if tuple(initializers[node.input[1]].dims) != expected:
            raise ValueError(f"{float_path}: node {node.name}'s weight {list(initializers[node.input[1]].dims)} is not {layer}'s {expected}.")
        found[node.name] = layer
    for node in weighted:
        if node.op_type == "Conv":
            weight = node.input[1].removesuffix(".weight")
            found[node.name] = next(layer for layer in layers if layer.endswith(weight) and not layer.startswith("layers."))
    missing = sorted(set(layers) - set(found.values()))
    if missing:
        raise ValueError(f"{float_path}: no node found for the layers {missing}.")
    return found


class OnnxEncoderSam:
    """A SAM whose image encoder runs in an onnxruntime session and whose prompt encoder and mask decoder are
    `float_subnet`'s own: what `mpsupernet.evaluation.evaluate_mean_iou` scores like any SAM."""

    training = False

    def __init__(self, float_subnet, encoder_path: Path):
        self.config = float_subnet.config
        self.subnet = float_subnet
        self.session = session(encoder_path)
        self.input_name = self.session.get_inputs()[0].name

    @torch.no_grad()
    def __call__(self, pixel_values, multimask_output=False, **prompts):
        embeddings = self.session.run(None, {self.input_name: pixel_values.numpy()})[0]
        return self.subnet(image_embeddings=torch.from_numpy(embeddings), multimask_output=multimask_output, **prompts)
