import logging

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Image, List, Value, load_from_disk
from PIL import Image as PILImage
from PIL import ImageDraw
from scipy import ndimage
from torch.utils.data import DataLoader
from transformers import SamModel

from mpsupernet.data import (
    MODEL_INPUT_NAMES,
    PAD_POINT_LABEL,
    SamSegmentationPreprocessor,
    collate_fn,
    decode_coco_segmentation,
    from_coco_annotations,
    from_instance_mask_columns,
    from_semantic_maps,
    jitter_box,
    low_res_mask_size,
    make_synthetic_segmentation_dataset,
    make_synthetic_segmentation_dataset_dict,
    mask_to_box,
    remove_examples_without_masks,
    sample_points,
    semantic_map_to_masks,
)
from mpsupernet.testing_utils import make_sam_config


def as_bool(mask) -> np.ndarray:
    return np.asarray(mask) > 0


def independent_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.where(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


def rectangle_mask(height, width, x1, y1, x2, y2) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y1 : y2 + 1, x1 : x2 + 1] = True
    return mask


# --- synthetic data -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_segmentation_dataset(12, image_size=64, min_objects=2, max_objects=4, seed=3)


def test_synthetic_is_deterministic_and_seed_dependent(synthetic):
    again = make_synthetic_segmentation_dataset(12, image_size=64, min_objects=2, max_objects=4, seed=3)
    other = make_synthetic_segmentation_dataset(12, image_size=64, min_objects=2, max_objects=4, seed=4)
    prefix = make_synthetic_segmentation_dataset(5, image_size=64, min_objects=2, max_objects=4, seed=3)
    for i in range(12):
        assert np.array_equal(np.asarray(synthetic[i]["image"]), np.asarray(again[i]["image"]))
        assert all(np.array_equal(as_bool(a), as_bool(b)) for a, b in zip(synthetic[i]["masks"], again[i]["masks"]))
    # Image i does not depend on how many images were asked for.
    for i in range(5):
        assert np.array_equal(np.asarray(synthetic[i]["image"]), np.asarray(prefix[i]["image"]))
    assert not all(np.array_equal(np.asarray(synthetic[i]["image"]), np.asarray(other[i]["image"])) for i in range(12))


def test_synthetic_masks_are_visible_parts(synthetic):
    assert synthetic.features["masks"] == List(Image())
    assert synthetic["image_id"] == list(range(12))
    shapes_seen = set()
    for example in synthetic:
        image = np.asarray(example["image"])
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        masks = [as_bool(mask) for mask in example["masks"]]
        assert 2 <= len(masks) <= 4
        assert len(example["shapes"]) == len(masks)
        shapes_seen.update(example["shapes"])
        for mask in masks:
            assert mask.shape == (64, 64) and mask.any()
        # Visible parts of different objects never overlap.
        assert np.sum(masks, axis=0).max() == 1
    assert len(shapes_seen) >= 4


def test_synthetic_rings_have_holes():
    dataset = make_synthetic_segmentation_dataset(40, image_size=64, seed=0)
    holes = [
        (ndimage.binary_fill_holes(as_bool(mask)) & ~as_bool(mask)).sum()
        for example in dataset
        for shape, mask in zip(example["shapes"], example["masks"])
        if shape == "ring"
    ]
    assert holes and max(holes) > 0


def test_synthetic_round_trips_through_disk(synthetic, tmp_path):
    synthetic.save_to_disk(str(tmp_path / "synthetic"))
    loaded = load_from_disk(str(tmp_path / "synthetic"))
    assert loaded.features == synthetic.features
    for a, b in zip(loaded[3]["masks"], synthetic[3]["masks"]):
        assert np.array_equal(as_bool(a), as_bool(b))


def test_synthetic_dataset_dict_splits_are_disjoint():
    splits = make_synthetic_segmentation_dataset_dict(4, 3, image_size=32, seed=1)
    assert isinstance(splits, DatasetDict) and splits.num_rows == {"train": 4, "validation": 3}
    alone = make_synthetic_segmentation_dataset(4, image_size=32, seed=1)
    assert np.array_equal(np.asarray(splits["train"][0]["image"]), np.asarray(alone[0]["image"]))
    assert not np.array_equal(np.asarray(splits["train"][0]["image"]), np.asarray(splits["validation"][0]["image"]))


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_objects=3 and max_objects=2"):
        make_synthetic_segmentation_dataset(1, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="at least 16, got 8"):
        make_synthetic_segmentation_dataset(1, image_size=8)


