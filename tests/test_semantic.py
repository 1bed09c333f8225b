"""Class segmentation: configs, the supernet and subnet contract, the processor, the loss and the pipeline."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    pipeline,
)

from mpsupernet import (
    SamSemanticImageProcessor,
    SamSemanticSubnetConfig,
    SamSemanticSupernetConfig,
    SamSubnetForMaskGeneration,
    SamSubnetForSemanticSegmentation,
    SamSupernetForMaskGeneration,
    SamSupernetForSemanticSegmentation,
)
from mpsupernet.pretrained import load_sam
from mpsupernet.semantic_loss import class_logits_distillation_loss, semantic_segmentation_loss
from mpsupernet.testing_utils import make_sam_config

from conftest import TEST_SAM

CLASSES = {0: "background", 1: "disc", 2: "square", 3: "triangle", 4: "star"}


def _base_config() -> dict:
    config = make_sam_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version", "id2label", "label2id"):
        config.pop(key, None)
    return config


@pytest.fixture(scope="module")
def sam():
    return load_sam(TEST_SAM).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def supernet(sam, images):
    """A semantic supernet with random adapters (so that merging them matters), calibrated at every bit-width."""
    model = SamSupernetForSemanticSegmentation.from_sam(sam, id2label=CLASSES).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.calibrate_quantizers(images)
    return model


# --- configuration -----------------------------------------------------------------------------------------------
def test_config_fills_both_label_maps_and_the_class_head():
    config = SamSemanticSupernetConfig(**_base_config(), id2label={0: "sky", 1: "road"})
    assert config.num_labels == 2 and config.label2id == {"sky": 0, "road": 1}
    assert config.mask_decoder_config.num_multimask_outputs == 2
    assert config.semantic_loss_ignore_index == 255
    named = SamSemanticSubnetConfig(**_base_config(), num_labels=3)
    assert named.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert named.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}


def test_config_refuses_inconsistent_labels():
    with pytest.raises(ValueError, match=r"`num_labels` is 4 but `id2label` names 2 classes"):
        SamSemanticSupernetConfig(**_base_config(), num_labels=4, id2label={0: "sky", 1: "road"})
    with pytest.raises(ValueError, match=r"`label2id` .* is not the inverse of `id2label`"):
        SamSemanticSupernetConfig(**_base_config(), id2label={0: "sky", 1: "road"}, label2id={"sky": 1, "road": 0})
    with pytest.raises(ValueError, match=r"`semantic_loss_ignore_index` is 1; it must be an integer from `num_labels`"):
        SamSemanticSubnetConfig(**_base_config(), num_labels=3, semantic_loss_ignore_index=1)
    with pytest.raises(ValueError, match=r"without gaps, got ids \[0, 2\]"):
        SamSemanticSupernetConfig(**_base_config(), id2label={0: "sky", 2: "road"})


def test_from_sam_refuses_missing_or_disagreeing_classes(sam):
    with pytest.raises(ValueError, match="Give the classes"):
        SamSupernetForSemanticSegmentation.from_sam(sam)
    with pytest.raises(ValueError, match=r"`num_labels` is 3 but `id2label` names 5 classes"):
        SamSupernetForSemanticSegmentation.from_sam(sam, num_labels=3, id2label=CLASSES)


# --- the model contract -----------------------------------------------------------------------------------------
def test_logits_have_one_map_per_class(supernet, images):
    with torch.no_grad():
        logits = supernet(images).logits
    assert logits.shape == (2, len(CLASSES), 64, 64)  # shapes-sam: 8-pixel patches, masks at 4x the 16x16 grid


def test_full_precision_supernet_is_the_sam_it_came_from(sam, images):
    """With three classes the class tokens are SAM's three multimask tokens: the full-precision supernet (adapters
    at zero) and its extracted full-precision subnet give SAM's own prompt-free multimask logits."""
    model = SamSupernetForSemanticSegmentation.from_sam(sam, num_labels=3).eval()
    with torch.no_grad():
        reference = sam(pixel_values=images, multimask_output=True).pred_masks[:, 0]
        logits = model(images).logits
        subnet_logits = model.extract_subnet(model.full_precision_subnet())(images).logits
    assert reference.abs().mean() > 0.05
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(subnet_logits, reference, atol=1e-5, rtol=0)


