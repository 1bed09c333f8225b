"""`export_onnx`: writes a subnet as ONNX files that run on integer kernels, checks them, and reports.

The folder it writes (see `SamSubnetForMaskGeneration.export_onnx` for the user-facing description):

- `vision_encoder.onnx`: the image encoder in QDQ form (`mpsupernet.export.graphs.VisionEncoderGraph`);
- `prompt_encoder_mask_decoder.onnx`: SAM's prompt encoder and mask decoder in float; for a semantic subnet,
  `class_decoder.onnx` instead: the prompt-free class head (`mpsupernet.export.graphs.ClassDecoderGraph`);
- `config.json`: the subnet's configuration with an `export` section (files, per-layer bits and storage, target,
  the runtime settings that keep the integer kernels);
- `preprocessor_config.json`: the processor the subnet saves beside its weights (SAM's image processor at the
  model's image size; `SamSemanticImageProcessor` for a semantic subnet).

Everything is written into a staging folder beside the destination (`mpsupernet.atomic.replace_folder`), and
`config.json` records the sha256 of every file it describes, checked by `mpsupernet.runtime.OnnxSamModel` on load.
"""

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
import torch

from ..architecture import is_float_bits
from ..atomic import replace_folder
from ..choices import EXPORT_TARGETS, WEIGHT_CONTAINERS
from ..configuration_sam_semantic import SamSemanticSubnetConfig
from ..image_processing import PillowSamImageProcessor
from ..integrity import described_files, digests_of, read_config, write_config
from ..layout import (
    CLASS_DECODER_NAME,
    CONFIG_NAME,
    EXPORT_DIGEST_KEY,
    EXPORT_FILES_KEY,
    EXPORT_KEY,
    PREPROCESSOR_NAME,
    PROMPT_DECODER_NAME,
    VISION_ENCODER_NAME,
)
from ..metrics.mask import mask_iou
from ..quantization import LsqQuantizer
from ..subnet_layers import QuantizedLinear
from .graphs import ClassDecoderGraph, PromptEncoderMaskDecoderGraph, VisionEncoderGraph
from .ops import ONNX_TRANSLATIONS

MIN_OPSET = 21
"""INT4 tensors and `QuantizeLinear`/`DequantizeLinear` with the types used here need ONNX opset 21."""
INTEGER_MATMUL_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul")
"""onnxruntime nodes that multiply integer codes (what its QDQ fusions turn `DQ -> MatMul` pairs into)."""
ONNXRUNTIME_SETTINGS = {
    # Level-1 fusions that rewrite MatMul+Add into Gemm and MatMul*scale into FusedMatMul before the QDQ fusions
    # look for DQ -> MatMul, which would keep every Linear in float.
    "disabled_optimizers": ["MatMulAddFusion", "MatMulScaleFusion"],
    # DQ -> MatMulNBits fusion (INT4 weights) re-quantizes activations per block by default (accuracy level 4).
    "session_config_entries": {"session.qdq_matmulnbits_accuracy_level": "0"},
}
FOLDED_CONSTANT_SIZE_LIMIT = 1024
"""Largest constant (in elements) that the ONNX optimizer may compute at export time."""
OPENVINO_SETTINGS = {"INFERENCE_PRECISION_HINT": "f32"}
"""OpenVINO's exact mode: its default on CPUs with bf16 computes in bf16."""


