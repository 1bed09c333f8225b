"""SAM's image processor at a model's own input size, as the models save it beside their weights."""

import transformers

# Since transformers 5.x (5.24 here), `SamImageProcessor` is the torchvision backend and the Pillow one is
# `SamImageProcessorPil`; earlier 5.x releases named the Pillow one `SamImageProcessor`. torchvision is unusable next
# to the project's torch, so take the Pillow processor under either name.
PillowSamImageProcessor = getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


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
        `SamImageProcessorPil`: longest edge resized to `image_size`, padded to `image_size` x `image_size`, input
        masks at SAM's low-resolution size (`low_res_mask_size`).
    """
    return PillowSamImageProcessor(**sam_processor_settings(image_size, patch_size))