# --- prompts --------------------------------------------------------------------------------------------------------


def test_mask_to_box_matches_independent_box(synthetic):
    for example in synthetic:
        for mask in example["masks"]:
            mask = as_bool(mask)
            assert tuple(mask_to_box(mask)) == independent_box(mask)
    with pytest.raises(ValueError, match="empty mask"):
        mask_to_box(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"2-D mask.*\(2, 4, 4\)"):
        mask_to_box(np.ones((2, 4, 4)))


def test_jitter_box_noise_scale_and_clipping():
    box = np.array([20.0, 30.0, 59.0, 49.0])  # 40 pixels wide, 20 high
    assert np.allclose(jitter_box(box, (100, 100), 0, noise_ratio=0.0), box)
    assert np.array_equal(jitter_box(box, (100, 100), 7), jitter_box(box, (100, 100), 7))
    rng = np.random.default_rng(0)
    samples = np.stack([jitter_box(box, (1000, 1000), rng, noise_ratio=0.1, max_noise=None) for _ in range(4000)])
    offsets = samples - box
    assert np.allclose(offsets.std(axis=0), [4.0, 2.0, 4.0, 2.0], rtol=0.1)
    capped = np.stack([jitter_box(box, (1000, 1000), rng, noise_ratio=0.5, max_noise=3.0) for _ in range(500)])
    assert np.abs(capped - box).max() <= 3.0 + 1e-5
    near_edge = np.stack([jitter_box(np.array([0.0, 0, 9, 9]), (10, 10), rng, noise_ratio=1.0) for _ in range(200)])
    assert near_edge.min() >= 0 and near_edge.max() <= 9
    assert (near_edge[:, 0] <= near_edge[:, 2]).all() and (near_edge[:, 1] <= near_edge[:, 3]).all()


def test_sample_points_inside_and_outside():
    mask = rectangle_mask(50, 60, 10, 20, 29, 34)
    points, labels = sample_points(mask, 0, num_positive=30, num_negative=30)
    assert points.shape == (60, 2) and labels.tolist() == [1] * 30 + [0] * 30
    xs, ys = points[:, 0].astype(int), points[:, 1].astype(int)
    assert mask[ys[:30], xs[:30]].all()
    assert not mask[ys[30:], xs[30:]].any()
    # Negatives stay near the object: within its box enlarged by a quarter of its sides (20 x 15 pixels).
    assert xs[30:].min() >= 10 - 5 and xs[30:].max() <= 29 + 5
    assert ys[30:].min() >= 20 - 4 and ys[30:].max() <= 34 + 4
    again, _ = sample_points(mask, 0, num_positive=30, num_negative=30)
    assert np.array_equal(points, again)


def test_sample_points_on_a_full_mask_pads_negatives():
    points, labels = sample_points(np.ones((8, 8)), 0, num_positive=1, num_negative=2)
    assert labels.tolist() == [1, PAD_POINT_LABEL, PAD_POINT_LABEL]
    with pytest.raises(ValueError, match="at least one point"):
        sample_points(np.ones((8, 8)), 0, num_positive=0, num_negative=0)


# --- adapters -------------------------------------------------------------------------------------------------------


def random_image(height, width, seed=0) -> PILImage.Image:
    return PILImage.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_instance_mask_adapter_with_custom_columns():
    masks = [rectangle_mask(20, 30, 2, 3, 10, 12), rectangle_mask(20, 30, 15, 0, 29, 5)]
    dataset = Dataset.from_dict(
        {
            "img": [random_image(20, 30)],
            "segs": [[(mask * 255).astype(np.uint8) for mask in masks]],
            "extra": ["dropped"],
        },
        features=Features({"img": Image(), "segs": List(List(List(Value("uint8")))), "extra": Value("string")}),
    )
    converted = from_instance_mask_columns(dataset, image_column="img", masks_column="segs")
    assert converted.column_names == ["image", "masks", "image_id"]
    example = converted[0]
    assert np.array_equal(np.asarray(example["image"]), np.asarray(dataset[0]["img"]))
    assert [np.array_equal(as_bool(a), b) for a, b in zip(example["masks"], masks)] == [True, True]
    assert example["image_id"] == 0


