"""Semantic tiers: saved, carded, loaded (PyTorch and ONNX) and run by transformers' image-segmentation pipeline."""

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import pipeline

import mpsupernet
from mpsupernet import SamSubnetForSemanticSegmentation, SamSupernetForSemanticSegmentation
from mpsupernet.data import SYNTHETIC_SEMANTIC_ID2LABEL
from mpsupernet.hub import render_supernet_card, render_subnet_card
from mpsupernet.pretrained import load_sam

from conftest import TEST_SAM


@pytest.fixture(scope="module")
def supernet():
    model = SamSupernetForSemanticSegmentation.from_sam(
        load_sam(TEST_SAM), id2label=SYNTHETIC_SEMANTIC_ID2LABEL
    ).eval()
    model.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    model.config.training_dataset = "mpsupernet synthetic shape classes"
    return model


@pytest.fixture(scope="module")
def tiers_folder(supernet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("semantic_tiers") / "tiers"
    tiers = {"w8a8": supernet.extract_subnet(supernet.search_space.largest(8, 8)), "small": supernet.extract_subnet("5%")}
    mpsupernet.save_tiers(tiers, folder, mean_ious={"w8a8": 0.5, "small": 0.4}, export_onnx=False)
    return folder


def test_cards_use_the_image_segmentation_pipeline_tag_and_class_miou(supernet, tiers_folder):
    card = ModelCard.load(tiers_folder / "small" / "README.md")
    assert card.data.pipeline_tag == "image-segmentation"
    result = card.data.eval_results[0]
    assert (result.task_type, result.metric_type, result.metric_value) == ("image-segmentation", "mean_iou", 0.4)
    assert "Class mean IoU **0.4000**" in card.text and 'pipeline("image-segmentation"' in card.text
    assert "input_boxes" not in card.text.split("## How to use")[1].split("## Limitations")[0]
    assert render_supernet_card(supernet).data.pipeline_tag == "image-segmentation"
    rendered = render_subnet_card(supernet.extract_subnet("5%"), has_onnx=True)
    assert "OnnxSamForSemanticSegmentation" in rendered.text and "OnnxSamModel." not in rendered.text


def test_load_subnet_returns_the_semantic_subnet_within_the_budget(tiers_folder):
    subnet = mpsupernet.load_subnet(tiers_folder, max_bitops="5%")
    assert isinstance(subnet, SamSubnetForSemanticSegmentation)
    assert subnet.config.id2label == SYNTHETIC_SEMANTIC_ID2LABEL
    assert subnet.bitops_report().summary()["share_of_full_precision"] <= 0.05


def test_pipeline_on_a_tier_folder(tiers_folder):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 60, 3), dtype=np.uint8))
    segments = pipeline("image-segmentation", model=str(tiers_folder / "small"))(image)
    assert segments and all(segment["label"] in SYNTHETIC_SEMANTIC_ID2LABEL.values() for segment in segments)
    assert all(segment["mask"].size == (60, 100) for segment in segments)
    # Every pixel belongs to exactly one class.
    coverage = sum(np.asarray(segment["mask"], dtype=np.int64) > 0 for segment in segments)
    assert (coverage == 1).all()