@dataclass
class OnnxExportReport:
    """What `export_onnx` wrote and how the files compare with the PyTorch subnet.

    Attributes:
        directory (`str`): the export folder.
        target (`str`), weight_container (`str`), opset (`int`): as exported.
        file_bytes (`dict[str, int]`): size in bytes of every file written.
        num_blocks (`int`): encoder blocks in the graph.
        integer_matmul_nodes (`int`, *optional*): nodes of `INTEGER_MATMUL_OPS` in the encoder after onnxruntime's
            extended optimisation with the exported session settings (`None` without `verify`).
        embedding_mean_abs_error, embedding_max_abs_error (`float`, *optional*): image embeddings of onnxruntime vs
            the PyTorch subnet on the sample images.
        subnet_embedding_scale (`float`, *optional*): mean absolute value of those embeddings, for scale.
        mask_iou (`float`, *optional*): mean IoU between the binarized masks (logit > 0) of onnxruntime and PyTorch
            (sample images: two images of `mpsupernet.data.make_synthetic_segmentation_dataset`, a box and a point each);
            for a semantic subnet, the class mIoU of onnxruntime's class maps against PyTorch's on those images.
        num_sample_images (`int`): images the errors were measured on (0 without `verify`).
    """

    directory: str
    target: str
    weight_container: str
    opset: int
    file_bytes: dict[str, int] = field(default_factory=dict)
    num_blocks: int = 0
    integer_matmul_nodes: int | None = None
    embedding_mean_abs_error: float | None = None
    embedding_max_abs_error: float | None = None
    subnet_embedding_scale: float | None = None
    mask_iou: float | None = None
    num_sample_images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"ONNX export ({self.target}, weights in {self.weight_container}, opset {self.opset}) in {self.directory}"]
        lines += [f"  {name}: {size:,} bytes" for name, size in self.file_bytes.items()]
        if self.integer_matmul_nodes is not None:
            lines.append(
                f"  integer matmul nodes after onnxruntime's optimisation: {self.integer_matmul_nodes} "
                f"({self.integer_matmul_nodes / max(self.num_blocks, 1):.1f} per block, {self.num_blocks} blocks)"
            )
        if self.embedding_mean_abs_error is not None:
            lines.append(
                f"  vs the PyTorch subnet on {self.num_sample_images} sample images: embedding error mean "
                f"{self.embedding_mean_abs_error:.3g} / max {self.embedding_max_abs_error:.3g} (embeddings' mean |x| "
                f"{self.subnet_embedding_scale:.3g}), mask IoU {self.mask_iou:.4f}"
            )
        return "\n".join(lines)


def check_export_arguments(target: str, weight_container: str, opset: int | None) -> int:
    """Validates the export options; returns the opset to use."""
    if target not in EXPORT_TARGETS:
        extra = " (TensorRT's signed, zero-point-0 variant is not implemented)" if target == "tensorrt" else ""
        raise ValueError(f"Unknown export target {target!r}{extra}; allowed targets: {list(EXPORT_TARGETS)}.")
    if weight_container not in WEIGHT_CONTAINERS:
        raise ValueError(f"Unknown weight container {weight_container!r}; allowed: {list(WEIGHT_CONTAINERS)}.")
    if opset is None:
        return MIN_OPSET
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ValueError(f"opset {opset!r} is not supported; the export needs an integer opset of at least {MIN_OPSET}.")
    return opset


def check_quantizers(subnet: torch.nn.Module) -> None:
    """Refuses a subnet whose encoder holds steps, offsets or weight scales that are unset or not finite, or steps
    collapsed to their floor (`LsqQuantizer.collapsed_channels`: the layer would pass nearly nothing on)."""
    for name, module in subnet.sam.vision_encoder.named_modules():
        if isinstance(module, LsqQuantizer) and module.is_quantizing:
            where = f"vision_encoder.{name} at {module.active_bits} bits"
            if not bool(module.initialized.all()):
                raise ValueError(f"Cannot export: the quantizer {where} was never calibrated (its step size is unset).")
            step = module.step_size.detach()
            if bool(module.collapsed_channels(module.active_bits).any()):
                raise ValueError(
                    f"Cannot export: the step size of {where} is {step.flatten().tolist()}; steps must be finite and "
                    f"above their floor ({module.step_floor(step.dtype):.3g})."
                )
            if module.offset is not None and not bool(torch.isfinite(module.offset).all()):
                raise ValueError(
                    f"Cannot export: the offset of {where} is {module.offset.detach().flatten().tolist()}; it must be "
                    "finite."
                )
        elif isinstance(module, QuantizedLinear) and not is_float_bits(module.weight_bits):
            scale = module.weight_scale.detach()
            if not bool(torch.isfinite(scale).all()) or not bool((scale != 0).any()):
                bad = scale[~torch.isfinite(scale)] if not bool(torch.isfinite(scale).all()) else scale[:4]
                raise ValueError(
                    f"Cannot export: the weight scales of vision_encoder.{name} ({module.weight_bits} bits) include "
                    f"{bad.tolist()}; they must be finite and not all zero (was the subnet extracted from a "
                    "calibrated supernet?)."
                )


