"""The elastic, quantized pieces of SAM's ViT image encoder: heads, MLP width, feature size, depth, resolution.

The modules keep the names and parameter shapes of transformers' `SamVisionEncoder`, so a SAM state dict loads into
them as it is; they reuse transformers' window partitioning and relative-position code.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import (
    SamPatchEmbeddings,
    SamVisionAttention,
    SamVisionEncoderOutput,
    SamVisionLayer,
    SamVisionNeck,
)

from .architecture import CONV_PATHS, FLOAT_BITS, SubnetArchitecture
from .configuration_sam_supernet import SamSupernetConfig
from .lora import QuantizedLoraLinear
from .quantization import LsqQuantizer
from .recompute import RecomputedFunction


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


def eager_vision_config(vision_config):
    """A copy of `vision_config` that builds transformers' eager attention.

    The encoder blocks here replace the attention transformers builds right away; building it as "eager" keeps its
    constructor from depending on an attention implementation that is only resolved later, when loading a checkpoint.
    """
    vision = copy.copy(vision_config)
    vision._attn_implementation = "eager"
    return vision


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


class QuantizedSamVisionAttention(SamVisionAttention):
    """SAM's windowed/global attention on quantized Linears, with quantized act×act products.

    `active_heads` heads of the base model's head width run: the fused `qkv` gives their queries, keys and values,
    `proj` mixes them back. When the products are quantized, queries, keys and values are fake-quantized at the
    block's activation bits, and so are the attention probabilities (on an unsigned grid), so the products run on the
    operands that BitOPs prices.

    Subclasses set `qkv`, `proj` and the four product quantizers (`query_quantizer`, `key_quantizer`,
    `value_quantizer`, `probs_quantizer`): the supernet's elastic ones, or the fixed ones of an extracted subnet.

    Args:
        vision_config (`SamVisionConfig`): the base SAM's vision configuration (head width, relative positions).
        window_size (`int`): the attention window, 0 for global attention.
        use_sdpa (`bool`): whether float products run in `scaled_dot_product_attention`.
    """

    def __init__(self, vision_config, window_size: int, use_sdpa: bool):
        super().__init__(vision_config, window_size)
        self.head_dim = vision_config.hidden_size // self.num_attention_heads
        self.use_sdpa = use_sdpa
        self.active_heads = self.num_attention_heads

    def product_quantizers(self) -> tuple[LsqQuantizer, ...]:
        return self.query_quantizer, self.key_quantizer, self.value_quantizer, self.probs_quantizer

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, height, width, _ = hidden_states.shape
        heads = self.active_heads
        qkv = self.qkv(hidden_states).reshape(batch_size, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.reshape(3, batch_size * heads, height * width, -1).unbind(0)

        attn_weights = None
        if self.use_sdpa and not self.probs_quantizer.is_quantizing and not output_attentions:
            bias = self.relative_position_bias(query, *self.core_parameters()[:2], height, width)
            attn_output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.scale)
        else:
            for quantizer, tensor in zip(self.product_quantizers(), (query, key, value)):
                quantizer.ensure_initialized(tensor)
            core = self.attention_core(height, width, keep_weights=bool(output_attentions))
            inputs = (query, key, value, *self.core_parameters())
            recompute = not output_attentions and not (self.training and self.dropout > 0)
            if torch.is_grad_enabled() and recompute:
                attn_output = RecomputedFunction.apply(core, *inputs)
            else:
                attn_output = core(*inputs)
            if output_attentions:
                attn_output, attn_weights = attn_output

        attn_output = attn_output.reshape(batch_size, heads, height, width, -1).permute(0, 2, 3, 1, 4)
        attn_output = self.proj(attn_output.reshape(batch_size, height, width, -1))
        return attn_output, attn_weights

    def relative_position_bias(self, query, rel_pos_h, rel_pos_w, height: int, width: int) -> torch.Tensor | None:
        """The decomposed relative-position bias of shape `(batch * heads, tokens, tokens)`, or `None` without it."""
        if not self.use_rel_pos:
            return None
        size = (height, width)
        bias = self.get_decomposed_rel_pos(query, rel_pos_h, rel_pos_w, size, size)
        return bias.reshape(query.shape[0], height * width, height * width)

    def core_parameters(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors the attention core takes besides queries, keys and values: the relative-position tables, then
        the step-size and offset tables of the query, key, value and probability quantizers."""
        tables = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
        steps = tuple(tensor for quantizer in self.product_quantizers() for tensor in quantizer.quantize_tables())
        return tables + steps

    def attention_core(self, height: int, width: int, keep_weights: bool = False):
        """The act×act part of attention as a function of `(query, key, value, *core_parameters())`.

        It quantizes queries, keys and values, adds the relative-position bias, takes the softmax, quantizes the
        probabilities and multiplies them with the values. The bit-widths are frozen when it is made, so that its
        recomputation in the backward pass (`RecomputedFunction`) repeats the forward pass even if another subnet was
        activated in between. With `keep_weights` it returns `(output, attention probabilities)`.
        """
        quantizers = self.product_quantizers()
        bits = [quantizer.active_bits for quantizer in quantizers]
        probs_quantizer = self.probs_quantizer
        dropout = self.dropout if self.training else 0.0

        def core(query, key, value, rel_pos_h, rel_pos_w, *quantizer_tables):
            steps, offsets = quantizer_tables[0::2], quantizer_tables[1::2]
            query, key, value = (
                quantizer.fake_quantize(tensor, bit, step, offset)
                for quantizer, tensor, bit, step, offset in zip(quantizers, (query, key, value), bits, steps, offsets)
            )
            attn_weights = (query * self.scale) @ key.transpose(-2, -1)
            bias = self.relative_position_bias(query, rel_pos_h, rel_pos_w, height, width)
            if bias is not None:
                attn_weights = attn_weights + bias
            attn_weights = torch.softmax(attn_weights, dtype=torch.float32, dim=-1).to(query.dtype)
            probs = nn.functional.dropout(attn_weights, p=dropout, training=dropout > 0)
            probs_quantizer.ensure_initialized(probs, bits[3])
            output = probs_quantizer.fake_quantize(probs, bits[3], steps[3], offsets[3]) @ value
            return (output, attn_weights) if keep_weights else output

        return core


