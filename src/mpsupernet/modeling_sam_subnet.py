"""`SamSubnetForMaskGeneration`: one architecture of a supernet as a standalone, quantized SAM.

The blocks the architecture skips are gone, the heads and MLP units it drops are cut out of the weights, and every
quantized Linear stores its weight as packed integer codes with one scale per output channel, so that the saved
model shrinks with its bit-widths. It computes what the supernet computes with that architecture active.
"""

import torch
from torch import nn
from transformers import SamModel
from transformers.utils import logging

from .architecture import CONV_PATHS, LAYER_PATHS, SubnetArchitecture, is_float_bits
from .bitops import BitOpsReport, count_operations
from .configuration_sam_supernet import SamSubnetConfig
from .modeling_sam_base import SamQuantizedPreTrainedModel
from .subnet_layers import QuantizedLinear, SamSubnetVisionEncoder, float_weight

logger = logging.get_logger(__name__)


class SamSubnetPreTrainedModel(SamQuantizedPreTrainedModel):
    """Base class: configuration class and weight initialisation."""

    config_class = SamSubnetConfig
    _no_split_modules = ["SamSubnetVisionLayer", "SamTwoWayAttentionBlock"]
    checkpoint_kind = "subnet"
    # An extracted subnet's steps are always loaded from its checkpoint, never calibrated again.
    quantizer_steps_loaded = True

    def _init_own_weights(self, module: nn.Module) -> bool:
        if isinstance(module, QuantizedLinear):
            module.reset_parameters()
            return True
        return False


