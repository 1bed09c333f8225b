"""Class segmentation with a SAM supernet: `SamSupernetForSemanticSegmentation` and its extracted subnets.

The class head follows SAMed (Zhang and Liu, arXiv 2304.13785): SAM runs without prompts (the decoder sees only its
learned no-mask embedding) and its mask decoder has one mask token per class (`num_multimask_outputs =
num_labels`); the mask of token `c + 1` is the logit map of class `c`, at SAM's low resolution (a quarter of the
input). Everything else is the promptable supernet's: the same image encoder, search space, quantizers,
quantization-aware LoRA, extraction and BitOPs count (of the image encoder; the decoder stays float).

Why this head: it keeps SAM's two-way decoder, pretrained to turn image embeddings into masks, and changes only the
number of output tokens, so the per-class hypernetwork MLPs and mask tokens start from SAM's own (see
[`SamSupernetForSemanticSegmentation.from_sam`]); the subnet and its ONNX decoder graph are SAM's with more outputs.
The alternatives cost more: one MLP per class on SAM's tokens (finetune-anything) leaves the classes without a
token of their own in the decoder's attention, and mask classification (Mask2Former, AutoGluon) needs a matching loss
and a query decoder SAM has no weights for. The price is a decoder that grows with the classes (one mask token and
one three-layer MLP per class), mask token 0 that stays unused, and the IoU head that nothing trains (frozen).
"""

import torch
from transformers import SamModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_sam_semantic import SamSemanticSubnetConfig, SamSemanticSupernetConfig
from .image_processing_sam_semantic import SamSemanticImageProcessor
from .modeling_sam_subnet import SamSubnetForMaskGeneration
from .modeling_sam_supernet import SamSupernetForMaskGeneration
from .semantic_loss import check_semantic_labels, semantic_segmentation_loss

PROMPT_INPUTS = ("input_points", "input_labels", "input_boxes", "input_masks")
LABEL_SETTINGS = ("id2label", "label2id", "semantic_loss_ignore_index")
"""The config settings a semantic subnet takes over from its supernet."""


class SamForSemanticSegmentationMixin:
    """The prompt-free forward, loss and processor the semantic supernet and subnet share.

    `accepts_loss_kwargs = False`: the Trainer would otherwise pass `num_items_in_batch` counted as labels != -100, so
    ignored pixels (255) would shrink the loss.
    """

    accepts_loss_kwargs = False

    def forward(self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, **kwargs) -> SemanticSegmenterOutput:
        """Class logits of the model's (active) architecture, and the loss against `labels` if given.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, 3, size, size)`): images as [`SamSemanticImageProcessor`]
                makes them (at the base input size or at the architecture's resolution).
            labels (`torch.LongTensor` of shape `(batch, height, width)`, *optional*): class ids, the ignore index
                (`config.semantic_loss_ignore_index`) for pixels not to count.

        Returns:
            `SemanticSegmenterOutput`: `logits` of shape `(batch, num_labels, size // 4, size // 4)` (SAM's
            low-resolution masks) and, with labels, `loss` (`0.2 * CE + 0.8 * Dice`, see `mpsupernet.semantic_loss`).

        Raises:
            `ValueError`: if prompts are given (a semantic model takes none), or labels hold ids that are neither a
            class nor the ignore index.
            `TypeError`: for another unexpected argument.
        """
        prompts = sorted(name for name in PROMPT_INPUTS if kwargs.get(name) is not None)
        if prompts:
            raise ValueError(
                f"{type(self).__name__} segments every class without prompts, but got {prompts}. Box and point "
                "prompts are for the promptable models (`SamSupernetForMaskGeneration`, `SamSubnetForMaskGeneration`)."
            )
        unexpected = sorted(name for name in kwargs if name not in PROMPT_INPUTS)
        if unexpected:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected arguments {unexpected}.")
        config = self.config
        if labels is not None:
            check_semantic_labels(labels, config.num_labels, config.semantic_loss_ignore_index)
        # Without prompts the decoder sees only its output tokens and the no-mask embedding; `multimask_output`
        # keeps mask tokens 1..num_labels, one per class.
        outputs = self.sam(pixel_values=pixel_values, multimask_output=True)
        logits = outputs.pred_masks[:, 0]
        loss = None
        if labels is not None:
            loss = semantic_segmentation_loss(logits, labels, config.semantic_loss_ignore_index)
        return SemanticSegmenterOutput(loss=loss, logits=logits)

    def _save_companion_files(self, folder) -> None:
        """Writes [`SamSemanticImageProcessor`] at this model's input size, which the pipeline reads."""
        vision = self.config.vision_config
        SamSemanticImageProcessor.for_model(vision.image_size, vision.patch_size).save_pretrained(folder)


