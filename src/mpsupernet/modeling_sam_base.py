"""What the supernet and the subnet models share: one `PreTrainedModel` base around a transformers `SamModel`, and
the non-elastic bases of their image encoders.

Both hold a `SamModel` (`self.sam`) whose image encoder is replaced by their own (elastic for the supernet, cut to the
architecture for a subnet); the prompt encoder and mask decoder are SAM's own, and `forward` is SAM's. Both encoders
derive from `ResizingSamVisionEncoder` (any resolution at or below the base one) and both attentions from
`QuantizedSamVisionAttention` (quantized Linears and act×act products); the elastic pieces are `mpsupernet.elastic`'s.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SamModel
from transformers.models.sam.modeling_sam import (
    SamImageSegmentationOutput,
    SamPatchEmbeddings,
    SamVisionAttention,
    SamVisionEncoderOutput,
    SamVisionNeck,
)

from .checkpoints import CrashSafeSaveMixin
from .chunked_attention import ChunkedAttention, ChunkedAttentionCore, query_chunk_rows
from .configuration_sam_supernet import SamQuantizedConfigBase
from .image_processing import sam_image_processor
from .quantization import LsqQuantizer, name_quantizers
from .recompute import RecomputedFunction


def eager_vision_config(vision_config):
    """A copy of `vision_config` that builds transformers' eager attention.

    The encoder blocks here replace the attention transformers builds right away; building it as "eager" keeps its
    constructor from depending on an attention implementation that is only resolved later, when loading a checkpoint.
    """
    vision = copy.copy(vision_config)
    vision._attn_implementation = "eager"
    return vision


class QuantizedSamVisionAttention(SamVisionAttention):
    """SAM's windowed/global attention on quantized Linears, with quantized act×act products.

    `active_heads` heads of the base model's head width run: the fused `qkv` gives their queries, keys and values,
    `proj` mixes them back. When the products are quantized, queries, keys and values are fake-quantized at the
    block's activation bits, and so are the attention probabilities (on an unsigned grid), so the products run on the
    operands that BitOPs prices.

    Subclasses set `qkv`, `proj` and the four product quantizers (`query_quantizer`, `key_quantizer`,
    `value_quantizer`, `probs_quantizer`): the supernet's elastic ones, or the fixed ones of an extracted subnet.

    When the scores of all heads (`batch * heads x tokens x tokens`) would hold more than `chunk_elements` elements
    (the global blocks at 1024 px), the products run a chunk of query rows at a time in the forward and the backward
    pass ([`ChunkedAttention`]), with the same result; otherwise (windowed blocks, small resolutions, attention
    dropout, `output_attentions`) they run whole.

    Args:
        vision_config (`SamVisionConfig`): the base SAM's vision configuration (head width, relative positions).
        window_size (`int`): the attention window, 0 for global attention.
        use_sdpa (`bool`): whether float products that run whole run in `scaled_dot_product_attention`.
        chunk_elements (`int`): the most score elements the products make at a time (`attention_chunk_elements` of
            the model's configuration).
    """

    def __init__(self, vision_config, window_size: int, use_sdpa: bool, chunk_elements: int):
        super().__init__(vision_config, window_size)
        self.head_dim = vision_config.hidden_size // self.num_attention_heads
        self.use_sdpa = use_sdpa
        self.chunk_elements = chunk_elements
        self.active_heads = self.num_attention_heads

    def product_quantizers(self) -> tuple[LsqQuantizer, ...]:
        return self.query_quantizer, self.key_quantizer, self.value_quantizer, self.probs_quantizer

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, height, width, _ = hidden_states.shape
        heads = self.active_heads
        qkv = self.qkv(hidden_states).reshape(batch_size, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.reshape(3, batch_size * heads, height * width, -1).unbind(0)

        attn_weights = None
        tokens = height * width
        chunk_rows = query_chunk_rows(query.shape[0], tokens, tokens, self.chunk_elements)
        # Returned weights and dropout (whose mask a recomputation would not repeat) need the whole path.
        whole_only = bool(output_attentions) or (self.training and self.dropout > 0)
        # A meta tensor (pricing with torch's flop counter) holds no memory: the whole path counts the same products.
        chunked = chunk_rows < tokens and not whole_only and query.device.type != "meta"
        if self.use_sdpa and not self.probs_quantizer.is_quantizing and not output_attentions and not chunked:
            bias = self.relative_position_bias(query, *self.core_parameters()[:2], height, width)
            attn_output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.scale)
        else:
            for quantizer, tensor in zip(self.product_quantizers(), (query, key, value)):
                quantizer.ensure_initialized(tensor)
            inputs = (query, key, value, *self.core_parameters())
            if chunked:
                attn_output = ChunkedAttention.apply(ChunkedAttentionCore(self, height, width, chunk_rows), *inputs)
            else:
                core = self.attention_core(height, width, keep_weights=bool(output_attentions))
                if torch.is_grad_enabled() and not whole_only:
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


class SamQuantizedPreTrainedModel(CrashSafeSaveMixin, PreTrainedModel):
    """Base class of [`SamSupernetForMaskGeneration`] and [`SamSubnetForMaskGeneration`].

    Subclasses set `config_class`, `_no_split_modules` and `checkpoint_kind` (the word error messages use for a
    checkpoint), build their image encoder in `_make_vision_encoder`, initialise their own layers in
    `_init_own_weights`, and may act on a freshly loaded model in `_after_loading`. Saves are crash-safe and loads
    check that config and weights belong together (`mpsupernet.checkpoints.CrashSafeSaveMixin`).
    """

    config_class = SamQuantizedConfigBase
    base_model_prefix = "sam"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _tied_weights_keys = {
        "sam.prompt_encoder.shared_embedding.positional_embedding": "sam.shared_image_embedding.positional_embedding"
    }
    checkpoint_kind = "model"
    quantizer_steps_loaded = False
    """Whether the step sizes of a freshly built model count as set (a subnet's always come from its checkpoint) or
    are to be initialised from data (a supernet's)."""

    def __init__(self, config: SamQuantizedConfigBase):
        super().__init__(config)
        sam_config = config.to_sam_config()
        sam_config._attn_implementation = config._attn_implementation
        self.sam = SamModel(sam_config)
        self.sam.vision_encoder = self._make_vision_encoder(config)

    def post_init(self):
        super().post_init()
        # Quantizers name themselves in their errors ("a NaN in the batch that would set the step of ...").
        name_quantizers(self)

    def _make_vision_encoder(self, config: SamQuantizedConfigBase) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must build its image encoder in `_make_vision_encoder`.")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        if self._init_own_weights(module):
            return
        if isinstance(module, LsqQuantizer):
            module.reset_steps(initialized=self.quantizer_steps_loaded)
        elif isinstance(module, SamModel):
            module._init_weights(module)
        elif isinstance(module, ResizingSamVisionEncoder) and module.pos_embed is not None:
            module.pos_embed.zero_()

    def _init_own_weights(self, module: nn.Module) -> bool:
        """Initialises a layer only this subclass has; returns whether `module` was one."""
        return False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Loads a saved model (local folder or Hub repo), as `PreTrainedModel.from_pretrained` does.

        A checkpoint that cannot be read, or whose config and weights come from different saves, raises an error
        that names it (see `mpsupernet.checkpoints`).
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._after_loading()
        return loaded

    def _save_companion_files(self, folder) -> None:
        """Writes the image processor at this model's input size into the folder being saved.

        `preprocessor_config.json` (see `mpsupernet.image_processing.sam_image_processor`) is what
        `SamProcessor.from_pretrained` and `pipeline("mask-generation", model=...)` read; without it they fall back to
        SAM ViT-B's 1024 pixels, which a smaller model refuses. It is written inside the crash-safe save, so the folder
        never holds a processor of another model, and `push_to_hub` pushes it too.
        """
        vision = self.config.vision_config
        sam_image_processor(vision.image_size, vision.patch_size).save_pretrained(folder)

    def _after_loading(self) -> None:
        """Called on the model `from_pretrained` returns; nothing to do here."""

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embeddings of the model's (active) architecture, on the base model's prompt grid.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, 3, height, width)`): at the base `image_size` or at the
                architecture's resolution.

        Returns:
            `torch.Tensor` of shape `(batch, output_channels, grid, grid)`, the grid of the base image size.
        """
        return self.sam.vision_encoder(pixel_values).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.LongTensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.LongTensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
        **kwargs,
    ) -> SamImageSegmentationOutput:
        """Runs the model's (active) architecture; takes and returns what `SamModel.forward` takes and returns.

        `pixel_values` may be at the base `image_size` (as `SamProcessor` makes them) or at the architecture's
        resolution; prompts are always in the base model's coordinate frame.
        """
        return self.sam(
            pixel_values=pixel_values,
            input_points=input_points,
            input_labels=input_labels,
            input_boxes=input_boxes,
            input_masks=input_masks,
            image_embeddings=image_embeddings,
            multimask_output=multimask_output,
            **kwargs,
        )


__all__ = ["SamQuantizedPreTrainedModel"]
