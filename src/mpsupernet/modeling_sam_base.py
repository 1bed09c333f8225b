"""What the supernet and the subnet models share: one `PreTrainedModel` base around a transformers `SamModel`.

Both hold a `SamModel` (`self.sam`) whose image encoder is replaced by their own (elastic for the supernet, cut to the
architecture for a subnet); the prompt encoder and mask decoder are SAM's own, and `forward` is SAM's.
"""

import torch
from torch import nn
from transformers import PreTrainedModel, SamModel
from transformers.models.sam.modeling_sam import SamImageSegmentationOutput

from .checkpoints import CrashSafeSaveMixin
from .configuration_sam_supernet import SamQuantizedConfigBase
from .elastic import ResizingSamVisionEncoder
from .image_processing import sam_image_processor
from .quantization import LsqQuantizer, name_quantizers


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
