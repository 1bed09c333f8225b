"""`SamSubnetForMaskGeneration`: one architecture of a supernet as a standalone, quantized SAM.

The blocks the architecture skips are gone, the heads and MLP units it drops are cut out of the weights, and every
quantized Linear stores its weight as packed integer codes with one scale per output channel, so that the saved
model shrinks with its bit-widths. It computes what the supernet computes with that architecture active.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamModel
from transformers.models.sam.modeling_sam import SamVisionLayer
from transformers.utils import logging

from .architecture import CONV_PATHS, FLOAT_BITS, LAYER_PATHS, SubnetArchitecture, is_float_bits
from .bitops import BitOpsReport, count_operations
from .configuration_sam_supernet import SamSubnetConfig
from .modeling_sam_base import (
    QuantizedSamVisionAttention,
    ResizingSamVisionEncoder,
    SamQuantizedPreTrainedModel,
    eager_vision_config,
)
from .packing import packed_size, unpack_codes
from .quantization import LsqQuantizer, tensors_state_key

logger = logging.get_logger(__name__)


def fixed_quantizer(bits: int, signed: bool, learn_offset: bool, step_size_min: float) -> LsqQuantizer:
    """An `LsqQuantizer` that runs at one bit-width only, with its step (and offset) given, never calibrated.

    At a float bit-width it has no bit-width to run at and passes values through.
    """
    quantizer = LsqQuantizer(
        [] if is_float_bits(bits) else [bits], signed=signed, learn_offset=learn_offset, step_size_min=step_size_min
    )
    quantizer.initialized.fill_(True)
    quantizer.set_bits(bits)
    return quantizer


def activation_quantizer(bits: int, config: SamSubnetConfig) -> LsqQuantizer:
    """The quantizer of a Linear's input or of attention values: unsigned with an offset (LSQ+) or signed."""
    offset = config.activation_offset
    return fixed_quantizer(bits, signed=not offset, learn_offset=offset, step_size_min=config.step_size_min)


class QuantizedLinear(nn.Module):
    """A Linear layer of an extracted subnet: integer weight codes, per-output-channel scales, quantized input.

    The weight is stored as `packed_weight`, the codes packed at `weight_bits` bits (see `mpsupernet.packing`), and
    `weight_scale`; it is dequantized (`codes * scale`) when the layer runs. Without autograd the dequantized weight
    is computed once and cached, so inference runs only the matmul. A float (32-bit) weight is kept as `weight`.
    The input runs through an `LsqQuantizer` at `activation_bits` (the identity at 32 bits).

    Args:
        in_features (`int`), out_features (`int`), bias (`bool`): as for `nn.Linear`.
        weight_bits (`int`): 2 to 8, or 32 for a float weight.
        activation_bits (`int`): 2 to 8, or 32 for float inputs.
        config ([`SamSubnetConfig`]): gives the activation grid (`activation_offset`) and `step_size_min`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_bits: int, activation_bits: int, config):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight_shape = self._weight_shape()
        if is_float_bits(weight_bits):
            self.weight = nn.Parameter(torch.empty(self.weight_shape))
        else:
            num_bytes = packed_size(math.prod(self.weight_shape), weight_bits)
            self.register_buffer("packed_weight", torch.zeros(num_bytes, dtype=torch.uint8))
            self.weight_scale = nn.Parameter(torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.input_quantizer = activation_quantizer(activation_bits, config)
        self._cached_weight: tuple[tuple, torch.Tensor] | None = None
        self.reset_parameters()

    def _weight_shape(self) -> tuple[int, ...]:
        return self.out_features, self.in_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero weights and bias: a layer that has not been given its extracted values outputs zeros."""
        if is_float_bits(self.weight_bits):
            self.weight.zero_()
        else:
            self.packed_weight.zero_()
            self.weight_scale.zero_()
        if self.bias is not None:
            self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"
        )

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer multiplies with: `codes * scale` per output channel (or the float weight)."""
        if is_float_bits(self.weight_bits):
            return self.weight
        if torch.is_grad_enabled():
            return self._dequantize()
        # Storage addresses change when the model moves or its tensors are replaced; versions when they change in
        # place: either makes the cached weight stale.
        key = tensors_state_key(self.packed_weight, self.weight_scale)
        if self._cached_weight is None or self._cached_weight[0] != key:
            self._cached_weight = (key, self._dequantize())
        return self._cached_weight[1]

    def _dequantize(self) -> torch.Tensor:
        codes = unpack_codes(self.packed_weight, self.weight_bits, self.weight_shape)
        scale = self.weight_scale.reshape(-1, *([1] * (len(self.weight_shape) - 1)))
        return codes.to(self.weight_scale.dtype) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.dequantized_weight(), self.bias)


class QuantizedConv2d(QuantizedLinear):
    """A convolution of an extracted subnet (patch embedding, neck), stored and run as [`QuantizedLinear`] is: packed
    integer weight codes with one scale per output channel, a quantized input.

    Args:
        in_channels (`int`), out_channels (`int`), kernel_size (`int`), stride (`int`), padding (`int`),
        bias (`bool`): as for `nn.Conv2d` (square kernels).
        weight_bits (`int`), activation_bits (`int`), config ([`SamSubnetConfig`]): as for [`QuantizedLinear`].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        bias: bool,
        weight_bits: int,
        activation_bits: int,
        config,
    ):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        super().__init__(in_channels, out_channels, bias, weight_bits, activation_bits, config)

    def _weight_shape(self) -> tuple[int, ...]:
        return self.out_features, self.in_features, self.kernel_size, self.kernel_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight()
        return F.conv2d(self.input_quantizer(x), weight, self.bias, stride=self.stride, padding=self.padding)


