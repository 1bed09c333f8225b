"""Class-segmentation data: the semantic schema, ADE20K's label reduction, a synthetic dataset and the preprocessor.

The semantic schema is ADE20K's (SceneParse150) on the Hub: an `image` and an `annotation`, a grey label map of the
image's size whose pixels are class ids, 255 for pixels that no loss or metric counts. ADE20K itself labels 0 as
"other objects" and its 150 classes 1..150; the standard recipe (`reduce_ade20k_labels`) maps 0 to 255 and shifts the
rest down by one. The synthetic dataset draws the package's shapes (`mpsupernet.data.synthetic`) and labels every
pixel with the class of the shape on top, 0 for the textured background.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image
from PIL import Image as PILImage

from ..configuration_sam_semantic import IGNORE_INDEX
from ..image_processing_sam_semantic import SamSemanticImageProcessor
from .synthetic import SHAPES, _check_arguments, _generate_example

SEMANTIC_FEATURES = Features({"image": Image(), "annotation": Image()})
"""The semantic schema: an RGB `image` and its `annotation`, a grey (mode "L") label map of class ids."""

SYNTHETIC_SEMANTIC_DATASET_NAME = "mpsupernet synthetic shape classes"
SYNTHETIC_SEMANTIC_ID2LABEL = {0: "background", **{index + 1: shape for index, shape in enumerate(SHAPES)}}
"""The synthetic dataset's classes: the background and one class per shape."""

ADE20K_NUM_LABELS = 150
"""ADE20K's (SceneParse150's) classes after label reduction."""

# Streams keep the splits disjoint for any seed, apart from the instance dataset's streams (0 and 1).
_TRAIN_STREAM = 10
_VALIDATION_STREAM = 11


def reduce_ade20k_labels(annotation) -> np.ndarray:
    """ADE20K's label reduction: 0 ("other objects", not scored) becomes 255, class `c` (1..150) becomes `c - 1`.

    Args:
        annotation: a grey label map (PIL image or 2-D integer array) with ADE20K's ids 0..150.

    Returns:
        `np.ndarray` of `uint8`, the reduced map (0..149 and 255).

    Raises:
        `ValueError`: if the map holds an id above 150 (it is no ADE20K annotation, or was reduced already).
    """
    array = np.asarray(annotation).astype(np.int64)
    if array.size and array.max() > ADE20K_NUM_LABELS:
        raise ValueError(
            f"An ADE20K annotation holds ids 0 to {ADE20K_NUM_LABELS}; this one holds {int(array.max())} (was it "
            "reduced already?)."
        )
    return np.where(array == 0, IGNORE_INDEX, array - 1).astype(np.uint8)


