"""The layers of an extracted subnet: Linears and convolutions stored as packed integer codes, and the image encoder
built from them (only the kept blocks, each at its own width).

`mpsupernet.modeling_sam_subnet` builds the model from them; `mpsupernet.export` rewrites them as ONNX graphs.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamVisionLayer

from .architecture import CONV_PATHS, FLOAT_BITS, LAYER_PATHS, SubnetArchitecture, is_float_bits
from .configuration_sam_supernet import SamSubnetConfig
from .modeling_sam_base import QuantizedSamVisionAttention, ResizingSamVisionEncoder, eager_vision_config
from .packing import packed_size, unpack_codes
from .quantization import LsqQuantizer, tensors_state_key


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
        super().__init__(vision, window_size, config._attn_implementation == "sdpa", config.attention_chunk_elements)
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


__all__ = ["QuantizedConv2d", "QuantizedLinear", "SamSubnetVisionEncoder"]
