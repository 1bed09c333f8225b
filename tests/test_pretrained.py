import json
import socket

import huggingface_hub.constants
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import SamModel

from mpsupernet.data import SamSegmentationPreprocessor, collate_fn, make_synthetic_segmentation_dataset
from mpsupernet.evaluation import evaluate_mean_iou
from mpsupernet.pretrained import EMBEDDED_SAM_PATH, embedded_sam_config, load_embedded_sam


# scripts/pretrain_embedded_sam.py measured a box-prompt mIoU of 0.620 on its validation split (training_log.json),
# up from 0.058 untrained; the 32 fresh images below score 0.658 (200 images of another seed: 0.612) and random
# initialisations about 0.055. Tight boxes filled entirely would score about 0.56: the threshold asks for a model that
# segments, with a margin for a retrained model and the small sample.
MIN_PRETRAINED_MIOU = 0.5
MAX_RANDOM_MIOU = 0.15


@pytest.fixture(scope="module")
def validation_loader():
    dataset = make_synthetic_segmentation_dataset(32, image_size=128, seed=20261126)
    preprocessor = SamSegmentationPreprocessor(embedded_sam_config(), prompts_per_image=4, box_noise_ratio=0.0)
    return DataLoader(dataset.with_transform(preprocessor), batch_size=16, collate_fn=collate_fn)


@pytest.fixture(scope="module")
def embedded_sam():
    return load_embedded_sam()


def test_embedded_sam_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("the embedded SAM must load without network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = load_embedded_sam()
    assert isinstance(model, SamModel)
    assert not model.training
    assert model.config.vision_config.image_size == 128
    config = embedded_sam_config()
    assert config.vision_config.hidden_size == model.config.vision_config.hidden_size
    assert config.vision_config.num_hidden_layers == model.config.vision_config.num_hidden_layers


def test_embedded_sam_files_are_small():
    weights = EMBEDDED_SAM_PATH / "model.safetensors"
    assert weights.stat().st_size <= 4 * 1024 * 1024
    log = json.loads((EMBEDDED_SAM_PATH / "training_log.json").read_text())
    assert log["validation_miou_box"]["after"] > log["validation_miou_box"]["before"]


def test_embedded_sam_segments_far_better_than_a_random_sam(embedded_sam, validation_loader):
    pretrained = evaluate_mean_iou(embedded_sam, validation_loader, show_progress=False)
    torch.manual_seed(0)
    random_sam = SamModel(embedded_sam_config()).eval()
    random = evaluate_mean_iou(random_sam, validation_loader, show_progress=False)
    assert pretrained >= MIN_PRETRAINED_MIOU
    assert random <= MAX_RANDOM_MIOU
    assert pretrained >= random + 0.4
