"""Adapters from common Hub segmentation schemas to the project's standard schema.

The standard schema has three columns (see `STANDARD_FEATURES`):

- `image`: the image (`datasets.Image()`),
- `masks`: one binary mask per object (`List(Image())`, mode "1", the image's size),
- `image_id`: an integer id (`int64`), which seeds the per-example prompt sampling.

Each adapter takes a `Dataset` or a `DatasetDict` (converted split by split) and returns the same kind of object. The
image column is passed through untouched (no re-encoding); all other columns are replaced by `masks` and `image_id`.
Masks are kept as they are, empty ones included: `SamSegmentationPreprocessor` drops and counts those.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage


STANDARD_FEATURES = Features({"image": Image(), "masks": List(Image()), "image_id": Value("int64")})

SEMANTIC_MODES = ("connected", "class")


def _check_columns(dataset: Dataset, required: Sequence[str]) -> None:
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset lacks the column(s) {missing}; it has the columns {dataset.column_names}. Name the right "
            "columns with the adapter's `*_column` arguments."
        )
    if not isinstance(dataset.features[required[0]], Image):
        raise ValueError(
            f"The image column `{required[0]}` must be a `datasets.Image()` feature, got "
            f"{dataset.features[required[0]]}; cast it first with `dataset.cast_column('{required[0]}', Image())`."
        )


def _to_mask_image(mask: np.ndarray) -> PILImage.Image:
    return PILImage.fromarray(np.ascontiguousarray(mask, dtype=bool))


def _check_mask_size(mask: np.ndarray, image_size: tuple[int, int], what: str) -> None:
    if mask.shape != image_size:
        raise ValueError(
            f"{what} has size {mask.shape[0]}x{mask.shape[1]} (height x width) but its image is "
            f"{image_size[0]}x{image_size[1]}; masks must have the size of their image."
        )


def _convert(
    dataset: Dataset | DatasetDict,
    required_columns: Sequence[str],
    id_column: str | None,
    masks_fn: Callable[[dict[str, Any], tuple[int, int], int], list[np.ndarray]],
    num_proc: int | None,
) -> Dataset | DatasetDict:
    """Runs `masks_fn(example, (height, width), index)` over every split and builds the standard schema."""
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {name: _convert(split, required_columns, id_column, masks_fn, num_proc) for name, split in dataset.items()}
        )
    _check_columns(dataset, required_columns)
    image_column = required_columns[0]
    use_id_column = id_column is not None and id_column in dataset.column_names

    def convert_example(example: dict[str, Any], index: int) -> dict[str, Any]:
        # PIL reads only the header here: the size is known without decoding the pixels.
        width, height = example[image_column].size
        masks = masks_fn(example, (height, width), index)
        image_id = int(example[id_column]) if use_id_column else index
        return {"masks": [_to_mask_image(mask) for mask in masks], "image_id": image_id}

    features = Features(
        {image_column: dataset.features[image_column], "masks": STANDARD_FEATURES["masks"], "image_id": Value("int64")}
    )
    converted = dataset.map(
        convert_example,
        with_indices=True,
        remove_columns=[name for name in dataset.column_names if name != image_column],
        features=features,
        num_proc=num_proc,
        desc="Converting to the standard segmentation schema",
    )
    if image_column != "image":
        converted = converted.rename_column(image_column, "image")
    return converted.select_columns(list(STANDARD_FEATURES))


def from_instance_mask_columns(
    dataset: Dataset | DatasetDict,
    image_column: str = "image",
    masks_column: str = "masks",
    id_column: str | None = "image_id",
    num_proc: int | None = None,
) -> Dataset | DatasetDict:
    """Converts a dataset of images with a list of per-object masks to the standard schema.

    Args:
        dataset (`Dataset` or `DatasetDict`):
            The dataset to convert.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of the images (a `datasets.Image()` feature).
        masks_column (`str`, *optional*, defaults to `"masks"`):
            Column of the masks of each example: a list of images or 2-D arrays, or one `(num_objects, height,
            width)` array. Any non-zero value is foreground.
        id_column (`str`, *optional*, defaults to `"image_id"`):
            Integer column to use as `image_id` where the dataset has it; the row index otherwise.
        num_proc (`int`, *optional*):
            Processes for `Dataset.map`.

    Returns:
        `Dataset` or `DatasetDict` with the standard columns `image`, `masks` and `image_id`.

    Raises:
        `ValueError`: if a column is missing, or a mask's size differs from its image's.
    """

    def masks_fn(example: dict[str, Any], image_size: tuple[int, int], index: int) -> list[np.ndarray]:
        masks = [np.asarray(mask) > 0 for mask in example[masks_column]]
        for k, mask in enumerate(masks):
            _check_mask_size(mask, image_size, f"Mask {k} of example {index}")
        return masks

    return _convert(dataset, [image_column, masks_column], id_column, masks_fn, num_proc)


def _objects_as_list(objects: Any) -> list[dict[str, Any]]:
    """COCO objects arrive as a list of dicts, or (from a `Sequence` of a dict feature) as a dict of lists."""
    if isinstance(objects, dict):
        keys = list(objects)
        return [dict(zip(keys, values)) for values in zip(*(objects[key] for key in keys))]
    return list(objects)


def decode_coco_segmentation(segmentation: Any, image_size: tuple[int, int]) -> np.ndarray:
    """Decodes one COCO segmentation (polygons or RLE) into a binary mask.

    Args:
        segmentation (`list` or `dict`):
            Polygons as a list of flat `[x1, y1, x2, y2, ...]` lists (or one flat list), or an RLE dict with `size`
            (`[height, width]`) and `counts`: a compressed string/bytes or an uncompressed list of run lengths.
        image_size (`tuple[int, int]`):
            `(height, width)` of the image.

    Returns:
        `np.ndarray` of shape `image_size` and dtype bool.

    Raises:
        `ValueError`: if an RLE's size differs from `image_size`, or the segmentation has no known format.
    """
    # Imported here: only COCO data needs pycocotools, the rest of the data package works without it.
    from pycocotools import mask as mask_utils

    height, width = image_size
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError(f"An RLE needs the keys 'counts' and 'size', got the keys {sorted(segmentation)}.")
        rle_size = tuple(int(v) for v in segmentation["size"])
        if rle_size != (height, width):
            raise ValueError(
                f"RLE has size {rle_size[0]}x{rle_size[1]} (height x width) but its image is {height}x{width}; masks "
                "must have the size of their image."
            )
        counts = segmentation["counts"]
        if isinstance(counts, str):
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        elif isinstance(counts, bytes):
            rle = {"size": [height, width], "counts": counts}
        else:
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
        return mask_utils.decode(rle).astype(bool)
    if isinstance(segmentation, (list, tuple)):
        polygons = segmentation
        if len(polygons) > 0 and np.isscalar(polygons[0]):
            polygons = [polygons]
        # pycocotools reads a 4-number list as a box, and a polygon needs 3 vertices anyway.
        polygons = [[float(v) for v in polygon] for polygon in polygons if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return mask_utils.decode(rle).astype(bool)
    raise ValueError(
        f"Unknown COCO segmentation of type {type(segmentation).__name__}: expected polygons (a list) or an RLE (a "
        "dict with 'size' and 'counts')."
    )


def from_coco_annotations(
    dataset: Dataset | DatasetDict,
    image_column: str = "image",
    objects_column: str = "objects",
    segmentation_key: str = "segmentation",
    height_column: str | None = "height",
    width_column: str | None = "width",
    id_column: str | None = "image_id",
    include_crowd: bool = False,
    num_proc: int | None = None,
) -> Dataset | DatasetDict:
    """Converts a COCO-style detection/instance dataset to the standard schema.

    Each object's `segmentation` (polygons, compressed RLE or uncompressed RLE) becomes one mask. Objects' `bbox`
    entries are not used: box prompts are computed from the decoded masks, so they are always tight.

    Args:
        dataset (`Dataset` or `DatasetDict`):
            The dataset to convert.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of the images (a `datasets.Image()` feature).
        objects_column (`str`, *optional*, defaults to `"objects"`):
            Column of the annotations: a list of per-object dicts, or a dict of per-object lists.
        segmentation_key (`str`, *optional*, defaults to `"segmentation"`):
            Key of the segmentation in each object.
        height_column (`str`, *optional*, defaults to `"height"`):
            Column of the image heights, checked against the image where present.
        width_column (`str`, *optional*, defaults to `"width"`):
            Column of the image widths, checked against the image where present.
        id_column (`str`, *optional*, defaults to `"image_id"`):
            Integer column to use as `image_id` where the dataset has it; the row index otherwise.
        include_crowd (`bool`, *optional*, defaults to `False`):
            Whether to keep objects marked `iscrowd` (regions of several objects, not one instance).
        num_proc (`int`, *optional*):
            Processes for `Dataset.map`.

    Returns:
        `Dataset` or `DatasetDict` with the standard columns `image`, `masks` and `image_id`.

    Raises:
        `ValueError`: if a column or the segmentation key is missing, or an annotation's size differs from its
        image's.
    """

    def masks_fn(example: dict[str, Any], image_size: tuple[int, int], index: int) -> list[np.ndarray]:
        for column, size, name in ((height_column, image_size[0], "height"), (width_column, image_size[1], "width")):
            if column is not None and example.get(column) is not None and int(example[column]) != size:
                raise ValueError(
                    f"Example {index} has {column}={example[column]} but its image's {name} is {size} (image size "
                    f"{image_size[0]}x{image_size[1]}, height x width)."
                )
        masks = []
        for k, annotation in enumerate(_objects_as_list(example[objects_column])):
            if segmentation_key not in annotation:
                raise ValueError(
                    f"Object {k} of example {index} has no key '{segmentation_key}'; it has the keys "
                    f"{sorted(annotation)}."
                )
            if annotation.get("iscrowd") and not include_crowd:
                continue
            masks.append(decode_coco_segmentation(annotation[segmentation_key], image_size))
        return masks

    return _convert(dataset, [image_column, objects_column], id_column, masks_fn, num_proc)


def semantic_map_to_masks(
    label_map: np.ndarray, ignore_labels: Sequence[int] = (0, 255), mode: str = "connected", min_area: int = 1
) -> list[np.ndarray]:
    """Splits a semantic label map into binary masks.

    Args:
        label_map (`np.ndarray` of shape `(height, width)`):
            Integer class label of every pixel.
        ignore_labels (`Sequence[int]`, *optional*, defaults to `(0, 255)`):
            Labels that give no mask (ADE20K's 0 is "unlabelled"; 255 is the usual void label).
        mode (`str`, *optional*, defaults to `"connected"`):
            `"connected"`: one mask per 8-connected region of one class, closer to SAM's object prompts (two
            separate cars give two masks). `"class"`: one mask per class present.
        min_area (`int`, *optional*, defaults to 1):
            Smallest mask area in pixels to keep; larger values drop the specks that label maps often have.

    Returns:
        `list[np.ndarray]` of boolean masks, ordered by class label, then by region.
    """
    if mode not in SEMANTIC_MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {SEMANTIC_MODES}.")
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"Expected a single-channel label map of shape (height, width), got shape {label_map.shape}.")
    masks = []
    for label in np.unique(label_map):
        if int(label) in ignore_labels:
            continue
        class_mask = label_map == label
        if mode == "class":
            regions = [class_mask]
        else:
            # Imported here: only this mode needs scipy.
            from scipy import ndimage

            components, num_components = ndimage.label(class_mask, structure=np.ones((3, 3), dtype=bool))
            regions = [components == k for k in range(1, num_components + 1)]
        masks.extend(region for region in regions if region.sum() >= min_area)
    return masks


def from_semantic_maps(
    dataset: Dataset | DatasetDict,
    image_column: str = "image",
    annotation_column: str = "annotation",
    ignore_labels: Sequence[int] = (0, 255),
    mode: str = "connected",
    min_area: int = 1,
    id_column: str | None = "image_id",
    num_proc: int | None = None,
) -> Dataset | DatasetDict:
    """Converts a semantic-segmentation dataset (e.g. ADE20K's `image` + `annotation`) to the standard schema.

    See `semantic_map_to_masks` for how a label map becomes masks.

    Args:
        dataset (`Dataset` or `DatasetDict`):
            The dataset to convert.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of the images (a `datasets.Image()` feature).
        annotation_column (`str`, *optional*, defaults to `"annotation"`):
            Column of the label maps: single-channel images or 2-D integer arrays.
        ignore_labels (`Sequence[int]`, *optional*, defaults to `(0, 255)`):
            Labels that give no mask.
        mode (`str`, *optional*, defaults to `"connected"`):
            `"connected"` (one mask per connected region of a class) or `"class"` (one mask per class).
        min_area (`int`, *optional*, defaults to 1):
            Smallest mask area in pixels to keep.
        id_column (`str`, *optional*, defaults to `"image_id"`):
            Integer column to use as `image_id` where the dataset has it; the row index otherwise.
        num_proc (`int`, *optional*):
            Processes for `Dataset.map`.

    Returns:
        `Dataset` or `DatasetDict` with the standard columns `image`, `masks` and `image_id`.

    Raises:
        `ValueError`: if a column is missing, a label map is not single-channel, or its size differs from its
        image's.
    """
    if mode not in SEMANTIC_MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {SEMANTIC_MODES}.")
    ignore_labels = tuple(int(label) for label in ignore_labels)

    def masks_fn(example: dict[str, Any], image_size: tuple[int, int], index: int) -> list[np.ndarray]:
        label_map = np.asarray(example[annotation_column])
        if label_map.ndim == 2:
            _check_mask_size(label_map, image_size, f"The label map of example {index}")
        return semantic_map_to_masks(label_map, ignore_labels=ignore_labels, mode=mode, min_area=min_area)

    return _convert(dataset, [image_column, annotation_column], id_column, masks_fn, num_proc)


DATASET_SCHEMAS = {
    "standard": from_instance_mask_columns,
    "coco": from_coco_annotations,
    "semantic": from_semantic_maps,
}
"""How a dataset may store its masks, each with the adapter that converts it to the standard schema: `"standard"`
(an image and a list of per-object masks), `"coco"` (objects with polygon/RLE segmentations), `"semantic"` (an
ADE20K-style label map)."""


def to_standard_schema(dataset: Dataset | DatasetDict, schema: str, **adapter_kwargs) -> Dataset | DatasetDict:
    """Converts a dataset that stores its masks as `schema` says to the standard schema (`image`, `masks`, `image_id`).

    Args:
        dataset (`Dataset` or `DatasetDict`): the dataset as loaded.
        schema (`str`): a key of `DATASET_SCHEMAS`: `"standard"`, `"coco"` or `"semantic"`.
        adapter_kwargs: passed to the schema's adapter (column names, `num_proc`, ...).

    Raises:
        `ValueError`: if the schema is unknown (the message lists the known ones).
    """
    if schema not in DATASET_SCHEMAS:
        raise ValueError(f"Unknown dataset schema {schema!r}; allowed: {list(DATASET_SCHEMAS)}.")
    return DATASET_SCHEMAS[schema](dataset, **adapter_kwargs)


def dataset_name(dataset) -> str | None:
    """The name a dataset carries, for metadata and model cards: `info.dataset_name` (a Hub dataset's or a local
    folder's name, kept through `map` and `save_to_disk`), else `info.builder_name`; `None` where it has neither."""
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