def test_class_tokens_start_from_sams_multimask_tokens(supernet, sam):
    tokens = supernet.sam.mask_decoder.mask_tokens.weight
    original = sam.mask_decoder.mask_tokens.weight
    assert tokens.shape[0] == len(CLASSES) + 1
    for index in range(1, len(CLASSES) + 1):
        torch.testing.assert_close(tokens[index], original[1 + (index - 1) % 3])


@pytest.mark.parametrize("seed", [0, 1])
def test_extracted_subnet_gives_the_supernets_logits(supernet, images, seed):
    arch = supernet.sample_subnet(seed)
    subnet = supernet.extract_subnet(arch)
    assert isinstance(subnet, SamSubnetForSemanticSegmentation)
    assert subnet.config.id2label == CLASSES and subnet.config.semantic_loss_ignore_index == 255
    with torch.no_grad(), supernet.using_subnet(arch):
        expected = supernet(images).logits
    with torch.no_grad():
        got = subnet(images).logits
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_extract_subnet_under_a_budget_returns_the_semantic_subnet(supernet):
    subnet = supernet.extract_subnet("10%")
    assert isinstance(subnet, SamSubnetForSemanticSegmentation)
    assert subnet.config.bitops_report["share_of_full_precision"] <= 0.10
    assert subnet.bitops_report().total_bitops == supernet.bitops_report(subnet.architecture).total_bitops


def test_save_and_load_through_the_auto_classes(supernet, images, tmp_path):
    subnet = supernet.extract_subnet(supernet.sample_subnet(3))
    for model, folder in ((supernet, tmp_path / "supernet"), (subnet, tmp_path / "subnet")):
        model.save_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        assert type(config) is model.config_class and config.id2label == CLASSES
        loaded = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
        assert type(loaded) is type(model)
        assert type(AutoModel.from_pretrained(folder)) is type(model)
        assert type(AutoImageProcessor.from_pretrained(folder)) is SamSemanticImageProcessor
        with torch.no_grad():
            torch.testing.assert_close(loaded(images).logits, model(images).logits, atol=1e-6, rtol=0)


def test_promptable_and_semantic_checkpoints_are_not_confused(supernet, tmp_path):
    supernet.save_pretrained(tmp_path / "semantic")
    with pytest.raises(ValueError, match=r"holds a `sam_semantic_supernet` checkpoint.*without prompts"):
        SamSupernetForMaskGeneration.from_pretrained(tmp_path / "semantic")
    subnet = supernet.extract_subnet("10%")
    subnet.save_pretrained(tmp_path / "semantic_subnet")
    with pytest.raises(ValueError, match=r"holds a `sam_semantic_subnet` checkpoint"):
        SamSubnetForMaskGeneration.from_pretrained(tmp_path / "semantic_subnet")


# --- bad input -----------------------------------------------------------------------------------------------------
def test_labels_outside_the_classes_are_refused(supernet, images):
    labels = torch.zeros(2, 128, 128, dtype=torch.long)
    labels[1, 5, 7] = 5
    with pytest.raises(ValueError, match=r"`labels` holds 5, which is no class .* 0 to 4 .* ignore index 255"):
        supernet(images, labels=labels)
    labels[1, 5, 7] = 255
    assert torch.isfinite(supernet(images, labels=labels).loss)


def test_prompts_are_refused(supernet, images):
    boxes = torch.tensor([[[10.0, 10.0, 60.0, 60.0]], [[0.0, 0.0, 30.0, 30.0]]])
    with pytest.raises(ValueError, match=r"without prompts, but got \['input_boxes'\]"):
        supernet(images, input_boxes=boxes)
    subnet = supernet.extract_subnet("10%")
    with pytest.raises(ValueError, match=r"without prompts, but got \['input_boxes', 'input_points'\]"):
        subnet(images, input_boxes=boxes, input_points=torch.zeros(2, 1, 1, 2))


