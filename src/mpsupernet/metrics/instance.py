"""COCO mask AP of instance segmentation (pycocotools), and the promptable model's AP with box prompts.

`coco_mask_ap` scores per-image predictions (masks as COCO run-length encodings, a score and a category each)
against per-image references with pycocotools' `COCOeval(..., "segm")`, the protocol of SAM's paper and its
followers (TinySAM, EfficientViT-SAM). `evaluate_mask_ap` runs a promptable model with box prompts on a dataset of
the standard schema and scores it through the `mask_ap` evaluation module (`mpsupernet.load_metric("mask_ap")`).

Those papers prompt SAM with a detector's boxes and take the detector's score. With ground-truth boxes (the only
boxes this package has), every object is prompted exactly once and the score is SAM's predicted IoU: the figure then
measures the masks and the ranking by predicted IoU, not detection. It is not comparable to detector-box AP, and the
papers report mIoU for ground-truth boxes; `evaluate_mask_ap` returns its protocol with the figures so that a card
can say which one produced a number.
"""

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm.auto import tqdm

from ..data.prompts import mask_to_box
from ..image_processing import sam_image_processor
from .evaluation import _model_device, evaluating
from .loading import load_metric
from .mask import select_masks


# COCOeval.stats in order: AP over IoU 0.5:0.95, at 0.5 and 0.75, by object size, then AR with 1/10/100 detections
# and by object size (torchmetrics' names).
COCO_STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)

GROUND_TRUTH_BOX_PROTOCOL = {
    "boxes": "ground truth",
    "box_jitter": 0.0,
    "score": "predicted IoU",
    "mask_resolution": "original image",
}