def test_adapters_name_missing_columns():
    dataset = Dataset.from_dict({"image": [random_image(4, 4)], "labels": [[1]]})
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['masks'\].*\['image', 'labels'\]"):
        from_instance_mask_columns(dataset)
    with pytest.raises(ValueError, match=r"\['objects'\]"):
        from_coco_annotations(dataset)
    with pytest.raises(ValueError, match=r"\['annotation'\]"):
        from_semantic_maps(dataset)


def test_adapters_reject_masks_of_another_size():
    dataset = Dataset.from_dict({"image": [random_image(20, 30)], "masks": [[np.ones((20, 31), np.uint8)]]})
    dataset = dataset.cast_column("image", Image())
    with pytest.raises(ValueError, match="size 20x31 .* image is 20x30"):
        from_instance_mask_columns(dataset)
    semantic = Dataset.from_dict({"image": [random_image(20, 30)], "annotation": [PILImage.new("L", (30, 21))]})
    with pytest.raises(ValueError, match="size 21x30 .* image is 20x30"):
        from_semantic_maps(semantic)


def polygon_mask(height, width, polygon) -> np.ndarray:
    """Draws a COCO polygon with PIL; COCO's pixel i spans [i, i + 1), PIL's is centred on i."""
    canvas = PILImage.new("1", (width, height))
    ImageDraw.Draw(canvas).polygon([(x - 0.5, y - 0.5) for x, y in zip(polygon[::2], polygon[1::2])], fill=1)
    return np.asarray(canvas)


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's run lengths: column-major, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    boundaries = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(boundaries).tolist()
    return [0] + counts if flat[0] else counts


def compress_counts(counts: list[int]) -> str:
    """COCO's compressed RLE string, written from the format's description (5-bit groups, deltas from i-2)."""
    characters = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = value != -1 if chunk & 0x10 else value != 0
            characters.append(chr((chunk | (0x20 if more else 0)) + 48))
    return "".join(characters)


COCO_SIZE = (40, 50)
TRIANGLE = [5.0, 5.0, 30.0, 8.0, 12.0, 30.0]
SQUARE = [32.0, 20.0, 45.0, 20.0, 45.0, 35.0, 32.0, 35.0]


def blob_mask() -> np.ndarray:
    blob = np.zeros(COCO_SIZE, dtype=bool)
    blob[25:38, 2:20] = True
    blob[30:33, 8:12] = False  # a hole
    blob[0:3, 45:50] = True  # a second part
    return blob


def assert_same_up_to_boundary(decoded: np.ndarray, drawn: np.ndarray) -> None:
    # Polygon rasterisers disagree on boundary pixels only.
    assert not (decoded & ~ndimage.binary_dilation(drawn)).any()
    assert not (ndimage.binary_erosion(drawn) & ~decoded).any()


def test_decode_coco_segmentation_against_independent_masks():
    height, width = COCO_SIZE
    assert_same_up_to_boundary(decode_coco_segmentation([TRIANGLE], COCO_SIZE), polygon_mask(height, width, TRIANGLE))
    # Two polygons of one object, a flat single polygon, and a degenerate 2-point polygon that is ignored.
    both = decode_coco_segmentation([TRIANGLE, SQUARE, [1.0, 1.0, 2.0, 2.0]], COCO_SIZE)
    assert_same_up_to_boundary(both, polygon_mask(height, width, TRIANGLE) | polygon_mask(height, width, SQUARE))
    assert np.array_equal(decode_coco_segmentation(SQUARE, COCO_SIZE), decode_coco_segmentation([SQUARE], COCO_SIZE))
    blob = blob_mask()
    counts = uncompressed_rle(blob)
    assert np.array_equal(decode_coco_segmentation({"size": [height, width], "counts": counts}, COCO_SIZE), blob)
    compressed = compress_counts(counts)
    for encoded in (compressed, compressed.encode("ascii")):
        assert np.array_equal(decode_coco_segmentation({"size": [height, width], "counts": encoded}, COCO_SIZE), blob)
    with pytest.raises(ValueError, match="Unknown COCO segmentation of type int"):
        decode_coco_segmentation(3, COCO_SIZE)


