"""Training and evaluating a class-segmentation supernet: both paths, resuming, distillation, the class mIoU."""

import pytest
import torch
from accelerate import Accelerator

from mpsupernet import (
    SamSupernetForMaskGeneration,
    SamSupernetForSemanticSegmentation,
    SupernetTrainer,
    SupernetTrainingArguments,
    train_supernet,
)
from mpsupernet.data import (
    SYNTHETIC_SEMANTIC_ID2LABEL,
    SemanticSegmentationPreprocessor,
    collate_fn,
    make_synthetic_segmentation_dataset,
    make_synthetic_semantic_dataset_dict,
)
from mpsupernet.pretrained import load_sam
from mpsupernet.training import supernet_training_step

from conftest import TEST_SAM


@pytest.fixture(scope="module")
def sam():
    return load_sam(TEST_SAM)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_semantic_dataset_dict(6, 4, seed=0)


def make_model(sam):
    return SamSupernetForSemanticSegmentation.from_sam(sam, id2label=SYNTHETIC_SEMANTIC_ID2LABEL)


def trainable_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def arguments(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=2,
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        num_random_subnets=1,
        save_steps=1,
        logging_steps=1,
        report_to=[],
        seed=0,
    )
    return SupernetTrainingArguments(**{**settings, **overrides})


def test_sandwich_step_distils_class_logits_from_the_largest_subnet(sam, data):
    model = make_model(sam).train()
    preprocessor = SemanticSegmentationPreprocessor(model.config)
    batch = collate_fn([data["train"].with_transform(preprocessor)[index] for index in range(2)])
    model.calibrate_quantizers(batch["pixel_values"])
    archs = {"largest": model.largest_subnet(), "smallest": model.smallest_subnet()}
    output = supernet_training_step(model, batch, archs, accelerator=Accelerator(cpu=True))
    assert set(output.losses) == {"largest", "smallest"} and set(output.distillation_losses) == {"smallest"}
    with torch.no_grad(), model.using_subnet(archs["smallest"]):
        plain = model(**batch).loss
    assert output.losses["smallest"] == pytest.approx(float(plain + output.distillation_losses["smallest"]), rel=1e-4)
    # Every trainable parameter the class head leaves unused is frozen: all of them got a gradient.
    without_gradient = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not [n for n in without_gradient if "mask_decoder" in n]
    with pytest.raises(ValueError, match=r"lacks \['labels'\].*SemanticSegmentationPreprocessor"):
        supernet_training_step(model, {"pixel_values": batch["pixel_values"]}, archs, accelerator=Accelerator(cpu=True))


def test_accelerate_loop_trains_evaluates_and_resumes(sam, data, tmp_path):
    model = make_model(sam)
    summary = train_supernet(model, data["train"], data["validation"], args=arguments(tmp_path / "full"))
    uninterrupted = trainable_state(model)
    assert set(summary["mean_iou_after"]) == {"largest", "smallest"}
    assert all(0.0 <= value <= 1.0 for value in summary["mean_iou_after"].values())
    assert (tmp_path / "full" / "preprocessor_config.json").is_file()
    reloaded = SamSupernetForSemanticSegmentation.from_pretrained(tmp_path / "full")
    assert reloaded.config.id2label == SYNTHETIC_SEMANTIC_ID2LABEL

    model = make_model(sam)
    resumed = train_supernet(
        model, data["train"], args=arguments(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    )
    assert resumed["resumed_from_step"] == 1
    torch.testing.assert_close(trainable_state(model), uninterrupted, rtol=1e-5, atol=1e-6)


def test_trainer_trains_and_reports_class_miou(sam, data, tmp_path):
    model = make_model(sam)
    preprocessor = SemanticSegmentationPreprocessor(model.config)
    before = trainable_state(model)
    trainer = SupernetTrainer(
        model=model,
        args=arguments(tmp_path, save_strategy="no"),
        train_dataset=data["train"].with_transform(preprocessor),
        eval_dataset=data["validation"].with_transform(preprocessor),
    )
    trainer.train()
    after = trainable_state(model)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_mean_iou_largest"] <= 1.0


def test_a_dataset_of_the_other_task_is_refused_before_anything_changes(sam, data, tmp_path):
    promptable = SamSupernetForMaskGeneration.from_sam(sam)
    with pytest.raises(ValueError, match=r"`train_dataset` has the columns \['image', 'annotation'\]: a semantic"):
        train_supernet(promptable, data["train"], args=arguments(tmp_path / "a"))
    semantic = make_model(sam)
    with pytest.raises(ValueError, match=r"`eval_dataset` has the columns .*: per-object masks"):
        train_supernet(
            semantic, data["train"], make_synthetic_segmentation_dataset(2, image_size=128), args=arguments(tmp_path / "b")
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