class SamSubnetForMaskGeneration(SamSubnetPreTrainedModel):
    """A standalone SAM subnet extracted from a mixed-precision supernet.

    The model holds a transformers `SamModel` (`self.sam`) whose image encoder keeps only the subnet's blocks, each
    cut to its heads and MLP width, with quantized Linears stored as packed integer codes (see
    [`QuantizedLinear`]); the prompt encoder and mask decoder are SAM's own. [`forward`] takes and returns what
    `SamModel.forward` does, and reproduces the supernet's output for this architecture.

    Make one with `SamSupernetForMaskGeneration.extract_subnet(budget)` (or `mpsupernet.extract_subnet`);
    save and load it with `save_pretrained` / `from_pretrained` (or `AutoModel.from_pretrained`).

    Args:
        config ([`SamSubnetConfig`]): the base SAM configuration, the architecture and the runtime settings; every
            shape follows from it.
    """

    def __init__(self, config: SamSubnetConfig):
        super().__init__(config)
        self.post_init()

    def _make_vision_encoder(self, config: SamSubnetConfig) -> SamSubnetVisionEncoder:
        return SamSubnetVisionEncoder(config)

    @property
    def architecture(self) -> SubnetArchitecture:
        """The subnet's architecture (blocks numbered as in the base model)."""
        return self.config.subnet_architecture()

    def bitops_report(self) -> BitOpsReport:
        """The BitOPs report of this subnet, recounted from its configuration.

        The rows are counted from the architecture as for the supernet (`mpsupernet.bitops`); the full-precision and
        W8A8 references are those of the supernet it was extracted from, kept in `config.bitops_report`.
        """
        summary = self.config.bitops_report
        if summary is None:
            raise ValueError(
                "This subnet's configuration has no `bitops_report`, so the references of its reductions are unknown; "
                "subnets made by `extract_subnet` have one."
            )
        return BitOpsReport(
            rows=count_operations(self.config, self.architecture),
            full_precision_bitops=summary["full_precision_bitops"],
            w8a8_bitops=summary["w8a8_bitops"],
            architecture=self.config.architecture,
        )

    def export_onnx(
        self,
        save_directory,
        *,
        target: str = "onnxruntime",
        weight_container: str = "int8",
        opset: int | None = None,
        verify: bool = True,
    ):
        """Exports this subnet to ONNX files that run on integer kernels, without PyTorch.

        Writes into `save_directory` (created if needed; it must be empty, new, or an earlier export):

        - `vision_encoder.onnx`: the image encoder in QDQ form with the learned steps: weights as their stored
          integer codes (`[in, out]`, one symmetric scale per output channel), activations per tensor with the LSQ+
          offset carried exactly (subtracted before quantizing, folded into the next bias), bit-widths below 8 in
          int8/uint8 containers with an integer `Clip` between `QuantizeLinear` and `DequantizeLinear`, the
          attention products quantized as this subnet quantizes them, float layers in float. It takes pixel values
          at the base `image_size` (the input resize to the subnet's resolution is in the graph) and returns the
          image embeddings.
        - `prompt_encoder_mask_decoder.onnx`: prompt encoder and mask decoder, in float.
        - `config.json`: this configuration plus an `export` section (files, per-layer bits and weight storage,
          target, the runtime settings that keep the integer kernels, e.g. onnxruntime's `disabled_optimizers`).
        - `preprocessor_config.json`: transformers' `SamImageProcessor` at the model's image size.

        Run the result with `mpsupernet.runtime.OnnxSamModel.from_pretrained(save_directory)`.

        Args:
            save_directory (`str` or `os.PathLike`): the output folder.
            target (`str`, *optional*, defaults to `"onnxruntime"`): `"onnxruntime"` or `"openvino"` (the same
                graph; OpenVINO's exact f32 precision hint is recorded). TensorRT is not supported.
            weight_container (`str`, *optional*, defaults to `"int8"`): `"int8"`, or `"int4"` to store codes of at
                most 4 bits as INT4 (half the bytes; onnxruntime then multiplies those layers in float).
            opset (`int`, *optional*): ONNX opset, at least 21 (the default).
            verify (`bool`, *optional*, defaults to `True`): run the files in onnxruntime on sample images against
                this subnet and count the encoder's integer-matmul nodes after onnxruntime's optimisation.

        Returns:
            [`mpsupernet.export.OnnxExportReport`]: files and bytes, integer-matmul nodes, errors vs PyTorch.

        Raises:
            `ValueError`: for an unknown target, container or opset; for steps, offsets or weight scales that are
            unset or not finite; for a destination holding files an export did not write. Nothing is left on disk.
        """
        from .export import export_onnx

        return export_onnx(
            self, save_directory, target=target, weight_container=weight_container, opset=opset, verify=verify
        )

    def quantized_input_layers(self) -> list[str]:
        """The kept layers (`layers.{block}.{path}`) whose inputs are quantized: a plain `SamModel` runs them in float."""
        arch = self.architecture
        return [
            name
            for name, bits in zip(arch.layer_names, arch.activation_bits)
            if not is_float_bits(bits) and arch.keeps_layer(name)
        ]

    def to_sam_model_blocker(self) -> str | None:
        """Why [`to_sam_model`] cannot convert this subnet (the first dimension that is not uniform), or `None`."""
        arch, vision = self.architecture, self.config.vision_config
        kept = arch.kept_blocks
        if arch.resolution != vision.image_size:
            return (
                f"Resolution is not uniform with the base model: the subnet runs at {arch.resolution} px, a plain "
                f"SamModel only at the base image size {vision.image_size}."
            )
        heads = [arch.num_heads[block] for block in kept]
        if set(heads) != {vision.num_attention_heads}:
            return (
                f"Heads are not uniform: the kept blocks {list(kept)} keep {heads} heads; a plain SamModel needs all "
                f"{vision.num_attention_heads} in every block (its attention is as wide as the hidden size)."
            )
        if arch.hidden_size not in (None, vision.hidden_size):
            return (
                f"Feature size is not uniform with the base model: the subnet keeps {arch.hidden_size} channels; a "
                f"plain SamModel's heads are {vision.hidden_size} // {vision.num_attention_heads} wide only at the "
                f"base hidden size {vision.hidden_size}."
            )
        mlp_dims = [arch.mlp_dims[block] for block in kept]
        if len(set(mlp_dims)) > 1:
            return (
                f"MLP width is not uniform: the kept blocks {list(kept)} keep {mlp_dims} units; a plain SamModel has "
                "one mlp_dim."
            )
        return None

    @torch.no_grad()
    def to_sam_model(self) -> SamModel:
        """This subnet as a plain transformers `SamModel`, with the dequantized weights.

        Possible where the architecture is uniform: every kept block keeps all the base model's heads (a plain SAM
        attention is as wide as the hidden size) and the same MLP width, the subnet keeps the base feature size and
        runs at the base image size.
        Skipped blocks are simply absent (`global_attn_indexes` is renumbered). A plain `SamModel` has no activation
        quantizers: its activations and attention products run in float, so its output equals this subnet's only
        where the subnet's activations are float too (its weights are the same either way).

        Raises:
            `ValueError`: naming the dimension that is not uniform (see [`to_sam_model_blocker`]).
        """
        blocker = self.to_sam_model_blocker()
        if blocker is not None:
            raise ValueError(blocker)
        arch, vision = self.architecture, self.config.vision_config
        kept = arch.kept_blocks
        mlp_dims = [arch.mlp_dims[block] for block in kept]
        quantized_inputs = self.quantized_input_layers()
        if quantized_inputs:
            logger.warning(
                f"to_sam_model: {len(quantized_inputs)} layers of this subnet quantize their inputs (e.g. "
                f"{quantized_inputs[0]}); the plain SamModel runs them in float, so its output differs."
            )

        sam_config = self.config.to_sam_config()
        sam_config.vision_config.num_hidden_layers = len(kept)
        sam_config.vision_config.global_attn_indexes = [
            i for i, b in enumerate(kept) if b in vision.global_attn_indexes
        ]
        sam_config.vision_config.mlp_dim = mlp_dims[0]
        sam_config._attn_implementation = self.config._attn_implementation
        sam = SamModel(sam_config).to(device=self.device, dtype=self.dtype)

        layers_prefix = "vision_encoder.layers."
        encoder_prefix = "vision_encoder."
        convs = tuple(f"{encoder_prefix}{path}." for path in CONV_PATHS.values())
        state = {
            key: value
            for key, value in self.sam.state_dict().items()
            if not key.startswith((layers_prefix, *convs))
        }
        for path in CONV_PATHS.values():
            conv = self.sam.vision_encoder.get_submodule(path)
            state[f"{encoder_prefix}{path}.weight"] = float_weight(conv)
            if conv.bias is not None:
                state[f"{encoder_prefix}{path}.bias"] = conv.bias
        for position, layer in enumerate(self.sam.vision_encoder.layers):
            prefix = f"{layers_prefix}{position}."
            for part in ("layer_norm1", "layer_norm2"):
                state.update(layer.get_submodule(part).state_dict(prefix=f"{prefix}{part}."))
            if layer.attn.use_rel_pos:
                state[f"{prefix}attn.rel_pos_h"] = layer.attn.rel_pos_h
                state[f"{prefix}attn.rel_pos_w"] = layer.attn.rel_pos_w
            for path in LAYER_PATHS.values():
                linear = layer.get_submodule(path)
                state[f"{prefix}{path}.weight"] = float_weight(linear)
                if linear.bias is not None:
                    state[f"{prefix}{path}.bias"] = linear.bias
        sam.load_state_dict(state)
        return sam.train(self.training)


__all__ = ["SamSubnetForMaskGeneration", "SamSubnetPreTrainedModel"]
