"""The package's metrics as `evaluate` modules (`load_metric`), semantic mIoU, and COCO mask AP with box prompts."""

import socket
from types import SimpleNamespace

import evaluate
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

import mpsupernet
from mpsupernet.data import make_synthetic_segmentation_dataset
from mpsupernet.metrics import (
    METRICS,
    SemanticAreas,
    coco_mask_ap,
    encode_masks,
    evaluate_mask_ap,
    evaluate_mean_iou,
    evaluate_semantic_mean_iou,
    load_metric,
    mean_iou,
)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"A network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# Two images, 4 classes: class 3 appears nowhere; 255 marks ignored pixels (one of them predicted as class 1).
PREDICTIONS = [
    np.array([[0, 0, 1, 1], [0, 2, 2, 1], [1, 1, 2, 2]]),
    np.array([[2, 2, 0], [1, 0, 0]]),
]
REFERENCES = [
    np.array([[0, 0, 1, 255], [0, 0, 2, 1], [1, 2, 2, 2]]),
    np.array([[2, 0, 0], [255, 0, 0]]),
]


def independent_mean_iou(predictions, references, num_labels, ignore_index):
    """Pixel by pixel: intersection and union of every class counted over the whole dataset, then divided."""
    intersection, union, reference_area = [0] * num_labels, [0] * num_labels, [0] * num_labels
    for prediction, reference in zip(predictions, references):
        for p, r in zip(prediction.ravel().tolist(), reference.ravel().tolist()):
            if r == ignore_index:
                continue
            reference_area[r] += 1
            if p == r:
                intersection[p] += 1
                union[p] += 1
            else:
                union[p] += 1
                union[r] += 1
    ious = [i / u if u else None for i, u in zip(intersection, union)]
    accuracies = [i / a if a else None for i, a in zip(intersection, reference_area)]
    scored = [iou for iou in ious if iou is not None]
    return sum(scored) / len(scored), ious, accuracies, sum(intersection) / sum(reference_area)


def test_load_metric_mean_iou_offline_equals_an_independent_computation(offline, tmp_path):
    metric = load_metric("mean_iou", cache_dir=str(tmp_path))
    assert isinstance(metric, evaluate.EvaluationModule) and mpsupernet.load_metric is load_metric
    metric.add_batch(predictions=PREDICTIONS[:1], references=REFERENCES[:1])
    metric.add_batch(predictions=PREDICTIONS[1:], references=REFERENCES[1:])
    results = metric.compute(num_labels=4, ignore_index=255)

    expected, ious, accuracies, overall = independent_mean_iou(PREDICTIONS, REFERENCES, 4, 255)
    assert results["mean_iou"] == pytest.approx(expected)
    assert results["overall_accuracy"] == pytest.approx(overall)
    np.testing.assert_allclose(results["per_category_iou"], [np.nan if v is None else v for v in ious])
    np.testing.assert_allclose(results["per_category_accuracy"], [np.nan if v is None else v for v in accuracies])
    assert np.isnan(results["per_category_iou"][3])  # the absent class is skipped, not counted as 0 or 1
    # Dataset-level, not a mean over images: the two differ on this example.
    per_image = np.mean([independent_mean_iou([p], [r], 4, 255)[0] for p, r in zip(PREDICTIONS, REFERENCES)])
    assert abs(per_image - expected) > 0.01
    assert metric.compute(predictions=PREDICTIONS, references=REFERENCES, num_labels=4, nan_to_num=0)[
        "per_category_iou"
    ][3] == 0


def test_mean_iou_reduce_labels_is_ade20k_reduction():
    # ADE20K: 0 is "other objects" (not scored), class k is stored as k + 1.
    stored = [reference + 1 for reference in REFERENCES]
    for reference, original in zip(stored, REFERENCES):
        reference[original == 255] = 0
    reduced = mean_iou(PREDICTIONS, stored, num_labels=4, reduce_labels=True)
    plain = mean_iou(PREDICTIONS, REFERENCES, num_labels=4)
    np.testing.assert_array_equal(reduced["per_category_iou"], plain["per_category_iou"])


