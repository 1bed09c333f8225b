"""`SamSemanticImageProcessor`: SAM's image processor for class segmentation, with label maps and post-processing.

SAM resizes an image so that its longest side is the model's input size and pads it bottom/right to a square. A
label map must follow the same geometry, with nearest-neighbour resizing and padding by the ignore index (SAM's own
processor pads segmentation maps with 0, a class id). The model's class logits cover the padded square, so turning
them into a map of the original image means undoing the padding, then the resize (what
[`post_process_semantic_segmentation`] does, as transformers' `image-segmentation` pipeline calls it).
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature

from .configuration_sam_semantic import IGNORE_INDEX
from .image_processing import PillowSamImageProcessor, sam_processor_settings


def resized_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The `(height, width)` SAM resizes an image to: the longest side to `longest_edge`, rounded half up."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _as_label_array(label_map) -> np.ndarray:
    array = np.asarray(label_map)
    if array.ndim != 2:
        raise ValueError(f"A label map must be a 2-D array of class ids (height, width), got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"A label map must hold integer class ids, got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() > IGNORE_INDEX):
        raise ValueError(
            f"A label map holds {int(array.min())} to {int(array.max())}; class ids and the ignore index must lie in "
            f"0 to {IGNORE_INDEX} (uint8)."
        )
    return array.astype(np.uint8)


class SamSemanticImageProcessor(PillowSamImageProcessor):
    """SAM's image processor (Pillow backend) for the semantic segmentation models.

    `__call__(images, segmentation_maps=None)` returns `pixel_values` (SAM's resize, rescale, normalisation and
    padding) and, with label maps, `labels`: the maps resized with nearest neighbour as the images are and padded to
    the input size with the ignore index 255, as int64 `(batch, size, size)`. It returns nothing else, so that its
    output can be passed to the model as it is (transformers' `image-segmentation` pipeline does that).

    Make one for a model of input size `image_size` with [`for_model`] (the models save it beside their weights).
    """

    ignore_index = IGNORE_INDEX

    @classmethod
    def for_model(cls, image_size: int, patch_size: int) -> "SamSemanticImageProcessor":
        """The processor of a model whose input is `image_size` pixels square, with patches of `patch_size`."""
        return cls(**sam_processor_settings(image_size, patch_size))

    def preprocess(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        """Pixel values of `images`, and `labels` from `segmentation_maps` (class ids, 255 for ignored pixels).

        Args:
            images: one image or a list (PIL, numpy or torch), as SAM's processor takes them.
            segmentation_maps (*optional*): one 2-D integer label map per image, the size of its image.
            kwargs: SAM's processor options (`return_tensors`, ...).

        Raises:
            `ValueError`: if a label map is not 2-D integer class ids in 0..255, is not the size of its image, or the
            numbers of images and maps differ.
        """
        encoded = super().preprocess(images, **kwargs)
        sizes = [tuple(int(side) for side in size) for size in encoded.pop("original_sizes")]
        encoded.pop("reshaped_input_sizes", None)
        if segmentation_maps is None:
            return encoded
        maps = segmentation_maps if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
        if len(maps) != len(sizes):
            raise ValueError(f"Got {len(sizes)} images but {len(maps)} label maps; give one label map per image.")
        labels = np.stack([self._label_map(label_map, size) for label_map, size in zip(maps, sizes)])
        encoded["labels"] = torch.from_numpy(labels.astype(np.int64)) if kwargs.get("return_tensors") == "pt" else labels
        return encoded

    def _label_map(self, label_map, image_size: tuple[int, int]) -> np.ndarray:
        array = _as_label_array(label_map)
        if array.shape != image_size:
            raise ValueError(f"A label map of shape {array.shape} was given for an image of size {image_size}.")
        longest = self.size["longest_edge"]
        height, width = resized_shape(*image_size, longest)
        resized = np.asarray(Image.fromarray(array).resize((width, height), Image.NEAREST))
        padded = np.full((self.pad_size["height"], self.pad_size["width"]), self.ignore_index, dtype=np.uint8)
        padded[:height, :width] = resized
        return padded

    def post_process_semantic_segmentation(self, outputs, target_sizes=None) -> list[torch.Tensor]:
        """Class maps of the original images from the model's class logits.

        The logits cover the padded square input; for each image they are upsampled (bilinear) to the input size,
        cropped to the resized image (undoing the padding), resized to the image's size (undoing SAM's resize), then
        the most likely class is taken per pixel.

        Args:
            outputs: the model's output (`logits` of shape `(batch, num_labels, h, w)`).
            target_sizes (`list[tuple[int, int]]`, *optional*): the `(height, width)` of each original image.
                Without it, the class maps are at the logits' size, padding included.

        Returns:
            `list[torch.Tensor]`: one `(height, width)` int64 map of class ids per image.

        Raises:
            `ValueError`: if `target_sizes` does not give one size per image.
        """
        logits = outputs.logits
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(logits)} images' logits but {len(target_sizes)} target sizes.")
        input_size = self.pad_size["height"], self.pad_size["width"]
        maps = []
        for image_logits, (height, width) in zip(logits, target_sizes):
            resized_height, resized_width = resized_shape(height, width, self.size["longest_edge"])
            upsampled = F.interpolate(image_logits[None].float(), size=input_size, mode="bilinear", align_corners=False)
            cropped = upsampled[..., :resized_height, :resized_width]
            original = F.interpolate(cropped, size=(int(height), int(width)), mode="bilinear", align_corners=False)
            maps.append(original[0].argmax(dim=0))
        return maps


__all__ = ["SamSemanticImageProcessor", "resized_shape"]