class ElasticSamVisionAttention(QuantizedSamVisionAttention):
    """The supernet's attention: a selectable number of heads, LoRA-adapted quantized Linears, multi-bit products.

    The first `active_heads` heads are kept (heads are sorted by importance when the supernet is built): the fused
    `qkv` keeps those heads' rows of each of q, k and v, and `proj` the matching input columns.
    """

    def __init__(self, config: SamSupernetConfig, window_size: int):
        super().__init__(config.vision_config, window_size, use_sdpa=config._attn_implementation == "sdpa")
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


class ResizingSamVisionEncoder(nn.Module):
    """SAM's ViT image encoder, running its blocks at an input resolution at or below the base `image_size`.

    At a resolution below the base `image_size`, the absolute position embedding is interpolated to the smaller
    grid (transformers never interpolates it; the relative-position tables are already interpolated inside the
    attention), and the output embedding is resized back to the base grid, so that the prompt encoder, the mask
    decoder and the prompts' coordinate frame stay those of the base model.

    It accepts pixel values at the base `image_size` (what `SamProcessor` produces; they are resized to the active
    resolution) or already at the active resolution.

    Args:
        vision_config (`SamVisionConfig`): the base SAM's vision configuration.
        layers (`nn.ModuleList`): the encoder blocks; those listed in `kept_blocks` (all, unless a subclass says
            otherwise) run, in order.
        resolution (`int`, *optional*): the input resolution the blocks run at; defaults to the base `image_size`.
        hidden_size (`int`, *optional*): the feature size of the patch embedding, position embedding and the neck's
            input; defaults to the base `hidden_size`.
    """

    def __init__(
        self, vision_config, layers: nn.ModuleList, resolution: int | None = None, hidden_size: int | None = None
    ):
        super().__init__()
        self.image_size = vision_config.image_size
        self.patch_size = vision_config.patch_size
        if hidden_size is not None and hidden_size != vision_config.hidden_size:
            vision_config = copy.copy(vision_config)
            vision_config.hidden_size = hidden_size
        self.patch_embed = SamPatchEmbeddings(vision_config)
        grid = vision_config.image_size // vision_config.patch_size
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, grid, grid, vision_config.hidden_size)) if vision_config.use_abs_pos else None
        )
        self.layers = layers
        self.neck = SamVisionNeck(vision_config)
        self.resolution = resolution or vision_config.image_size
        self.kept_blocks = tuple(range(len(layers)))

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding's convolution: the first module `forward` calls (`SamModel` and peft ask for it).

        `SamVisionEncoder` returns its `SamPatchEmbeddings`; this encoder calls the convolution directly (the
        wrapper refuses other input sizes), so hooks such as `enable_input_require_grads` are placed on it.
        """
        return self.patch_embed.projection

    def prepare_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Checks the input's shape and dtype, and resizes base-size images to the active resolution.

        Raises:
            `ValueError`: for another shape or size. `TypeError`: for a dtype other than the model's float dtype
            (uint8 pixels, or fp16 into a float32 model), which `SamModel` refuses too; a quantized patch embedding
            would otherwise quantize them silently.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.patch_embed.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.patch_embed.num_channels}, height, width); "
                f"got {tuple(pixel_values.shape)}."
            )
        dtype = self.neck.layer_norm1.weight.dtype
        if pixel_values.dtype != dtype:
            raise TypeError(
                f"pixel_values must have the model's dtype {dtype}; got {pixel_values.dtype}. Give what the "
                "processor makes (`SamProcessor(images, return_tensors=\"pt\")`), cast with `.to(model.dtype)`."
            )
        size = tuple(pixel_values.shape[-2:])
        allowed = {(self.image_size, self.image_size), (self.resolution, self.resolution)}
        if size not in allowed:
            raise ValueError(
                f"Image of size {size[0]}x{size[1]} does not fit this model: pixel values must be "
                f"{self.image_size}x{self.image_size} (the processor's frame) or the active resolution "
                f"{self.resolution}x{self.resolution}."
            )
        if size[0] != self.resolution:
            # The antialiased resize has no CPU kernel for float16/bfloat16: it runs in float32 and is cast back, so
            # that a model loaded with `dtype=torch.bfloat16` runs at a reduced resolution too.
            resized = F.interpolate(
                pixel_values.float(),
                size=(self.resolution, self.resolution),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            pixel_values = resized.to(pixel_values.dtype)
        return pixel_values

    def position_embedding(self, grid: int) -> torch.Tensor:
        if self.pos_embed.shape[1] == grid:
            return self.pos_embed
        resized = F.interpolate(self.pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SamVisionEncoderOutput:
        pixel_values = self.prepare_pixel_values(pixel_values)
        # SamPatchEmbeddings refuses any size but image_size, so its projection is applied directly.
        hidden_states = self.patch_embed.projection(pixel_values).permute(0, 2, 3, 1)
        grid = hidden_states.shape[1]
        if self.pos_embed is not None:
            # An elastic feature size keeps the leading channels (interpolation works channel by channel).
            hidden_states = hidden_states + self.position_embedding(grid)[..., : hidden_states.shape[-1]]
        for index in self.kept_blocks:
            hidden_states = self.layers[index](hidden_states)
        embeddings = self.neck(hidden_states)
        base_grid = self.image_size // self.patch_size
        if grid != base_grid:
            embeddings = F.interpolate(embeddings, size=(base_grid, base_grid), mode="bilinear", align_corners=False)
        return SamVisionEncoderOutput(last_hidden_state=embeddings)


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