def test_semantic_areas_accumulate_batches_like_one_call():
    areas = SemanticAreas(4)
    for prediction, reference in zip(PREDICTIONS, REFERENCES):
        areas.update([prediction], [reference])
    streamed, at_once = areas.compute(), mean_iou(PREDICTIONS, REFERENCES, num_labels=4)
    assert streamed["mean_iou"] == at_once["mean_iou"]
    np.testing.assert_array_equal(streamed["per_category_iou"], at_once["per_category_iou"])


def test_mean_iou_refuses_labels_outside_num_labels_and_changes_nothing():
    areas = SemanticAreas(3)
    with pytest.raises(ValueError, match=r"reference holds the labels \[3, 7\], outside \[0, 3\)"):
        areas.update([PREDICTIONS[1], PREDICTIONS[0]], [REFERENCES[1], np.where(REFERENCES[0] == 2, 7, 3)])
    assert areas.area_union.sum() == 0  # the first, valid pair of the refused batch was not added either
    with pytest.raises(ValueError, match=r"prediction holds the labels \[3\]"):
        mean_iou([PREDICTIONS[0] + 1], [REFERENCES[0]], num_labels=3)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) was given for a reference of shape \(3, 4\)"):
        mean_iou([PREDICTIONS[1]], [REFERENCES[0]], num_labels=3)
    with pytest.raises(ValueError, match=r"`num_labels` must be a positive integer, got 0"):
        SemanticAreas(0)


def test_load_metric_mask_iou_is_the_mean_over_masks(offline, tmp_path):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 6, generator=generator)
    targets = (torch.rand(5, 6, 6, generator=generator) > 0.5).float()
    targets[4] = 0
    logits[4] = -1  # empty prediction of an empty target: IoU 1
    expected = []
    for logit, target in zip(logits.numpy(), targets.numpy()):
        predicted, truth = logit > 0, target > 0
        union = (predicted | truth).sum()
        expected.append((predicted & truth).sum() / union if union else 1.0)
    results = load_metric("mask_iou", cache_dir=str(tmp_path)).compute(predictions=logits, references=targets)
    assert results["num_masks"] == 5 and results["mean_iou"] == pytest.approx(np.mean(expected))
    np.testing.assert_allclose(results["per_mask_iou"], expected, rtol=1e-6)


def test_load_metric_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown metric 'miou'; the package's metrics are \['mask_ap', 'mask_iou'"):
        load_metric("miou")
    assert sorted(METRICS) == ["mask_ap", "mask_iou", "mean_iou"]


def _square(top: int, left: int, side: int = 10, pixels: int | None = None, size: int = 32) -> np.ndarray:
    """A `side` x `side` square, or its first `pixels` pixels in column-major order (a known overlap)."""
    mask = np.zeros((size, size), dtype=bool)
    block = np.zeros(side * side, dtype=bool)
    block[: side * side if pixels is None else pixels] = True
    mask[top : top + side, left : left + side] = block.reshape(side, side, order="F")
    return mask


def test_coco_mask_ap_of_a_known_ranking(offline, tmp_path):
    # Two objects; the higher-scored prediction is exact, the other overlaps its object at IoU 0.62: a true positive
    # at the IoU thresholds 0.50, 0.55, 0.60 (AP 1) and a false positive from 0.65 on, where the 101-point
    # interpolated precision is 1 up to recall 0.5 and 0 beyond (AP 51/101).
    objects = np.stack([_square(2, 2), _square(15, 15)])
    predicted = np.stack([_square(2, 2), _square(15, 15, pixels=62)])
    references = [{"image_id": 7, "segmentation": encode_masks(objects), "category_id": [1, 1], "iscrowd": [0, 0]}]
    predictions = [{"image_id": 7, "segmentation": encode_masks(predicted), "score": [0.9, 0.8], "category_id": [1, 1]}]
    results = load_metric("mask_ap", cache_dir=str(tmp_path)).compute(predictions=predictions, references=references)
    assert results["map"] == pytest.approx((3 * 1 + 7 * 51 / 101) / 10)
    assert results["map_50"] == pytest.approx(1.0) and results["map_75"] == pytest.approx(51 / 101)
    assert np.isnan(results["map_large"])  # no object above 96² pixels: COCO's -1 becomes NaN
    assert (results["num_images"], results["num_references"], results["num_predictions"]) == (1, 2, 2)
    # The scores decide the ranking: with the overlapping mask first, the exact one comes at precision 1/2.
    swapped = coco_mask_ap([dict(predictions[0], score=[0.8, 0.9])], references)
    assert swapped["map_50"] == pytest.approx(1.0) and swapped["map_75"] == pytest.approx(0.5 * 51 / 101)