def encode_masks(masks) -> list[dict[str, Any]]:
    """COCO compressed run-length encodings of binary masks.

    Args:
        masks (array-like of shape `(num_masks, height, width)`): non-zero is foreground.

    Returns:
        `list[dict]`: one `{"size": [height, width], "counts": str}` per mask (counts as text, JSON-ready).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"`masks` must have the shape (num_masks, height, width), got {masks.shape}.")
    encoded = mask_utils.encode(np.asfortranarray(np.moveaxis(masks > 0, 0, -1).astype(np.uint8)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]


def _rle(segmentation: dict[str, Any]) -> dict[str, Any]:
    """A compressed RLE as pycocotools takes it, from counts as text, bytes or (uncompressed) a list of runs."""
    height, width = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}


def _check_lengths(entry: dict[str, Any], keys: Sequence[str], what: str) -> None:
    lengths = {key: len(entry[key]) for key in keys}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"The {what} of image {entry['image_id']} has lists of different lengths: {lengths}.")


def coco_mask_ap(predictions: Sequence[dict], references: Sequence[dict]) -> dict[str, float]:
    """COCO mask AP and AR (`COCOeval(..., "segm")`, 10 IoU thresholds, at most 1/10/100 detections per image).

    Args:
        predictions (`Sequence[dict]`): one dict per image with `image_id` (`int`), `segmentation` (a list of COCO
            RLEs, `{"size": [height, width], "counts": str}`, see `encode_masks`), `score` (a list of floats) and
            `category_id` (a list of ints), one entry per predicted instance.
        references (`Sequence[dict]`): one dict per image with `image_id`, `segmentation`, `category_id` and
            `iscrowd` (a list of 0/1: crowd regions are matched but neither rewarded nor penalised).

    Returns:
        `dict[str, float]`: `COCO_STAT_NAMES` (NaN where COCO gives -1: no reference of that size), `num_images`,
        `num_references` and `num_predictions`. No `bbox` is given to the results, which would make COCO take box
        areas for the size buckets.

    Raises:
        `ValueError`: an image id given twice, a prediction for an image without a reference entry, or lists of
        different lengths within an image.
    """
    image_ids = [int(reference["image_id"]) for reference in references]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"Each image needs exactly one reference entry; image ids given twice: {image_ids}.")
    annotations, results, categories, sizes = [], [], set(), {}
    for reference in references:
        _check_lengths(reference, ("segmentation", "category_id", "iscrowd"), "reference")
        for segmentation, category, crowd in zip(
            reference["segmentation"], reference["category_id"], reference["iscrowd"]
        ):
            rle = _rle(segmentation)
            annotations.append(
                {
                    # COCOeval treats a matched id of 0 as "no match": ids start at 1.
                    "id": len(annotations) + 1,
                    "image_id": int(reference["image_id"]),
                    "category_id": int(category),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(crowd),
                }
            )
            categories.add(int(category))
            sizes[int(reference["image_id"])] = rle["size"]
    unknown = sorted({int(p["image_id"]) for p in predictions} - set(image_ids))
    if unknown:
        raise ValueError(f"Predictions were given for the image ids {unknown}, which have no reference entry.")
    for prediction in predictions:
        _check_lengths(prediction, ("segmentation", "score", "category_id"), "prediction")
        for segmentation, score, category in zip(
            prediction["segmentation"], prediction["score"], prediction["category_id"]
        ):
            results.append(
                {
                    "image_id": int(prediction["image_id"]),
                    "category_id": int(category),
                    "segmentation": _rle(segmentation),
                    "score": float(score),
                }
            )
            categories.add(int(category))
            sizes.setdefault(int(prediction["image_id"]), [int(v) for v in segmentation["size"]])
    counts = {"num_images": len(image_ids), "num_references": len(annotations), "num_predictions": len(results)}
    if not annotations or not results:
        return {**dict.fromkeys(COCO_STAT_NAMES, float("nan")), **counts}
    # pycocotools prints its progress; the figures are returned instead.
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            # COCO reads an image's size when it decodes annotations; an image with no instance has none to decode.
            "images": [
                {"id": image_id, "height": sizes.get(image_id, [0, 0])[0], "width": sizes.get(image_id, [0, 0])[1]}
                for image_id in image_ids
            ],
            "categories": [{"id": category} for category in sorted(categories)],
            "annotations": annotations,
        }
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = {name: float(v) if v >= 0 else float("nan") for name, v in zip(COCO_STAT_NAMES, evaluation.stats)}
    return {**stats, **counts}


@torch.no_grad()
def _predict_instances(model, image, masks: list[np.ndarray], image_processor, device, multimask_output: bool):
    """Prompts `model` with the tight box of each mask; returns binary masks at the image's size and their scores."""
    processed = image_processor(images=[image], return_tensors="pt")
    height, width = masks[0].shape
    reshaped = processed["reshaped_input_sizes"][0].tolist()
    scale = np.array([reshaped[1] / width, reshaped[0] / height] * 2, dtype=np.float32)
    boxes = np.stack([mask_to_box(mask) * scale for mask in masks])
    outputs = model(
        pixel_values=processed["pixel_values"].to(device),
        input_boxes=torch.from_numpy(boxes)[None].to(device),
        multimask_output=multimask_output,
    )
    pred_masks, iou_scores = outputs["pred_masks"], outputs["iou_scores"]
    if multimask_output:
        scores = iou_scores.max(dim=-1).values[0]
        pred_masks = select_masks(pred_masks, iou_scores)
    else:
        scores, pred_masks = iou_scores[0, :, 0], pred_masks[:, :, 0]
    # SAM's post-processing: upscale to the padded input, crop the padding, resize to the original image.
    binary = image_processor.post_process_masks(
        pred_masks[:, :, None].float().cpu(), processed["original_sizes"], processed["reshaped_input_sizes"]
    )[0][:, 0]
    return binary.numpy(), scores.float().cpu().tolist()