class SamSubnetForSemanticSegmentation(SamForSemanticSegmentationMixin, SamSubnetForMaskGeneration):
    """A standalone class-segmentation subnet extracted from a [`SamSupernetForSemanticSegmentation`].

    The image encoder is the subnet's (kept blocks, packed integer weights, see [`SamSubnetForMaskGeneration`]); the
    class head is SAM's mask decoder with one mask token per class. `forward(pixel_values, labels=None)` returns
    `SemanticSegmenterOutput` with class logits `(batch, num_labels, h, w)`, equal to the supernet's for this
    architecture. Load one with `AutoModelForSemanticSegmentation.from_pretrained` or run it with
    `pipeline("image-segmentation", model=folder)`.

    Args:
        config ([`SamSemanticSubnetConfig`]): the base SAM, the architecture and the classes.
    """

    config_class = SamSemanticSubnetConfig


class SamSupernetForSemanticSegmentation(SamForSemanticSegmentationMixin, SamSupernetForMaskGeneration):
    """A mixed-precision quantized SAM supernet with quantization-aware LoRA that segments classes, without prompts.

    The supernet of [`SamSupernetForMaskGeneration`] (same search space, quantizers, adapters, `set_subnet`,
    `bitops_report`) with SAMed's class head (see the module's documentation). Build one with [`from_sam`]; its
    `extract_subnet(budget)` returns a [`SamSubnetForSemanticSegmentation`].

    Args:
        config ([`SamSemanticSupernetConfig`]): the base SAM, the supernet settings and the classes.
    """

    config_class = SamSemanticSupernetConfig
    subnet_class = SamSubnetForSemanticSegmentation

    @classmethod
    def from_sam(
        cls,
        sam,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        sam_kwargs: dict | None = None,
        **config_overrides,
    ) -> "SamSupernetForSemanticSegmentation":
        """Converts a SAM checkpoint (a `SamModel`, a folder or a Hub id) into a class-segmentation supernet.

        As `SamSupernetForMaskGeneration.from_sam`, with the classes given by `id2label` or `num_labels` (or both,
        if they agree). The decoder gets one mask token and one hypernetwork MLP per class, each started from SAM's
        multimask token `1 + c % k` and its MLP (`k` = SAM's multimask outputs, 3), so every class begins as a
        pretrained mask predictor; the classes part ways as they train. The IoU head's last layer changes size and
        starts fresh, frozen: nothing trains it.

        Raises:
            `ValueError`: if neither `num_labels` nor `id2label` is given, or they disagree.
        """
        if id2label is None:
            if num_labels is None:
                raise ValueError("Give the classes: `num_labels=N` or `id2label={0: 'name', ...}` (or both, agreeing).")
            id2label = {index: f"LABEL_{index}" for index in range(num_labels)}
        elif num_labels is not None and num_labels != len(id2label):
            raise ValueError(
                f"`num_labels` is {num_labels} but `id2label` names {len(id2label)} classes ({dict(id2label)!r}); give "
                "one of them, or make them agree."
            )
        return super().from_sam(sam, sam_kwargs=sam_kwargs, id2label=id2label, **config_overrides)

    def _base_weights(self, sam: SamModel) -> dict[str, torch.Tensor]:
        original = sam.state_dict()
        state = dict(original)
        own = self.sam.state_dict()
        tokens = state["mask_decoder.mask_tokens.weight"]
        multimask = tokens.shape[0] - 1
        # Output index i >= 1 (class i - 1) takes SAM's multimask output 1 + (i - 1) % multimask.
        source = [0] + [1 + (index - 1) % multimask for index in range(1, own["mask_decoder.mask_tokens.weight"].shape[0])]
        state["mask_decoder.mask_tokens.weight"] = tokens[source].clone()
        prefix = "mask_decoder.output_hypernetworks_mlps."
        mlp_keys = {key[len(prefix) :].split(".", 1)[1] for key in state if key.startswith(prefix)}
        state = {key: value for key, value in state.items() if not key.startswith(prefix)}
        for index, origin in enumerate(source):
            for key in mlp_keys:
                state[f"{prefix}{index}.{key}"] = original[f"{prefix}{origin}.{key}"].clone()
        for key, value in own.items():
            if key in state and state[key].shape != value.shape:
                state[key] = value  # the IoU head's output layer: one output per mask token, so freshly initialised
        return state

    def freeze_base_model(self) -> None:
        """As the promptable supernet, and also freezes what the class head never uses: the IoU head and the
        hypernetwork MLP of mask token 0 (whose mask is dropped). They get no gradient, so a distributed step needs
        no `find_unused_parameters`."""
        super().freeze_base_model()
        decoder = self.sam.mask_decoder
        decoder.iou_prediction_head.requires_grad_(False)
        decoder.output_hypernetworks_mlps[0].requires_grad_(False)

    def subnet_config_kwargs(self) -> dict:
        return {name: getattr(self.config, name) for name in LABEL_SETTINGS}


__all__ = [
    "SamForSemanticSegmentationMixin",
    "SamSubnetForSemanticSegmentation",
    "SamSupernetForSemanticSegmentation",
]