def test_coco_mask_ap_refuses_predictions_of_unknown_images():
    with pytest.raises(ValueError, match=r"image ids \[3\], which have no reference entry"):
        coco_mask_ap(
            [{"image_id": 3, "segmentation": [], "score": [], "category_id": []}],
            [{"image_id": 1, "segmentation": [], "category_id": [], "iscrowd": []}],
        )


class BoxModel:
    """A promptable 'model' that predicts each box filled (logit +10 inside, -10 outside), scored by box area."""

    def __init__(self, image_size: int = 64, patch_size: int = 16):
        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=image_size, patch_size=patch_size))
        self.low_res = 4 * (image_size // patch_size)
        self.scale = image_size / self.low_res

    def __call__(self, pixel_values, input_boxes, multimask_output):
        centres = (torch.arange(self.low_res) + 0.5) * self.scale - 0.5  # of each low-res pixel, in input pixels
        x1, y1, x2, y2 = (input_boxes[0, :, k, None] for k in range(4))
        inside_x = (centres >= x1 - self.scale / 2) & (centres <= x2 + self.scale / 2)
        inside_y = (centres >= y1 - self.scale / 2) & (centres <= y2 + self.scale / 2)
        masks = torch.where(inside_y[:, :, None] & inside_x[:, None, :], 10.0, -10.0)
        scores = ((x2 - x1) * (y2 - y1))[:, 0] / 1000
        return {"pred_masks": masks[None, :, None], "iou_scores": scores[None, :, None]}


def rectangle_dataset() -> Dataset:
    """Two 64 x 48 images (height x width, so SAM pads them) with rectangles aligned to the 4-pixel low-res grid."""
    rectangles = [[(0, 8, 16, 32), (32, 60, 4, 20)], [(20, 44, 24, 48)]]  # (top, bottom, left, right)
    rows = {"image": [], "masks": [], "image_id": [], "category": []}
    for index, boxes in enumerate(rectangles):
        masks = []
        for top, bottom, left, right in boxes:
            mask = np.zeros((64, 48), dtype=bool)
            mask[top:bottom, left:right] = True
            masks.append(PILImage.fromarray(mask))
        masks.append(PILImage.fromarray(np.zeros((64, 48), dtype=bool)))  # an empty mask is not an object
        rows["image"].append(PILImage.fromarray(np.full((64, 48, 3), 40 * index, dtype=np.uint8)))
        rows["masks"].append(masks)
        rows["image_id"].append(10 + index)
        rows["category"].append([index + 1] * len(boxes) + [0])
    features = Features(
        {"image": Image(), "masks": List(Image()), "image_id": Value("int64"), "category": List(Value("int64"))}
    )
    return Dataset.from_dict(rows, features=features)


def test_evaluate_mask_ap_with_ground_truth_boxes_scores_exact_masks_at_one(offline, tmp_path):
    # Exact only if the boxes reach the model in its input frame and the masks come back to the image's own frame
    # (the padding cropped): a mistake in either gives AP below 1.
    results = evaluate_mask_ap(BoxModel(), rectangle_dataset(), category_column="category", cache_dir=str(tmp_path))
    assert results["map"] == pytest.approx(1.0) and results["map_75"] == pytest.approx(1.0)
    assert (results["num_images"], results["num_references"], results["num_predictions"]) == (2, 3, 3)
    assert results["protocol"] == {
        "boxes": "ground truth",
        "box_jitter": 0.0,
        "score": "predicted IoU",
        "mask_resolution": "original image",
        "multimask_output": False,
        "categories": "category",
    }


def test_evaluate_mask_ap_of_a_supernet_subnet_restores_the_active_subnet(tiny_supernet, offline, tmp_path):
    dataset = make_synthetic_segmentation_dataset(2, image_size=128, seed=0)
    before, smallest = tiny_supernet.active_subnet, tiny_supernet.smallest_subnet()
    results = evaluate_mask_ap(tiny_supernet, dataset, subnet=smallest, cache_dir=str(tmp_path))
    assert tiny_supernet.active_subnet == before and not tiny_supernet.training
    assert 0.0 <= results["map"] <= 1.0 and results["protocol"]["categories"] == "class-agnostic"
    assert results["num_references"] == sum(int(np.asarray(m).any()) for e in dataset for m in e["masks"])
    with pytest.raises(TypeError, match=r"the model is a BoxModel, which has no `using_subnet`"):
        evaluate_mask_ap(BoxModel(), rectangle_dataset(), subnet=smallest)
    with pytest.raises(TypeError, match=r"no `using_subnet`"):
        evaluate_mean_iou(BoxModel(), [], subnet=smallest)


class FixedSegmenter(torch.nn.Module):
    """A semantic segmenter that returns fixed class logits, whatever the pixels."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, pixel_values):
        return {"logits": self.logits[: len(pixel_values)]}


def test_evaluate_semantic_mean_iou_upsamples_then_scores_the_dataset():
    # 2x2 logits upsampled (bilinear) to 4x4: each quadrant keeps its class, so the argmax is known.
    classes = torch.tensor([[[0, 1], [2, 1]], [[1, 1], [0, 2]]])
    logits = torch.nn.functional.one_hot(classes, 4).permute(0, 3, 1, 2).float() * 5
    predictions = classes.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    labels = predictions.clone()
    labels[0, 0, :] = 2  # a wrong row
    labels[1, 3, 3] = 255  # ignored
    batches = [{"pixel_values": torch.zeros(2, 3, 8, 8), "labels": labels}, {}]
    model = FixedSegmenter(logits).train()
    model.config = SimpleNamespace(num_labels=4, semantic_loss_ignore_index=255)
    results = evaluate_semantic_mean_iou(model, batches, show_progress=False)
    expected = independent_mean_iou(list(predictions.numpy()), list(labels.numpy()), 4, 255)
    assert results["mean_iou"] == pytest.approx(expected[0]) and np.isnan(results["per_category_iou"][3])
    assert model.training  # restored
    with pytest.raises(ValueError, match=r"reference holds the labels \[4\]"):
        evaluate_semantic_mean_iou(model, [{"pixel_values": torch.zeros(1, 3, 8, 8), "labels": labels[:1] * 0 + 4}])


def test_every_metric_is_a_script_in_a_folder_that_setup_ships():
    from setuptools import find_namespace_packages

    from mpsupernet.metrics.loading import MODULES_DIR

    source = MODULES_DIR.parents[2]  # src/, whose packages setup.py finds
    shipped = find_namespace_packages(str(source), include=["mpsupernet.metrics.modules.*"])  # as in setup.py
    assert sorted(shipped) == sorted(f"mpsupernet.metrics.modules.{name}" for name in METRICS)
    assert all((MODULES_DIR / name / f"{name}.py").is_file() for name in METRICS)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE written by hand: run lengths over the column-major pixels, background first."""
    flat = mask.ravel(order="F").astype(int)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def test_coco_mask_ap_reads_counts_as_text_bytes_or_runs():
    from pycocotools import mask as mask_utils

    objects = np.stack([_square(2, 2), _square(15, 15)])
    predicted = np.stack([_square(2, 2, pixels=80), _square(15, 15, pixels=62)])
    references = [{"image_id": 1, "segmentation": encode_masks(objects), "category_id": [1, 1], "iscrowd": [0, 0]}]
    as_text = {"image_id": 1, "segmentation": encode_masks(predicted), "score": [0.9, 0.8], "category_id": [1, 1]}
    as_bytes = dict(as_text, segmentation=mask_utils.encode(np.asfortranarray(predicted.transpose(1, 2, 0), np.uint8)))
    as_runs = dict(as_text, segmentation=[_uncompressed_rle(mask) for mask in predicted])
    expected = coco_mask_ap([as_text], references)
    assert expected["map_75"] == pytest.approx(51 / 101)  # 0.80 and 0.62 of their objects
    for other in (as_bytes, as_runs):
        assert coco_mask_ap([other], references) == pytest.approx(expected, nan_ok=True)