@pytest.mark.parametrize("objects_as_dict", [False, True])
def test_coco_adapter_with_polygons(objects_as_dict):
    object_feature = {
        "segmentation": List(List(Value("float32"))),
        "bbox": List(Value("float32")),
        "iscrowd": Value("int64"),
    }
    objects = [
        {"segmentation": [TRIANGLE], "bbox": [5.0, 5.0, 25.0, 25.0], "iscrowd": 0},
        {"segmentation": [SQUARE], "bbox": [32.0, 20.0, 13.0, 15.0], "iscrowd": 0},
    ]
    if objects_as_dict:
        # The layout of datasets that declare `objects` as a `Sequence` of a dict.
        objects = {key: [obj[key] for obj in objects] for key in object_feature}
    features = Features(
        {
            "image": Image(),
            "objects": {key: List(value) for key, value in object_feature.items()}
            if objects_as_dict
            else List(object_feature),
            "height": Value("int64"),
            "width": Value("int64"),
            "image_id": Value("int64"),
        }
    )
    dataset = Dataset.from_dict(
        {"image": [random_image(*COCO_SIZE)], "objects": [objects], "height": [40], "width": [50], "image_id": [7]},
        features=features,
    )
    converted = from_coco_annotations(dataset)[0]
    assert converted["image_id"] == 7 and len(converted["masks"]) == 2
    for mask, polygon in zip(converted["masks"], (TRIANGLE, SQUARE)):
        assert_same_up_to_boundary(as_bool(mask), polygon_mask(*COCO_SIZE, polygon))


@pytest.mark.parametrize("compressed", [False, True])
def test_coco_adapter_with_rles_skips_crowds(compressed):
    blob, crowd = blob_mask(), rectangle_mask(*COCO_SIZE, 40, 10, 49, 15)

    def rle(mask):
        counts = uncompressed_rle(mask)
        return {"size": list(COCO_SIZE), "counts": compress_counts(counts) if compressed else counts}

    dataset = Dataset.from_list(
        [
            {
                "image": random_image(*COCO_SIZE),
                "objects": [{"segmentation": rle(blob), "iscrowd": 0}, {"segmentation": rle(crowd), "iscrowd": 1}],
            }
        ]
    ).cast_column("image", Image())
    converted = from_coco_annotations(dataset)[0]
    assert converted["image_id"] == 0  # no id column: the row index
    assert len(converted["masks"]) == 1 and np.array_equal(as_bool(converted["masks"][0]), blob)
    with_crowd = from_coco_annotations(dataset, include_crowd=True)[0]["masks"]
    assert np.array_equal(as_bool(with_crowd[1]), crowd)


def test_coco_adapter_size_errors():
    with pytest.raises(ValueError, match="RLE has size 10x10 .* image is 40x50"):
        decode_coco_segmentation({"size": [10, 10], "counts": [100]}, (40, 50))
    dataset = Dataset.from_list(
        [
            {
                "image": random_image(40, 50),
                "objects": [{"segmentation": [[1.0, 1, 5, 1, 5, 5]]}],
                "height": 41,
                "width": 50,
            }
        ]
    ).cast_column("image", Image())
    with pytest.raises(ValueError, match="height=41 but its image's height is 40"):
        from_coco_annotations(dataset)


def test_semantic_map_adapter_regions_and_classes():
    label_map = np.zeros((30, 40), dtype=np.uint8)
    label_map[2:10, 2:10] = 3
    label_map[20:28, 30:38] = 3  # a second, separate region of class 3
    label_map[12:18, 5:35] = 5
    label_map[0, 39] = 7  # a one-pixel speck
    label_map[25:30, 0:5] = 255
    dataset = DatasetDict(
        train=Dataset.from_dict({"image": [random_image(30, 40)], "annotation": [PILImage.fromarray(label_map)]})
    )
    connected = from_semantic_maps(dataset)["train"][0]["masks"]
    expected = [label_map == 3, label_map == 5, label_map == 7]
    expected = [rectangle_mask(30, 40, 2, 2, 9, 9), rectangle_mask(30, 40, 30, 20, 37, 27), expected[1], expected[2]]
    assert len(connected) == 4
    assert all(np.array_equal(as_bool(m), e) for m, e in zip(connected, expected))
    by_class = from_semantic_maps(dataset, mode="class", min_area=2)["train"][0]["masks"]
    assert [as_bool(m).sum() for m in by_class] == [128, 180]
    assert len(semantic_map_to_masks(label_map, ignore_labels=())) == 6  # background and void count too
    with pytest.raises(ValueError, match="Unknown mode 'instances'"):
        from_semantic_maps(dataset, mode="instances")
    with pytest.raises(ValueError, match=r"single-channel .* \(30, 40, 3\)"):
        semantic_map_to_masks(np.zeros((30, 40, 3)))


