"""SAM's image processor at a model's own input size, as the models save it beside their weights."""

import numpy as np
import torch
import transformers

# Since transformers 5.x (5.24 here), `SamImageProcessor` is the torchvision backend and the Pillow one is
# `SamImageProcessorPil`; earlier 5.x releases named the Pillow one `SamImageProcessor`. torchvision is unusable next
# to the project's torch, so take the Pillow processor under either name.
PillowSamImageProcessor = getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


def non_maximum_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: the indices of the boxes kept, highest score first.

    What `torchvision.ops.nms` (and `batched_nms` with one class) computes, written with torch alone: boxes are taken
    by descending score (ties in their given order), and each box kept removes every later one whose IoU with it is
    above `iou_threshold` (IoU of `(x1, y1, x2, y2)` boxes, areas `(x2 - x1) * (y2 - y1)`).

    Args:
        boxes (`torch.Tensor` of shape `(num_boxes, 4)`): `(x1, y1, x2, y2)` in pixels.
        scores (`torch.Tensor` of shape `(num_boxes,)`): the boxes' scores.
        iou_threshold (`float`): boxes overlapping a kept box by more than this IoU are dropped.

    Returns:
        `torch.Tensor` of shape `(num_kept,)`, int64: indices into `boxes`, by descending score.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes.float()[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    sides = (bottom_right - top_left).clamp_min(0)
    intersection = sides[..., 0] * sides[..., 1]
    overlaps = intersection / (areas[:, None] + areas[None, :] - intersection) > iou_threshold
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    kept = []
    for index in range(len(boxes)):
        if not suppressed[index]:
            kept.append(index)
            suppressed |= overlaps[index]
    return order[torch.tensor(kept, dtype=torch.int64)]


def rle_to_mask(rle: dict) -> np.ndarray:
    """The boolean `(height, width)` mask of a run-length encoding as `SamImageProcessor` writes it: `size` is
    `[height, width]`, `counts` alternate runs of False and True (False first) in column-major order."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    return np.repeat(values, rle["counts"]).reshape(width, height).transpose()


class SamQuantizedImageProcessorPil(PillowSamImageProcessor):
    """SAM's Pillow image processor, whose mask-generation post-processing needs no torchvision.

    transformers' `post_process_for_mask_generation` (the last step of `pipeline("mask-generation")`) imports
    torchvision for its non-maximum suppression, and torchvision does not import next to every torch build (not next
    to the project's own). This one suppresses with [`non_maximum_suppression`], which keeps the same masks in the
    same order, so that the pipeline runs wherever mpsupernet does. Everything else is `SamImageProcessorPil`'s.
    """

    def post_process_for_mask_generation(self, all_masks, all_scores, all_boxes, crops_nms_thresh):
        """Drops generated masks whose boxes overlap a better-scored one by more than `crops_nms_thresh` IoU.

        Args:
            all_masks (`list[dict]`): the masks, run-length encoded (see [`rle_to_mask`]).
            all_scores (`torch.Tensor` of shape `(num_masks,)`): their predicted IoU scores.
            all_boxes (`torch.Tensor` of shape `(num_masks, 4)`): their boxes, `(x1, y1, x2, y2)` in pixels.
            crops_nms_thresh (`float`): the IoU above which a mask is suppressed.

        Returns:
            `tuple`: the kept masks (boolean arrays), their scores, their encodings and their boxes, by descending
            score, as transformers returns them.
        """
        kept = non_maximum_suppression(all_boxes, all_scores, crops_nms_thresh)
        rle_masks = [all_masks[index] for index in kept]
        return [rle_to_mask(rle) for rle in rle_masks], all_scores[kept], rle_masks, all_boxes[kept]


def low_res_mask_size(image_size: int, patch_size: int) -> int:
    """Side of SAM's `pred_masks`: the mask decoder upscales the embedding grid 4 times.

    Args:
        image_size (`int`):
            Side of the model's (square, padded) input.
        patch_size (`int`):
            Side of a patch of the vision encoder.

    Returns:
        `int`: `4 * (image_size // patch_size)`, e.g. 256 for SAM's 1024-pixel input with 16-pixel patches.
    """
    return 4 * (image_size // patch_size)


def sam_processor_settings(image_size: int, patch_size: int) -> dict:
    """The size settings of SAM's image processor for a model whose input is `image_size` pixels square (see
    [`sam_image_processor`])."""
    mask_size = low_res_mask_size(image_size, patch_size)
    return {
        "size": {"longest_edge": image_size},
        "pad_size": {"height": image_size, "width": image_size},
        "mask_size": {"longest_edge": mask_size},
        "mask_pad_size": {"height": mask_size, "width": mask_size},
    }


def sam_image_processor(image_size: int, patch_size: int):
    """The SAM image processor (Pillow backend) for a model whose input is `image_size` pixels square.

    transformers' defaults are SAM ViT-B's: the longest edge resized to 1024 and padded to 1024 x 1024, input masks
    to 256. A model with another input size (the embedded SAM takes 128 pixels) needs those scaled, or the processor
    makes inputs the model refuses.

    Args:
        image_size (`int`): side of the model's square input, `config.vision_config.image_size`.
        patch_size (`int`): side of a patch of its vision encoder, `config.vision_config.patch_size`.

    Returns:
        [`SamQuantizedImageProcessorPil`]: longest edge resized to `image_size`, padded to `image_size` x
        `image_size`, input masks at SAM's low-resolution size (`low_res_mask_size`).
    """
    return SamQuantizedImageProcessorPil(**sam_processor_settings(image_size, patch_size))