def check_destination(save_directory: Path) -> None:
    """Refuses a destination that is a file, or a folder that holds files an export did not write."""
    if save_directory.exists() and not save_directory.is_dir():
        raise ValueError(f"Cannot export into {str(save_directory)!r}: it is a file, not a folder.")
    if not save_directory.is_dir():
        return
    present = sorted(path.name for path in save_directory.iterdir())
    foreign = [name for name in present if name not in _export_files(save_directory)]
    if foreign:
        raise ValueError(
            f"Cannot export into {str(save_directory)!r}: it holds files that an ONNX export did not write "
            f"({', '.join(foreign[:5])}); choose an empty or new folder."
        )


def _export_files(directory: Path) -> set[str]:
    """The names an ONNX export wrote into `directory`, `config.json` included (none where its config has no
    `export` section: a folder that also holds weights is a saved model, not an export)."""
    config = read_config(directory)
    if config is None or EXPORT_KEY not in config:
        return set()
    return described_files({EXPORT_KEY: config[EXPORT_KEY]})


def _sample_inputs(image_size: int, num_images: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Images of the package's synthetic dataset as `SamImageProcessor` prepares them, with one box around each
    image's first object and a point at its centre, in the model's input frame."""
    from ..data.synthetic import make_synthetic_segmentation_dataset

    dataset = make_synthetic_segmentation_dataset(num_images, image_size=image_size, seed=seed)
    processor = PillowSamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size})
    pixel_values = processor(list(dataset["image"]), return_tensors="np")["pixel_values"].astype(np.float32)
    boxes = []
    for masks in list(dataset["masks"]):
        rows, columns = np.nonzero(np.asarray(masks[0]))
        boxes.append([[columns.min(), rows.min(), columns.max(), rows.max()]])
    boxes = np.asarray(boxes, dtype=np.float32)
    return {
        "pixel_values": pixel_values,
        "input_boxes": boxes,
        "input_points": ((boxes[..., :2] + boxes[..., 2:]) / 2)[:, :, None, :],
        "input_labels": np.ones((num_images, 1, 1), dtype=np.int64),
    }


def _export_graph(module: torch.nn.Module, args: tuple, opset: int, input_names, output_names, dynamic_shapes):
    """`torch.onnx.export` (dynamo) of `module` with the quantizer ops' translations; returns the `ONNXProgram`."""
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=opset,
        custom_translation_table=ONNX_TRANSLATIONS,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
        optimize=False,
    )
    # Constants are folded only up to a small output size: SAM's relative-position lookups would otherwise be
    # stored expanded (`q x k x head_dim` per table: 1 MB each at ViT-B's global grid) instead of as their tables.
    onnxscript.optimizer.optimize(program.model, output_size_limit=FOLDED_CONSTANT_SIZE_LIMIT)
    return program


def _save(model: ir.Model, path: Path) -> None:
    """Saves `model` without the exporter's debugging aids (each node's PyTorch stack trace, each intermediate
    value's shape: more bytes than a small model's weights; onnxruntime infers the shapes again). Models above 2 GB
    keep their tensors in `<name>.data` beside the file, as ONNX requires."""
    import onnx

    proto = ir.to_proto(model)
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.graph.value_info[:]
    large = proto.ByteSize() > 2**31 - 2**26
    onnx.save(proto, path, save_as_external_data=large, location=f"{path.name}.data" if large else None)


def _store_int4_codes(model: ir.Model, encoder: VisionEncoderGraph) -> None:
    """Stores weight codes of at most 4 bits as INT4 initializers (same values; `DequantizeLinear` reads INT4)."""
    for name, buffer in encoder.named_buffers():
        if not name.endswith("weight_codes") or encoder.get_submodule(name.rsplit(".", 1)[0]).weight_bits > 4:
            continue
        value = model.graph.initializers[name]
        value.const_value = ir.Tensor(buffer.numpy(), dtype=ir.DataType.INT4, name=name)
        value.dtype = ir.DataType.INT4


