"""Running an exported class-segmentation subnet without PyTorch: onnxruntime (or OpenVINO), numpy and Pillow only.

`OnnxSamForSemanticSegmentation` loads a folder written by `SamSubnetForSemanticSegmentation.export_onnx` (locally or
from the Hub): the QDQ image encoder and the prompt-free class decoder. An image goes in, a class map at its original
size comes out:

    >>> from PIL import Image
    >>> from mpsupernet.runtime_semantic import OnnxSamForSemanticSegmentation
    >>> model = OnnxSamForSemanticSegmentation.from_pretrained("exported-semantic-subnet")
    >>> image = Image.open("street.jpg")
    >>> inputs = model.preprocess(image)
    >>> class_map = model.post_process_semantic_segmentation(model(**inputs).logits, inputs["original_sizes"])[0]
    >>> names = {model.id2label[c] for c in set(class_map.flat)}

Like `mpsupernet.runtime`, this module must not import torch (nor anything that does).
"""

from dataclasses import dataclass

import numpy as np

from .layout import CLASS_DECODER_NAME
from .runtime import OnnxSamModel, resize_bilinear

PROMPT_INPUTS = ("input_points", "input_labels", "input_boxes", "input_masks")


@dataclass
class OnnxSemanticSegmenterOutput:
    """Class logits `(batch, num_labels, h, w)` at SAM's low resolution, and the image embeddings they came from."""

    logits: np.ndarray
    image_embeddings: np.ndarray

    def __getitem__(self, key: str) -> np.ndarray:
        return getattr(self, key)


class OnnxSamForSemanticSegmentation(OnnxSamModel):
    """An exported class-segmentation subnet run by onnxruntime or OpenVINO, without PyTorch.

    Loaded as [`OnnxSamModel`] is (`from_pretrained`, the same runtimes and settings); it runs the encoder, then the
    class decoder, and takes no prompts.

    Attributes:
        id2label (`dict[int, str]`): the class names, from the exported configuration.
    """

    decoder_file = CLASS_DECODER_NAME
    model_types = ("sam_semantic_subnet",)

    @property
    def id2label(self) -> dict[int, str]:
        return {int(index): name for index, name in self.config["id2label"].items()}

    def __call__(
        self, pixel_values: np.ndarray | None = None, image_embeddings: np.ndarray | None = None, **kwargs
    ) -> OnnxSemanticSegmenterOutput:
        """Class logits of `pixel_values` `(batch, 3, image_size, image_size)` (or of their `image_embeddings`).

        Other keys `preprocess` returns (`original_sizes`, `reshaped_input_sizes`) are ignored.

        Raises:
            `ValueError`: if prompts are given (a semantic subnet takes none), or neither input.
        """
        prompts = sorted(name for name in PROMPT_INPUTS if kwargs.get(name) is not None)
        if prompts:
            raise ValueError(
                f"This export segments every class without prompts, but got {prompts}. Box and point prompts are for "
                "the exports of promptable subnets (`mpsupernet.runtime.OnnxSamModel`)."
            )
        if image_embeddings is None:
            if pixel_values is None:
                raise ValueError("Give `pixel_values` (from `preprocess`) or `image_embeddings`.")
            image_embeddings = self.get_image_embeddings(pixel_values)
        logits = self.prompt_decoder({"image_embeddings": np.asarray(image_embeddings, np.float32)})[0]
        return OnnxSemanticSegmenterOutput(logits=logits, image_embeddings=image_embeddings)

    def preprocess(self, images, **prompts) -> dict[str, np.ndarray]:
        """`pixel_values`, `original_sizes` and `reshaped_input_sizes` of `images`, as `OnnxSamModel.preprocess`.

        Raises:
            `ValueError`: if prompts are given.
        """
        given = sorted(name for name, value in prompts.items() if value is not None)
        if given:
            raise ValueError(f"This export segments every class without prompts, but got {given}.")
        return super().preprocess(images)

    def post_process_semantic_segmentation(self, logits: np.ndarray, target_sizes) -> list[np.ndarray]:
        """Class maps of the original images, as `SamSemanticImageProcessor.post_process_semantic_segmentation`.

        The logits are upsampled (bilinear) to the padded input, cropped to the resized image, resized to each
        `(height, width)` of `target_sizes` (e.g. `preprocess`'s `original_sizes`), and the most likely class taken.

        Returns:
            `list[np.ndarray]`: one `(height, width)` int64 map of class ids per image.
        """
        pad = (self.processor_config["pad_size"]["height"], self.processor_config["pad_size"]["width"])
        longest = int(self.processor_config["size"]["longest_edge"])
        maps = []
        for image_logits, (height, width) in zip(np.asarray(logits, np.float32), target_sizes):
            height, width = int(height), int(width)
            scale = longest / max(height, width)
            resized = int(height * scale + 0.5), int(width * scale + 0.5)
            upsampled = resize_bilinear(image_logits, pad)[..., : resized[0], : resized[1]]
            maps.append(resize_bilinear(upsampled, (height, width)).argmax(axis=0))
        return maps


__all__ = ["OnnxSamForSemanticSegmentation", "OnnxSemanticSegmenterOutput"]