def make_subnet_conv(conv: nn.Conv2d, weight_bits: int, activation_bits: int, config) -> nn.Module:
    """`conv` itself where weights and inputs are both float, else a [`QuantizedConv2d`] of its shape."""
    if is_float_bits(weight_bits) and is_float_bits(activation_bits):
        return conv
    return QuantizedConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size[0],
        conv.stride[0],
        conv.padding[0],
        conv.bias is not None,
        weight_bits,
        activation_bits,
        config,
    )


def make_subnet_linear(in_features: int, out_features: int, bias: bool, weight_bits: int, activation_bits: int, config):
    """A plain `nn.Linear` where weights and inputs are both float, else a [`QuantizedLinear`]."""
    if is_float_bits(weight_bits) and is_float_bits(activation_bits):
        return nn.Linear(in_features, out_features, bias=bias)
    return QuantizedLinear(in_features, out_features, bias, weight_bits, activation_bits, config)


def float_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight a subnet Linear or convolution (plain or quantized) multiplies with."""
    return linear.dequantized_weight() if isinstance(linear, QuantizedLinear) else linear.weight


class SamSubnetVisionAttention(QuantizedSamVisionAttention):
    """The attention of one subnet block: its kept heads only, quantized Linears and act×act products at fixed bits.

    Args:
        config ([`SamSubnetConfig`]): the subnet configuration.
        window_size (`int`): the attention window, 0 for global attention.
        num_heads (`int`): the heads kept: `qkv` has `3 * num_heads * head_dim` outputs, `proj` `num_heads * head_dim`
            inputs.
        qkv_bits, proj_bits (`tuple[int, int]`): `(weight_bits, activation_bits)` of the two Linears.
        product_bits (`int`): bit-width of the act×act products' operands (32 = float).
        hidden_size (`int`, *optional*): the feature size `qkv` reads and `proj` writes; defaults to the base one.
    """

    def __init__(
        self,
        config: SamSubnetConfig,
        window_size: int,
        num_heads: int,
        qkv_bits,
        proj_bits,
        product_bits,
        hidden_size: int | None = None,
    ):
        vision = config.vision_config
        super().__init__(vision, window_size, use_sdpa=config._attn_implementation == "sdpa")
        width = num_heads * self.head_dim
        hidden_size = hidden_size or vision.hidden_size
        self.qkv = make_subnet_linear(hidden_size, 3 * width, vision.qkv_bias, *qkv_bits, config)
        self.proj = make_subnet_linear(width, hidden_size, True, *proj_bits, config)
        step_min = config.step_size_min
        self.query_quantizer = fixed_quantizer(product_bits, signed=True, learn_offset=False, step_size_min=step_min)
        self.key_quantizer = fixed_quantizer(product_bits, signed=True, learn_offset=False, step_size_min=step_min)
        self.value_quantizer = activation_quantizer(product_bits, config)
        self.probs_quantizer = fixed_quantizer(product_bits, signed=False, learn_offset=False, step_size_min=step_min)
        self.num_attention_heads = self.active_heads = num_heads


class SamSubnetVisionLayer(SamVisionLayer):
    """One kept encoder block of a subnet, at its own width; transformers' forward is reused.

    Args:
        config ([`SamSubnetConfig`]): the subnet configuration.
        arch (`SubnetArchitecture`): the subnet's architecture.
        block (`int`): which block of the base model this is (its window size, widths and bits follow from it).
    """

    def __init__(self, config: SamSubnetConfig, arch: SubnetArchitecture, block: int):
        vision = config.vision_config
        window_size = vision.window_size if block not in vision.global_attn_indexes else 0
        super().__init__(eager_vision_config(vision), window_size)

        def bits(path: str) -> tuple[int, int]:
            return arch.bits_of(f"layers.{block}.{path}")

        qkv_bits = bits(LAYER_PATHS["qkv"])
        product_bits = qkv_bits[1] if config.quantize_attention_products else FLOAT_BITS
        hidden = arch.hidden_size or vision.hidden_size
        self.attn = SamSubnetVisionAttention(
            config, window_size, arch.num_heads[block], qkv_bits, bits(LAYER_PATHS["proj"]), product_bits, hidden
        )
        self.layer_norm1 = nn.LayerNorm(hidden, eps=vision.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=vision.layer_norm_eps)
        mlp_dim = arch.mlp_dims[block]
        self.mlp.lin1 = make_subnet_linear(hidden, mlp_dim, True, *bits(LAYER_PATHS["lin1"]), config)
        self.mlp.lin2 = make_subnet_linear(mlp_dim, hidden, True, *bits(LAYER_PATHS["lin2"]), config)


class SamSubnetVisionEncoder(ResizingSamVisionEncoder):
    """The image encoder of a subnet: only the kept blocks, at the subnet's feature size, run at its resolution; the
    patch embedding and neck convolutions it quantizes are [`QuantizedConv2d`].

    `layers[i]` is block `base_blocks[i]` of the base model. Input and output sizes are handled as in the supernet.
    """

    def __init__(self, config: SamSubnetConfig):
        arch = config.subnet_architecture()
        layers = nn.ModuleList(SamSubnetVisionLayer(config, arch, block) for block in arch.kept_blocks)
        super().__init__(config.vision_config, layers, resolution=arch.resolution, hidden_size=arch.hidden_size)
        self.base_blocks = arch.kept_blocks
        for path in CONV_PATHS.values():
            parent, name = path.rsplit(".", 1)
            owner = self.get_submodule(parent)
            setattr(owner, name, make_subnet_conv(getattr(owner, name), *arch.bits_of(path), config))


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


__all__ = ["QuantizedConv2d", "QuantizedLinear", "SamSubnetForMaskGeneration", "SamSubnetPreTrainedModel"]