def export_vision_encoder(subnet: torch.nn.Module, path: str | os.PathLike, opset: int = MIN_OPSET) -> Path:
    """Writes only `subnet`'s QDQ image encoder (int8 weight containers, batch 1, as [`write_onnx_files`] writes it)
    to `path`, without checks: what `mpsupernet.latency` times. Returns the path."""
    size = subnet.config.vision_config.image_size
    was_training = subnet.training
    subnet.eval()
    try:
        with torch.no_grad():
            encoder = VisionEncoderGraph(subnet).eval()
        _write_vision_encoder(encoder, torch.zeros(1, 3, size, size), Path(path), opset, "int8", None)
    finally:
        subnet.train(was_training)
    return Path(path)


def _write_vision_encoder(
    encoder: VisionEncoderGraph, pixel_values: torch.Tensor, path: Path, opset: int, weight_container: str,
    dynamic_shapes,
) -> None:
    """Exports `encoder` traced on `pixel_values` to `path`, storing 4-bit codes as INT4 for `weight_container`
    "int4"; the one encoder writer of [`write_onnx_files`] and [`export_vision_encoder`]."""
    program = _export_graph(encoder, (pixel_values,), opset, ["pixel_values"], ["image_embeddings"], dynamic_shapes)
    if weight_container == "int4":
        _store_int4_codes(program.model, encoder)
    _save(program.model, path)


def export_onnx(
    subnet: torch.nn.Module,
    save_directory: str | os.PathLike,
    *,
    target: str = "onnxruntime",
    weight_container: str = "int8",
    opset: int | None = None,
    verify: bool = True,
) -> OnnxExportReport:
    """Exports `subnet` to ONNX into `save_directory` (see `SamSubnetForMaskGeneration.export_onnx`).

    The folder is written through the one staging helper (`mpsupernet.atomic.replace_folder`): a new folder appears
    complete, with the permissions `save_pretrained` gives; over an earlier export, `config.json` (whose digests name
    the new files) moves in first, so that a kill part-way leaves a folder that is refused on load, never a mix.
    """
    opset = check_export_arguments(target, weight_container, opset)
    check_quantizers(subnet)
    destination = Path(save_directory)
    check_destination(destination)
    report = OnnxExportReport(str(destination), target, weight_container, opset)
    config = subnet.config.to_dict()
    replace_folder(destination, lambda folder: _write_export(subnet, folder, config, report, verify))
    return report


def add_onnx_export(
    subnet: torch.nn.Module,
    model_directory: str | os.PathLike,
    *,
    target: str = "onnxruntime",
    weight_container: str = "int8",
    opset: int | None = None,
    verify: bool = True,
) -> OnnxExportReport:
    """Exports `subnet` into the folder its `save_pretrained` wrote, beside its safetensors.

    The ONNX files and `preprocessor_config.json` are added, and the folder's `config.json` gains the `export`
    section (the rest of it stays as saved), so that the folder loads both as the PyTorch subnet and with
    `mpsupernet.runtime.OnnxSamModel`. It is written as [`export_onnx`] writes over an earlier export.

    Args:
        subnet (`SamSubnetForMaskGeneration`): the subnet saved in `model_directory`.
        model_directory (`str` or `os.PathLike`): a folder holding its `config.json`.
        target, weight_container, opset, verify: as for [`export_onnx`].

    Returns:
        `OnnxExportReport`: as `export_onnx`'s, for `model_directory` (`file_bytes` lists the files it added and the
        updated `config.json`).

    Raises:
        `ValueError`: for a folder without `config.json`, and everything `export_onnx` refuses.
    """
    directory = Path(model_directory)
    config = read_config(directory)
    if config is None:
        raise ValueError(
            f"Cannot add an ONNX export to {str(directory)!r}: it holds no {CONFIG_NAME} of a saved subnet."
        )
    opset = check_export_arguments(target, weight_container, opset)
    check_quantizers(subnet)
    report = OnnxExportReport(str(directory), target, weight_container, opset)
    replace_folder(directory, lambda folder: _write_export(subnet, folder, config, report, verify))
    return report