def from_ade20k(dataset: Dataset | DatasetDict, image_column: str = "image", annotation_column: str = "annotation"):
    """An ADE20K-style dataset (SceneParse150 or a parquet copy) in the semantic schema, labels reduced.

    Args:
        dataset (`Dataset` or `DatasetDict`): with an image column and an annotation column of ids 0..150.
        image_column (`str`), annotation_column (`str`): the columns' names.

    Returns:
        The same type, with only `image` (RGB) and `annotation` (reduced, see [`reduce_ade20k_labels`]).

    Raises:
        `ValueError`: naming the missing columns.
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict({split: from_ade20k(data, image_column, annotation_column) for split, data in dataset.items()})
    missing = [column for column in (image_column, annotation_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset lacks the column(s) {missing}; it has {dataset.column_names}.")

    def convert(batch):
        return {
            "image": [image.convert("RGB") for image in batch[image_column]],
            "annotation": [PILImage.fromarray(reduce_ade20k_labels(map_)) for map_ in batch[annotation_column]],
        }

    return dataset.map(convert, batched=True, remove_columns=dataset.column_names, features=SEMANTIC_FEATURES)


def is_semantic_dataset(dataset) -> bool:
    """Whether a dataset is in the semantic schema (an `annotation` label map and no per-object `masks`)."""
    columns = getattr(dataset, "column_names", None) or []
    return "annotation" in columns and "masks" not in columns


def check_dataset_task(dataset, name: str, semantic: bool) -> None:
    """Refuses a class-segmentation dataset for a promptable model, and a promptable one for a semantic model.

    Raises:
        `ValueError`: naming the dataset's argument, its columns and the model to use instead.
    """
    if dataset is None or is_semantic_dataset(dataset) == semantic:
        return
    columns = getattr(dataset, "column_names", None)
    if semantic:
        raise ValueError(
            f"`{name}` has the columns {columns}: per-object masks for a promptable model, not the label maps "
            "(`image`, `annotation`) that a semantic segmentation model trains on. Use `SamSupernetForMaskGeneration` "
            "for it, or give a dataset in the semantic schema (`mpsupernet.data.from_ade20k`, "
            "`make_synthetic_semantic_dataset`)."
        )
    raise ValueError(
        f"`{name}` has the columns {columns}: a semantic segmentation dataset (label maps, no per-object masks), "
        "which a promptable model cannot train on. Use `SamSupernetForSemanticSegmentation` for it, or convert it to "
        "masks with `mpsupernet.data.from_semantic_maps`."
    )


def _label_map(masks: list[np.ndarray], shapes: list[str], image_size: int) -> np.ndarray:
    label_map = np.zeros((image_size, image_size), dtype=np.uint8)
    for mask, shape in zip(masks, shapes):  # visible parts: disjoint
        label_map[mask] = SHAPES.index(shape) + 1
    return label_map


def _make_semantic_split(num_images: int, image_size: int, min_objects: int, max_objects: int, seed: int, stream: int):
    if num_images < 0:
        raise ValueError(f"`num_images` must be non-negative, got {num_images}.")
    _check_arguments(image_size, min_objects, max_objects)
    images, annotations = [], []
    for index in range(num_images):
        # One generator per image: image i is the same whatever `num_images` is.
        rng = np.random.default_rng((seed, stream, index))
        image, masks, shapes = _generate_example(rng, image_size, min_objects, max_objects)
        images.append(PILImage.fromarray(image, mode="RGB"))
        annotations.append(PILImage.fromarray(_label_map(masks, shapes, image_size)))
    info = DatasetInfo(dataset_name=SYNTHETIC_SEMANTIC_DATASET_NAME, features=SEMANTIC_FEATURES)
    return Dataset.from_dict({"image": images, "annotation": annotations}, features=SEMANTIC_FEATURES, info=info)


def make_synthetic_semantic_dataset(
    num_images: int, image_size: int = 128, min_objects: int = 2, max_objects: int = 5, seed: int = 0
) -> Dataset:
    """A deterministic synthetic class-segmentation dataset: shapes of five classes on textured backgrounds.

    Each image shows `min_objects` to `max_objects` shapes (`SYNTHETIC_SEMANTIC_ID2LABEL`: ellipse, rectangle,
    triangle, polygon, ring; flat, striped or noisy texture) over a textured background, later shapes occluding
    earlier ones; each pixel is labelled with the class of the shape on top, 0 for the background.

    Args:
        num_images (`int`): number of images.
        image_size (`int`, *optional*, defaults to 128): side of the square images, at least 16.
        min_objects (`int`, *optional*, defaults to 2), max_objects (`int`, *optional*, defaults to 5): shapes per
            image.
        seed (`int`, *optional*, defaults to 0): the same arguments always give the same dataset, and image `i` does
            not depend on `num_images`.

    Returns:
        `datasets.Dataset` in the semantic schema (`image`, `annotation`), named `SYNTHETIC_SEMANTIC_DATASET_NAME`.
    """
    return _make_semantic_split(num_images, image_size, min_objects, max_objects, seed, _TRAIN_STREAM)


def make_synthetic_semantic_dataset_dict(
    num_train: int, num_validation: int, image_size: int = 128, min_objects: int = 2, max_objects: int = 5, seed: int = 0
) -> DatasetDict:
    """Train and validation splits of [`make_synthetic_semantic_dataset`], disjoint for any seed."""
    return DatasetDict(
        {
            "train": make_synthetic_semantic_dataset(num_train, image_size, min_objects, max_objects, seed),
            "validation": _make_semantic_split(
                num_validation, image_size, min_objects, max_objects, seed, _VALIDATION_STREAM
            ),
        }
    )


class SemanticSegmentationPreprocessor:
    """Turns semantic-schema examples into model inputs: `pixel_values` and `labels` (see `SamSemanticImageProcessor`).

    Use it as a dataset transform (`dataset.with_transform(preprocessor)`) and batch with `mpsupernet.data.collate_fn`.
    Nothing is random, so `set_epoch` changes nothing (it is there for the training loops, which call it).

    Args:
        config: the model's configuration (its `vision_config` gives the input size and patch size).
        image_column (`str`, *optional*, defaults to `"image"`), annotation_column (`str`, *optional*, defaults to
            `"annotation"`): the dataset's columns.
    """

    def __init__(self, config, image_column: str = "image", annotation_column: str = "annotation"):
        vision = config.vision_config
        self.image_size, self.patch_size = vision.image_size, vision.patch_size
        self.image_column, self.annotation_column = image_column, annotation_column
        self.processor = SamSemanticImageProcessor.for_model(self.image_size, self.patch_size)

    @property
    def required_columns(self) -> list[str]:
        return [self.image_column, self.annotation_column]

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the preprocessing is deterministic."""

    def __call__(self, examples: Mapping[str, list[Any]]) -> dict[str, list[torch.Tensor]]:
        images = [image.convert("RGB") for image in examples[self.image_column]]
        maps = [np.asarray(annotation) for annotation in examples[self.annotation_column]]
        encoded = self.processor(images, segmentation_maps=maps, return_tensors="pt")
        return {"pixel_values": list(encoded["pixel_values"]), "labels": list(encoded["labels"])}


__all__ = [
    "ADE20K_NUM_LABELS",
    "SEMANTIC_FEATURES",
    "SYNTHETIC_SEMANTIC_DATASET_NAME",
    "SYNTHETIC_SEMANTIC_ID2LABEL",
    "SemanticSegmentationPreprocessor",
    "check_dataset_task",
    "from_ade20k",
    "is_semantic_dataset",
    "make_synthetic_semantic_dataset",
    "make_synthetic_semantic_dataset_dict",
    "reduce_ade20k_labels",
]