def evaluate_mask_ap(
    model: Any,
    dataset,
    *,
    category_column: str | None = None,
    multimask_output: bool = False,
    subnet: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    **load_kwargs,
) -> dict[str, Any]:
    """COCO mask AP of a promptable model prompted with the ground-truth boxes of a dataset of the standard schema.

    Every non-empty mask of an image is one object: the model gets its tight box (no jitter), all of an image's
    boxes in one forward pass; the chosen mask (the highest predicted IoU with `multimask_output`) is upscaled to the
    original image with SAM's post-processing (padding cropped, logit > 0) and scored with its predicted IoU. The
    references are the dataset's masks at their own size. A COCO dataset converted with
    `mpsupernet.data.from_coco_annotations` qualifies; crowd regions, if kept there, count as ordinary objects.

    Args:
        model: a `SamModel`, `SamSupernetForMaskGeneration` or `SamSubnetForMaskGeneration`: anything with a SAM
            `config` that takes `pixel_values`, `input_boxes` and `multimask_output` and returns `pred_masks` and
            `iou_scores`.
        dataset (`datasets.Dataset`): `image` and `masks` (the standard schema), and `image_id` where present (the
            row index otherwise); without a transform.
        category_column (`str`, *optional*): a column with one integer category per mask, for per-category AP;
            without it every object is of one category (class-agnostic AP).
        multimask_output (`bool`, *optional*, defaults to `False`): predict 3 masks per box and keep the one with the
            highest predicted IoU.
        subnet (`SubnetArchitecture` or `dict`, *optional*): with a supernet, the architecture to measure (restored
            afterwards, see `evaluating`).
        device (`torch.device` or `str`, *optional*): defaults to the device of the model's parameters.
        show_progress (`bool`, *optional*, defaults to `False`): show a progress bar over the images.
        load_kwargs: passed to `load_metric("mask_ap", ...)` (e.g. `cache_dir`, `keep_in_memory`).

    Returns:
        `dict`: the figures of `coco_mask_ap` (`map`, `map_50`, ...; `num_images`, `num_references`,
        `num_predictions`) and `protocol` (`GROUND_TRUTH_BOX_PROTOCOL` with `multimask_output` and `categories`).

    Raises:
        `ValueError`: a missing column, or a category list whose length differs from the image's masks.
        `TypeError`: `subnet` given for a model that is not a supernet.
    """
    missing = [name for name in ("image", "masks", category_column) if name and name not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset lacks the column(s) {missing}; it has the columns {dataset.column_names}.")
    vision_config = getattr(model.config, "vision_config", model.config)
    image_processor = sam_image_processor(vision_config.image_size, vision_config.patch_size)
    device = torch.device(device) if device is not None else _model_device(model)
    metric = load_metric("mask_ap", **load_kwargs)
    with evaluating(model, subnet):
        for index, example in enumerate(tqdm(dataset, desc="Evaluating mask AP", disable=not show_progress)):
            image_id = int(example.get("image_id", index))
            masks = [np.asarray(mask) > 0 for mask in example["masks"]]
            categories = example[category_column] if category_column else [1] * len(masks)
            if len(categories) != len(masks):
                raise ValueError(
                    f"Image {image_id} has {len(masks)} masks but {len(categories)} categories in "
                    f"`{category_column}`."
                )
            objects = [k for k, mask in enumerate(masks) if mask.any()]
            references = {"image_id": image_id, "segmentation": [], "category_id": [], "iscrowd": []}
            prediction = {"image_id": image_id, "segmentation": [], "score": [], "category_id": []}
            if objects:
                kept = [masks[k] for k in objects]
                references.update(
                    segmentation=encode_masks(np.stack(kept)),
                    category_id=[int(categories[k]) for k in objects],
                    iscrowd=[0] * len(objects),
                )
                predicted, scores = _predict_instances(
                    model, example["image"].convert("RGB"), kept, image_processor, device, multimask_output
                )
                prediction.update(
                    segmentation=encode_masks(predicted), score=scores, category_id=references["category_id"]
                )
            metric.add(predictions=prediction, references=references)
    results = metric.compute()
    results["protocol"] = {
        **GROUND_TRUTH_BOX_PROTOCOL,
        "multimask_output": multimask_output,
        "categories": category_column or "class-agnostic",
    }
    return results


__all__ = ["COCO_STAT_NAMES", "GROUND_TRUTH_BOX_PROTOCOL", "coco_mask_ap", "encode_masks", "evaluate_mask_ap"]