def _write_export(subnet, folder: Path, config: dict, report: OnnxExportReport, verify: bool) -> None:
    """Writes the image processor, the graphs and `config` with the export section into `folder` (a staging folder),
    and fills `report`."""
    subnet._save_companion_files(folder)
    config[EXPORT_KEY] = write_onnx_files(
        subnet, folder, target=report.target, weight_container=report.weight_container, opset=report.opset
    )
    write_config(folder, config)
    report.file_bytes = {name: (folder / name).stat().st_size for name in config[EXPORT_KEY][EXPORT_FILES_KEY]}
    report.num_blocks = len(subnet.architecture.kept_blocks)
    if verify:
        _verify(subnet, folder, report)


def write_onnx_files(subnet, folder: Path, *, target: str, weight_container: str, opset: int) -> dict:
    """Writes the two ONNX graphs of `subnet` into `folder`, and returns the `export` section of its `config.json`.

    An inner writer: `folder` is a folder its caller owns (a staging folder of [`export_onnx`], [`add_onnx_export`]
    or `mpsupernet.hub.save_tiers`) and already holds the model's `preprocessor_config.json`. The options are
    checked by the caller ([`check_export_arguments`], [`check_quantizers`]).

    Returns:
        `dict`: the format, target, weight container and opset; `files` (the graphs, any external data, the
        processor and `config.json`) and `sha256` (the digest of each of them but `config.json`); the image size
        and resolution; each kept layer's bits and weight storage; the runtime settings that keep the integer
        kernels.
    """
    config = subnet.config
    image_size = config.vision_config.image_size
    arch = subnet.architecture
    before = set(os.listdir(folder))
    was_training = subnet.training
    subnet.eval()
    try:
        with torch.no_grad():
            encoder = VisionEncoderGraph(subnet).eval()
            pixel_values = torch.from_numpy(_sample_inputs(image_size)["pixel_values"])
            embeddings = encoder(pixel_values)
        batch = torch.export.Dim("batch")
        _write_vision_encoder(
            encoder, pixel_values, folder / VISION_ENCODER_NAME, opset, weight_container, {"pixel_values": {0: batch}}
        )
        _export_decoder(subnet, embeddings, opset, folder)
    finally:
        subnet.train(was_training)

    files = sorted((set(os.listdir(folder)) - before) | {PREPROCESSOR_NAME})
    return {
        "format": "onnx",
        "target": target,
        "weight_container": weight_container,
        "opset": opset,
        EXPORT_FILES_KEY: files + [CONFIG_NAME],
        EXPORT_DIGEST_KEY: digests_of(folder, files),
        "image_size": image_size,
        "resolution": arch.resolution,
        "layers": {
            name: {
                "weight_bits": weight_bits,
                "activation_bits": activation_bits,
                "weight_storage": (
                    "float32" if is_float_bits(weight_bits) else "int4" if weight_container == "int4" and weight_bits <= 4 else "int8"
                ),
            }
            for name, weight_bits, activation_bits in zip(arch.layer_names, arch.weight_bits, arch.activation_bits)
            if arch.keeps_layer(name)
        },
        "runtime": {"onnxruntime": ONNXRUNTIME_SETTINGS, "openvino": OPENVINO_SETTINGS},
    }


def _is_semantic(subnet) -> bool:
    """Whether `subnet` is a class-segmentation subnet (prompt-free class head) rather than a promptable one."""
    # Told by its config: the model class would import the subnet module, which imports this package.
    return isinstance(subnet.config, SamSemanticSubnetConfig)