# --- preprocessing --------------------------------------------------------------------------------------------------


CONFIG = make_sam_config(image_size=64, patch_size=8)  # pred_masks are 32 x 32


def objects_dataset(height=48, width=80):
    """Two rectangles on a non-square image, so that resizing and padding both matter."""
    first = rectangle_mask(height, width, 8, 10, 39, 29)
    second = rectangle_mask(height, width, 50, 20, 75, 45)
    return Dataset.from_dict(
        {
            "image": [random_image(height, width)],
            "masks": [[PILImage.fromarray(first), PILImage.fromarray(second)]],
            "image_id": [0],
        }
    ).cast_column("image", Image()), [first, second]


def test_low_res_mask_size_matches_sam_model():
    model = SamModel(CONFIG).eval()
    with torch.no_grad():
        outputs = model(pixel_values=torch.zeros(1, 3, 64, 64), input_boxes=torch.tensor([[[0.0, 0, 10, 10]]]))
    assert outputs.pred_masks.shape[-1] == low_res_mask_size(64, 8) == 32


@pytest.mark.parametrize("prompt_mode", ["box", "points", "box_and_points"])
def test_preprocessor_shapes_and_model_forward(prompt_mode, synthetic):
    preprocessor = SamSegmentationPreprocessor(
        CONFIG, prompts_per_image=3, prompt_mode=prompt_mode, num_positive_points=2, num_negative_points=1
    )
    loader = DataLoader(synthetic.with_transform(preprocessor), batch_size=4, collate_fn=collate_fn)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["ground_truth_masks"].shape == (4, 3, 32, 32)
    assert set(batch["ground_truth_masks"].unique().tolist()) <= {0.0, 1.0}
    assert ("input_boxes" in batch) == (prompt_mode != "points")
    assert ("input_points" in batch) == (prompt_mode != "box")
    if prompt_mode != "points":
        assert batch["input_boxes"].shape == (4, 3, 4)
    if prompt_mode != "box":
        assert batch["input_points"].shape == (4, 3, 3, 2) and batch["input_labels"].shape == (4, 3, 3)
    model = SamModel(CONFIG).eval()
    with torch.no_grad():
        outputs = model(**{name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}, multimask_output=False)
    assert outputs.pred_masks.shape[:2] + outputs.pred_masks.shape[3:] == batch["ground_truth_masks"].shape


def test_box_lands_on_its_object_in_the_low_res_target():
    dataset, masks = objects_dataset()
    preprocessor = SamSegmentationPreprocessor(CONFIG, prompts_per_image=2, box_noise_ratio=0.0)
    processed = preprocessor(dataset[:1])
    # 48x80 is resized to 38x64 (longest edge 64) and padded to 64x64.
    assert processed["reshaped_input_sizes"][0].tolist() == [38, 64]
    assert processed["original_sizes"][0].tolist() == [48, 80]
    scale = np.array([64 / 80, 38 / 48, 64 / 80, 38 / 48])
    boxes = processed["input_boxes"][0].numpy()
    targets = processed["ground_truth_masks"][0].numpy() > 0
    factor = 64 / 32
    for box, target in zip(boxes, targets):
        original = masks[0] if box[0] < 32 else masks[1]
        assert np.allclose(box, np.array(independent_box(original)) * scale, atol=1e-4)
        # The box was computed on the original mask and scaled to the model frame; the target was resized with the
        # image: both must agree in the low-res frame to within a low-res pixel.
        assert np.allclose(np.array(independent_box(target)), box / factor, atol=1.0)
    assert not np.array_equal(targets[0], targets[1])
    # Nothing lies in the padding (model rows 38 and below, low-res rows 19 and below).
    assert not targets[:, 19:].any()


