"""The elastic, quantized pieces of SAM's ViT image encoder: heads, MLP width, feature size, depth, resolution.

The modules keep the names and parameter shapes of transformers' `SamVisionEncoder`, so a SAM state dict loads into
them as it is; they reuse transformers' window partitioning and relative-position code.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamVisionLayer

from .architecture import CONV_PATHS, FLOAT_BITS, SubnetArchitecture
from .configuration_sam_supernet import SamSupernetConfig
from .lora import QuantizedLoraLinear
from .modeling_sam_base import QuantizedSamVisionAttention, ResizingSamVisionEncoder, eager_vision_config
from .quantization import LsqQuantizer


def make_quantized_linear(linear: nn.Linear, config: SamSupernetConfig) -> QuantizedLoraLinear:
    """A `QuantizedLoraLinear` of the same shape as `linear`, set up from the supernet configuration."""
    return QuantizedLoraLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        weight_bit_choices=config.weight_bit_choices,
        activation_bit_choices=config.activation_bit_choices,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_mode=config.lora_mode,
        activation_offset=config.activation_offset,
        step_size_min=config.step_size_min,
    )


class ElasticLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the leading channels its input has: an elastic feature size normalises the channels it
    keeps, with their scales and shifts (AutoFormer's weight entanglement)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if width == self.normalized_shape[0]:
            return super().forward(x)
        return F.layer_norm(x, (width,), self.weight[:width], self.bias[:width], self.eps)


class ElasticQuantizedConv2d(nn.Conv2d):
    """A frozen convolution of the image encoder (patch embedding or neck) with elastic channels and, when it is
    quantized, LSQ fake quantizers at a selectable bit-width.

    It subclasses `nn.Conv2d` so that `weight` and `bias` keep the names of the convolution it replaces. Weights are
    quantized symmetric per output channel, inputs per tensor (unsigned with a learned offset, LSQ+, or signed), as
    for the Linears; each bit-width owns its steps. Convolutions carry no adapter: the patch embedding and the neck
    stay frozen, their step sizes train.

    Args:
        conv (`nn.Conv2d`): the convolution whose shape (and stride, padding) it takes.
        config (`SamSupernetConfig`, *optional*): the bit-width choices and quantizer settings; `None` for a
            convolution that is not quantized (it has no quantizers, only elastic channels).
    """

    def __init__(self, conv: nn.Conv2d, config: SamSupernetConfig | None):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
        )
        self.weight_quantizer = self.input_quantizer = None
        if config is not None:
            self.weight_quantizer = LsqQuantizer(
                config.weight_bit_choices,
                num_channels=conv.out_channels,
                signed=True,
                step_size_min=config.step_size_min,
            )
            self.input_quantizer = LsqQuantizer(
                config.activation_bit_choices,
                signed=not config.activation_offset,
                learn_offset=config.activation_offset,
                step_size_min=config.step_size_min,
            )
        self.active_out_channels, self.active_in_channels = conv.out_channels, conv.in_channels

    def set_active(
        self,
        weight_bits: int = FLOAT_BITS,
        activation_bits: int = FLOAT_BITS,
        out_channels: int | None = None,
        in_channels: int | None = None,
    ) -> None:
        """Selects the bit-widths (32 = float) and the leading output and input channels kept (`None`: all)."""
        if self.weight_quantizer is None:
            if (weight_bits, activation_bits) != (FLOAT_BITS, FLOAT_BITS):
                raise ValueError(
                    f"This convolution is not quantized (not in `quantized_layers`); it runs at 32 bits, not "
                    f"{weight_bits}/{activation_bits}."
                )
        else:
            self.weight_quantizer.set_bits(weight_bits)
            self.input_quantizer.set_bits(activation_bits)
        self.active_out_channels = self.out_channels if out_channels is None else out_channels
        self.active_in_channels = self.in_channels if in_channels is None else in_channels

    @torch.no_grad()
    def initialize_weight_quantizer(self) -> None:
        """Initialises the weight step sizes of every bit-width from the full weight."""
        if self.weight_quantizer is None or self.weight.device.type == "meta":
            return
        for bits in self.weight_quantizer.bit_choices:
            self.weight_quantizer.initialize(self.weight, bits, channel_dim=0)

    def quantized_weight(self) -> torch.Tensor:
        """The active channels of the weight, fake-quantized at the active weight bit-width."""
        weight = self.weight[: self.active_out_channels, : self.active_in_channels]
        if self.weight_quantizer is None or not self.weight_quantizer.is_quantizing:
            return weight
        channels = None
        if self.active_out_channels != self.out_channels:
            channels = torch.arange(self.active_out_channels, device=weight.device)
        return self.weight_quantizer(weight, channel_index=channels)

    def active_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[: self.active_out_channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.quantized_weight(), self.active_bias())


class ElasticSamVisionAttention(QuantizedSamVisionAttention):
    """The supernet's attention: a selectable number of heads, LoRA-adapted quantized Linears, multi-bit products.

    The first `active_heads` heads are kept (heads are sorted by importance when the supernet is built): the fused
    `qkv` keeps those heads' rows of each of q, k and v, and `proj` the matching input columns.
    """

    def __init__(self, config: SamSupernetConfig, window_size: int):
        use_sdpa = config._attn_implementation == "sdpa"
        super().__init__(config.vision_config, window_size, use_sdpa, config.attention_chunk_elements)
        self.qkv = make_quantized_linear(self.qkv, config)
        self.proj = make_quantized_linear(self.proj, config)
        self.quantize_products = config.quantize_attention_products
        bits, offset, step_min = config.activation_bit_choices, config.activation_offset, config.step_size_min
        self.query_quantizer = LsqQuantizer(bits, signed=True, step_size_min=step_min)
        self.key_quantizer = LsqQuantizer(bits, signed=True, step_size_min=step_min)
        self.value_quantizer = LsqQuantizer(bits, signed=not offset, learn_offset=offset, step_size_min=step_min)
        self.probs_quantizer = LsqQuantizer(bits, signed=False, step_size_min=step_min)

    def set_active(self, num_heads: int, product_bits: int) -> None:
        """Keeps the first `num_heads` heads; runs the act×act products at `product_bits` (32 = float)."""
        self.active_heads = num_heads
        bits = product_bits if self.quantize_products else FLOAT_BITS
        for quantizer in self.product_quantizers():
            quantizer.set_bits(bits)

    def head_rows(self, num_heads: int, device) -> torch.Tensor | None:
        """Rows of the fused qkv weight that belong to the first `num_heads` heads of each of q, k and v."""
        if num_heads == self.num_attention_heads:
            return None
        width = self.num_attention_heads * self.head_dim
        kept = torch.arange(num_heads * self.head_dim, device=device)
        return torch.cat([kept + part * width for part in range(3)])


class ElasticSamVisionLayer(SamVisionLayer):
    """A SAM encoder block whose attention, MLP and feature size are elastic and quantized; transformers' forward is
    reused."""

    def __init__(self, config: SamSupernetConfig, window_size: int):
        vision = eager_vision_config(config.vision_config)
        super().__init__(vision, window_size)
        self.layer_norm1 = ElasticLayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.layer_norm2 = ElasticLayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.attn = ElasticSamVisionAttention(config, window_size)
        self.mlp.lin1 = make_quantized_linear(self.mlp.lin1, config)
        self.mlp.lin2 = make_quantized_linear(self.mlp.lin2, config)

    def quantized_linears(self) -> dict[str, QuantizedLoraLinear]:
        return {"attn.qkv": self.attn.qkv, "attn.proj": self.attn.proj, "mlp.lin1": self.mlp.lin1, "mlp.lin2": self.mlp.lin2}

    def set_active(
        self, num_heads: int, mlp_dim: int, bits: dict[str, tuple[int, int]], hidden_size: int | None = None
    ) -> None:
        """Selects heads, MLP width, the feature size (`None`: all channels) and the `(weight_bits, activation_bits)`
        of each quantized Linear."""
        attn, mlp = self.attn, self.mlp
        device = attn.qkv.weight.device
        product_bits = bits["attn.qkv"][1]
        attn.set_active(num_heads, product_bits)
        width = num_heads * attn.head_dim
        mlp_rows = None if mlp_dim == mlp.lin1.out_features else torch.arange(mlp_dim, device=device)
        full = hidden_size is None or hidden_size == mlp.lin2.out_features
        hidden_rows = None if full else torch.arange(hidden_size, device=device)
        attn.qkv.set_active(*bits["attn.qkv"], output_index=attn.head_rows(num_heads, device), in_features=hidden_size)
        attn.proj.set_active(*bits["attn.proj"], output_index=hidden_rows, in_features=width)
        mlp.lin1.set_active(*bits["mlp.lin1"], output_index=mlp_rows, in_features=hidden_size)
        mlp.lin2.set_active(*bits["mlp.lin2"], output_index=hidden_rows, in_features=mlp_dim)


class ElasticSamVisionEncoder(ResizingSamVisionEncoder):
    """SAM's ViT image encoder with elastic resolution, depth, heads, MLP width, feature size and bit-widths (see
    `set_active`); its patch embedding and neck convolutions are quantized where the configuration says so."""

    def __init__(self, config: SamSupernetConfig):
        vision = config.vision_config
        layers = nn.ModuleList(
            ElasticSamVisionLayer(config, vision.window_size if i not in vision.global_attn_indexes else 0)
            for i in range(vision.num_hidden_layers)
        )
        super().__init__(vision, layers)
        self.config = config
        for kind, path in CONV_PATHS.items():
            parent, name = path.rsplit(".", 1)
            owner = self.get_submodule(parent)
            quantized = kind in config.quantized_layers
            setattr(owner, name, ElasticQuantizedConv2d(getattr(owner, name), config if quantized else None))

    def quantized_convs(self) -> dict[str, ElasticQuantizedConv2d]:
        """The encoder's convolutions by layer name (`"patch_embed.projection"`, `"neck.conv1"`, `"neck.conv2"`)."""
        return {path: self.get_submodule(path) for path in CONV_PATHS.values()}

    def set_active(self, arch: SubnetArchitecture) -> None:
        """Applies an architecture (already validated against the search space) to every block and convolution."""
        self.resolution = arch.resolution
        self.kept_blocks = arch.kept_blocks
        hidden_size = arch.hidden_size
        for index, layer in enumerate(self.layers):
            bits = {path: arch.bits_of(f"layers.{index}.{path}") for path in layer.quantized_linears()}
            layer.set_active(arch.num_heads[index], arch.mlp_dims[index], bits, hidden_size)
        convs = self.quantized_convs()
        convs[CONV_PATHS["patch_embed"]].set_active(*arch.bits_of(CONV_PATHS["patch_embed"]), out_channels=hidden_size)
        convs[CONV_PATHS["neck_conv1"]].set_active(*arch.bits_of(CONV_PATHS["neck_conv1"]), in_channels=hidden_size)
        convs[CONV_PATHS["neck_conv2"]].set_active(*arch.bits_of(CONV_PATHS["neck_conv2"]))