def _export_decoder(subnet, embeddings: torch.Tensor, opset: int, staging: Path) -> None:
    """Writes the decoder graph: the prompt-free class head of a semantic subnet, else the prompt encoder and mask
    decoder."""
    image_size = subnet.config.vision_config.image_size
    if _is_semantic(subnet):
        with torch.no_grad():
            decoder = ClassDecoderGraph(subnet).eval()
        program = _export_graph(
            decoder, (embeddings,), opset, ["image_embeddings"], ["logits"],
            {"image_embeddings": {0: torch.export.Dim("batch")}},
        )
        _save(program.model, staging / CLASS_DECODER_NAME)
        return
    with torch.no_grad():
        decoder = PromptEncoderMaskDecoderGraph(subnet).eval()
    # One image per call (the runtime loops over a batch): with a dynamic image batch, the exported
    # `repeat_interleave` of SAM's mask decoder expands to a wrong shape for batches above 1. Traced with a
    # different size in every dynamic dimension, none 0 or 1: torch.export specializes sizes 0 and 1 and gives
    # dimensions of equal size one symbol.
    prompts = {
        "input_points": torch.full((1, 3, 4, 2), image_size / 2),
        "input_labels": torch.ones(1, 3, 4, dtype=torch.int64),
        "input_boxes": torch.full((1, 3, 5, 4), image_size / 4),
    }
    point_batch, num_points = torch.export.Dim("point_batch"), torch.export.Dim("num_points")
    num_boxes = torch.export.Dim("num_boxes")
    program = _export_graph(
        decoder, (embeddings[:1], *prompts.values()), opset,
        ["image_embeddings", *prompts], ["iou_scores", "pred_masks"],
        (None, {1: point_batch, 2: num_points}, {1: point_batch, 2: num_points}, {1: point_batch, 2: num_boxes}),
    )
    _save(program.model, staging / PROMPT_DECODER_NAME)


def count_integer_matmuls(path: str | os.PathLike, settings: dict = ONNXRUNTIME_SETTINGS) -> int:
    """Integer-matmul nodes in the graph onnxruntime runs for the model at `path`, after its extended optimisation.

    The optimised graph is saved (`SessionOptions.optimized_model_filepath`) to a temporary file and read back.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        for key, value in settings.get("session_config_entries", {}).items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=settings.get("disabled_optimizers")
        )
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        return sum(node.op_type in INTEGER_MATMUL_OPS for node in graph.node)


def _verify(subnet, staging: Path, report: OnnxExportReport) -> None:
    from ..runtime import OnnxSamModel

    sample = _sample_inputs(subnet.config.vision_config.image_size)
    if _is_semantic(subnet):
        _verify_semantic(subnet, staging, sample, report)
        return
    model = OnnxSamModel.from_pretrained(staging)
    prompts = {key: sample[key] for key in ("input_boxes", "input_points", "input_labels")}
    with torch.no_grad():
        reference = subnet(pixel_values=torch.from_numpy(sample["pixel_values"]), **{k: torch.from_numpy(v) for k, v in prompts.items()})
        reference_embeddings = subnet.get_image_embeddings(torch.from_numpy(sample["pixel_values"])).numpy()
    embeddings = model.get_image_embeddings(sample["pixel_values"])
    outputs = model(image_embeddings=embeddings, **prompts)
    error = np.abs(embeddings - reference_embeddings)
    report.embedding_mean_abs_error = float(error.mean())
    report.embedding_max_abs_error = float(error.max())
    report.subnet_embedding_scale = float(np.abs(reference_embeddings).mean())
    report.mask_iou = float(mask_iou(torch.from_numpy(outputs.pred_masks), reference.pred_masks > 0).mean())
    report.num_sample_images = len(sample["pixel_values"])
    report.integer_matmul_nodes = count_integer_matmuls(staging / VISION_ENCODER_NAME)


def _verify_semantic(subnet, staging: Path, sample: dict, report: OnnxExportReport) -> None:
    from ..runtime_semantic import OnnxSamForSemanticSegmentation
    from ..metrics.semantic import SemanticAreas

    model = OnnxSamForSemanticSegmentation.from_pretrained(staging)
    pixel_values = sample["pixel_values"]
    with torch.no_grad():
        reference = subnet(pixel_values=torch.from_numpy(pixel_values)).logits
        reference_embeddings = subnet.get_image_embeddings(torch.from_numpy(pixel_values)).numpy()
    embeddings = model.get_image_embeddings(pixel_values)
    logits = model(image_embeddings=embeddings).logits
    error = np.abs(embeddings - reference_embeddings)
    report.embedding_mean_abs_error = float(error.mean())
    report.embedding_max_abs_error = float(error.max())
    report.subnet_embedding_scale = float(np.abs(reference_embeddings).mean())
    agreement = SemanticAreas(subnet.config.num_labels)
    agreement.update(logits.argmax(axis=1), reference.argmax(dim=1).numpy())
    report.mask_iou = float(agreement.compute()["mean_iou"])
    report.num_sample_images = len(pixel_values)
    report.integer_matmul_nodes = count_integer_matmuls(staging / VISION_ENCODER_NAME)