def test_points_land_inside_their_object():
    dataset, _ = objects_dataset()
    preprocessor = SamSegmentationPreprocessor(
        CONFIG, prompts_per_image=2, prompt_mode="points", num_positive_points=20, num_negative_points=20
    )
    processed = preprocessor(dataset[:1])
    points = processed["input_points"][0].numpy()
    labels = processed["input_labels"][0].numpy()
    targets = processed["ground_truth_masks"][0].numpy() > 0
    for prompt, (object_points, object_labels) in enumerate(zip(points, labels)):
        assert object_labels.tolist() == [1] * 20 + [0] * 20
        # Point coordinates are pixel indices; SAM's prompt encoder takes pixel centres (+0.5).
        columns, rows = np.floor((object_points + 0.5) / 2).astype(int).T
        own, other = targets[prompt], targets[1 - prompt]
        # Area thresholding may move the object's border by a low-res pixel.
        assert ndimage.binary_dilation(own)[rows[:20], columns[:20]].all()
        assert not other[rows[:20], columns[:20]].any()
        assert not ndimage.binary_erosion(own)[rows[20:], columns[20:]].any()


def test_preprocessor_is_deterministic_per_example(synthetic):
    preprocessor = SamSegmentationPreprocessor(CONFIG, prompts_per_image=3, prompt_mode="box_and_points", seed=5)
    batch = preprocessor(synthetic[0:4])
    alone = preprocessor(synthetic[2:3])
    # The same example gets the same prompts whatever batch it is in.
    assert torch.equal(batch["input_boxes"][2], alone["input_boxes"][0])
    assert torch.equal(batch["input_points"][2], alone["input_points"][0])
    fresh = SamSegmentationPreprocessor(CONFIG, prompts_per_image=3, prompt_mode="box_and_points", seed=5)
    assert torch.equal(fresh(synthetic[0:4])["input_boxes"][0], batch["input_boxes"][0])
    fresh.set_epoch(1)
    assert not torch.equal(fresh(synthetic[0:4])["input_boxes"][0], batch["input_boxes"][0])


def test_preprocessor_repeats_objects_when_there_are_few():
    dataset, masks = objects_dataset()
    preprocessor = SamSegmentationPreprocessor(CONFIG, prompts_per_image=5, box_noise_ratio=0.0)
    boxes = preprocessor(dataset[:1])["input_boxes"][0]
    left = (boxes[:, 0] < 32).sum().item()
    assert boxes.shape == (5, 4) and 1 <= left <= 4  # every object at least once


def test_empty_masks_are_dropped_and_examples_skipped(caplog):
    empty = np.zeros((48, 80), dtype=bool)
    full = rectangle_mask(48, 80, 5, 5, 20, 20)
    dataset = Dataset.from_dict(
        {
            "image": [random_image(48, 80, seed) for seed in range(3)],
            "masks": [
                [PILImage.fromarray(empty), PILImage.fromarray(full)],
                [PILImage.fromarray(empty)],
                [],
            ],
            "image_id": [0, 1, 2],
        }
    ).cast_column("image", Image())
    preprocessor = SamSegmentationPreprocessor(CONFIG, prompts_per_image=2)
    with caplog.at_level(logging.WARNING):
        processed = dataset.with_transform(preprocessor)
        batch = collate_fn(processed.__getitems__([0, 1, 2]))
    assert batch["pixel_values"].shape[0] == 1
    assert preprocessor.num_dropped_masks == 2 and preprocessor.num_skipped_examples == 2
    assert "skipped 2 example(s)" in caplog.text
    assert processed[1]["pixel_values"] is None
    assert collate_fn([processed[1], processed[2]]) == {}
    assert len(remove_examples_without_masks(dataset)) == 1


def test_preprocessor_errors():
    dataset = Dataset.from_dict({"image": [random_image(20, 30)], "masks": [[np.ones((21, 30), np.uint8)]]})
    preprocessor = SamSegmentationPreprocessor(image_size=64, patch_size=8)
    with pytest.raises(ValueError, match="size 21x30 .* image is 20x30"):
        preprocessor(dataset.cast_column("image", Image())[:1])
    with pytest.raises(ValueError, match=r"lack the column\(s\) \['masks'\]; they have the columns \['image'\]"):
        preprocessor({"image": [random_image(4, 4)]})
    with pytest.raises(ValueError, match="not both"):
        SamSegmentationPreprocessor(CONFIG, image_size=64)
    with pytest.raises(ValueError, match="Unknown prompt_mode 'mask'"):
        SamSegmentationPreprocessor(CONFIG, prompt_mode="mask")
    with pytest.raises(ValueError, match="resizes the longest edge to 1024 .* input is 64x64"):
        from transformers import SamImageProcessorPil

        SamSegmentationPreprocessor(CONFIG, image_processor=SamImageProcessorPil())