# --- loss ------------------------------------------------------------------------------------------------------------
def test_loss_ignores_ignored_pixels_entirely():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (2, 8, 8), generator=generator)
    labels[0, :3] = 255
    loss = semantic_segmentation_loss(logits, labels)
    # Independent: CE over the labelled pixels only, Dice per class over them.
    valid = labels != 255
    log_probs = logits.log_softmax(1).permute(0, 2, 3, 1)[valid]
    targets = labels[valid]
    cross_entropy = -log_probs[torch.arange(len(targets)), targets].mean()
    probs, one_hot = log_probs.exp(), F.one_hot(targets, 3).float()
    dice = 1 - (2 * (probs * one_hot).sum(0) + 1) / (probs.sum(0) + one_hot.sum(0) + 1)
    torch.testing.assert_close(loss, 0.2 * cross_entropy + 0.8 * dice.mean())
    # Padding with ignored pixels (any logits there) changes nothing.
    padded_logits = torch.cat([logits, torch.randn(2, 3, 8, 8, generator=generator) * 9], dim=-1)
    padded_labels = torch.cat([labels, torch.full_like(labels, 255)], dim=-1)
    torch.testing.assert_close(semantic_segmentation_loss(padded_logits, padded_labels), loss)
    everything_ignored = semantic_segmentation_loss(logits.requires_grad_(), torch.full_like(labels, 255))
    assert everything_ignored.item() == 0.0 and everything_ignored.requires_grad


def test_distillation_is_zero_for_the_teacher_itself_and_positive_otherwise():
    teacher = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    assert class_logits_distillation_loss(teacher, teacher).abs() < 1e-6
    assert class_logits_distillation_loss(teacher.flip(1), teacher) > 0.01


# --- processor and pipeline ------------------------------------------------------------------------------------------
def _blocky_map(height: int, width: int) -> np.ndarray:
    label_map = np.zeros((height, width), dtype=np.uint8)
    label_map[: height // 2, : width // 3] = 1
    label_map[height // 2 :, width // 2 :] = 3
    label_map[5:15, -20:] = 2
    return label_map


def test_processor_pads_label_maps_with_the_ignore_index_and_post_processing_undoes_it():
    processor = SamSemanticImageProcessor.for_model(128, 8)
    image = np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8)
    label_map = _blocky_map(60, 100)
    encoded = processor(image, segmentation_maps=label_map, return_tensors="pt")
    assert set(encoded) == {"pixel_values", "labels"}
    labels = encoded["labels"]
    assert labels.shape == (1, 128, 128) and labels.dtype == torch.int64
    # 100 -> 128 wide, 60 -> round(76.8) = 77 high; the rest is padding.
    assert (labels[0, 77:] == 255).all() and (labels[0, :77] != 255).all()
    assert labels[0, 0, 0] == 1 and labels[0, 76, 127] == 3
    # Logits that say exactly the padded label map, at a quarter of the input: post-processing gives the map back.
    one_hot = F.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 10
    logits = F.interpolate(one_hot, size=(32, 32), mode="area")
    restored = processor.post_process_semantic_segmentation(
        type("Output", (), {"logits": logits})(), target_sizes=[(60, 100)]
    )[0]
    assert restored.shape == (60, 100)
    assert (restored.numpy() == label_map).mean() > 0.97
    with pytest.raises(ValueError, match=r"label map of shape \(10, 10\) was given for an image of size \(60, 100\)"):
        processor(image, segmentation_maps=np.zeros((10, 10), dtype=np.uint8))


def test_image_segmentation_pipeline_on_a_saved_subnet(supernet, tmp_path):
    folder = tmp_path / "tier"
    subnet = supernet.extract_subnet("10%")
    subnet.save_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 70, 3), dtype=np.uint8))
    results = pipeline("image-segmentation", model=str(folder))(image)
    # Independent: processor, model, post-processing by hand.
    processor = SamSemanticImageProcessor.for_model(128, 8)
    with torch.no_grad():
        outputs = subnet(**processor(image, return_tensors="pt"))
    class_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(90, 70)])[0].numpy()
    present = sorted(np.unique(class_map))
    assert [result["label"] for result in results] == [CLASSES[c] for c in present]
    for result, class_id in zip(results, present):
        assert result["mask"].size == (70, 90)
        np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, class_map == class_id)


# --- data ------------------------------------------------------------------------------------------------------------
def test_synthetic_semantic_dataset_is_deterministic_and_labels_the_shapes():
    from mpsupernet.data import SYNTHETIC_SEMANTIC_ID2LABEL, make_synthetic_semantic_dataset
    from mpsupernet.data.synthetic import _generate_example

    first = make_synthetic_semantic_dataset(3, image_size=64, seed=4)
    again = make_synthetic_semantic_dataset(5, image_size=64, seed=4)
    assert first.column_names == ["image", "annotation"] and first.info.dataset_name
    for index in range(3):
        np.testing.assert_array_equal(np.asarray(first[index]["annotation"]), np.asarray(again[index]["annotation"]))
        np.testing.assert_array_equal(np.asarray(first[index]["image"]), np.asarray(again[index]["image"]))
    # Independent: the instance generator's visible masks, painted with their shape's class id.
    _, masks, shapes = _generate_example(np.random.default_rng((4, 10, 0)), 64, 2, 5)
    annotation = np.asarray(first[0]["annotation"])
    for mask, shape in zip(masks, shapes):
        assert SYNTHETIC_SEMANTIC_ID2LABEL[int(annotation[mask][0])] == shape
        assert (annotation[mask] == annotation[mask][0]).all()
    assert (annotation[~np.any(masks, axis=0)] == 0).all()
    other = make_synthetic_semantic_dataset(1, image_size=64, seed=5)
    assert not np.array_equal(np.asarray(other[0]["annotation"]), annotation)


def test_ade20k_label_reduction():
    from datasets import Dataset

    from mpsupernet.data import from_ade20k, reduce_ade20k_labels

    annotation = np.array([[0, 1, 150], [2, 0, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_ade20k_labels(annotation), [[255, 0, 149], [1, 255, 6]])
    with pytest.raises(ValueError, match=r"holds 200 \(was it reduced already\?\)"):
        reduce_ade20k_labels(np.array([[200]]))
    raw = Dataset.from_dict(
        {"image": [Image.new("L", (3, 2))], "annotation": [Image.fromarray(annotation)], "scene_category": [3]}
    )
    reduced = from_ade20k(raw)
    assert reduced.column_names == ["image", "annotation"] and reduced[0]["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(reduced[0]["annotation"]), reduce_ade20k_labels(annotation))


def test_dataset_of_the_other_task_is_refused():
    from mpsupernet.data import check_dataset_task, make_synthetic_segmentation_dataset

    semantic = make_synthetic_semantic_dataset_small()
    promptable = make_synthetic_segmentation_dataset(1, image_size=32)
    with pytest.raises(ValueError, match=r"`train_dataset` has the columns \['image', 'annotation'\]: a semantic"):
        check_dataset_task(semantic, "train_dataset", semantic=False)
    with pytest.raises(ValueError, match=r"`eval_dataset` has the columns .*'masks'.*: per-object masks"):
        check_dataset_task(promptable, "eval_dataset", semantic=True)
    check_dataset_task(semantic, "train_dataset", semantic=True)
    check_dataset_task(promptable, "train_dataset", semantic=False)


def make_synthetic_semantic_dataset_small():
    from mpsupernet.data import make_synthetic_semantic_dataset

    return make_synthetic_semantic_dataset(1, image_size=32, min_objects=1, max_objects=2)
