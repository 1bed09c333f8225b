"""Supernet training: the sandwich sampler, the progressive schedule, the Trainer and the Accelerate loop."""

import copy
import json
import logging
import pathlib
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from huggingface_hub import ModelCard
from transformers import TrainingArguments

import kill_points
from conftest import TEST_SAM, make_tiny_sam
from kill_points import every_kill_point
from mpsupernet import SamSupernetConfig, SamSupernetForMaskGeneration
from mpsupernet.data import (
    SYNTHETIC_DATASET_NAME,
    SamSegmentationPreprocessor,
    collate_fn,
    make_synthetic_segmentation_dataset,
)
from mpsupernet.pretrained import load_sam
from mpsupernet.quantization import LsqQuantizer
from mpsupernet.training import (
    QUANTIZER_LR_SCALE,
    FixedArchitectureSampler,
    ProgressiveBitsSchedule,
    SandwichSampler,
    SUPERNET_OPTIONS,
    SubnetLossWindow,
    SupernetTrainer,
    SupernetTrainingArguments,
    check_distributed_support,
    check_training_batch,
    quantizer_parameter_groups,
    sam_loss,
    split_quantizer_groups,
    supernet_training_step,
    train_supernet,
)
from mpsupernet.training import loop as training_loop
from mpsupernet.training.resume import incompleteness, mark_complete, resolve_checkpoint


SCHEDULE = [[0.0, [8, 6, 4]], [0.25, [3]], [0.5, [2]]]


@pytest.fixture(scope="module")
def pretrained_sam():
    """The tests' shipped pretrained SAM (`TEST_SAM`) when the package ships it, a tiny random one otherwise: the tests
    that training lowers the loss run on it. The mechanics (resuming, accumulation, the sandwich) run on the tiny one."""
    try:
        return load_sam(TEST_SAM)
    except FileNotFoundError:
        return make_tiny_sam()


@pytest.fixture(scope="module")
def sam():
    return make_tiny_sam()


def make_supernet(sam, **overrides):
    torch.manual_seed(0)
    return SamSupernetForMaskGeneration.from_sam(copy.deepcopy(sam), **overrides)


@pytest.fixture(scope="module")
def train_data():
    return make_synthetic_segmentation_dataset(6, image_size=64, seed=3)


def make_preprocessor(model):
    return SamSegmentationPreprocessor(model.config, prompts_per_image=2, seed=0)


def fixed_batch(model, dataset):
    preprocessor = make_preprocessor(model)
    processed = dataset.with_transform(preprocessor)
    return collate_fn([processed[i] for i in range(4)])


@torch.no_grad()
def subnet_losses(model, batch):
    """SAM loss of the largest and smallest subnets on one batch."""
    model.eval()
    losses = {}
    for name, arch in (("largest", model.largest_subnet()), ("smallest", model.smallest_subnet())):
        model.set_subnet(arch)
        outputs = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
        losses[name] = sam_loss(outputs.pred_masks, outputs.iou_scores, batch["ground_truth_masks"]).loss.item()
    return losses


def kept_bits(arch, sampler):
    """The weight and activation bit-widths of the blocks a subnet keeps (skipped blocks carry placeholders)."""
    kept = [block in arch.kept_blocks for block in sampler.search_space.layer_blocks]
    weight = {bits for bits, keep in zip(arch.weight_bits, kept) if keep}
    activation = {bits for bits, keep in zip(arch.activation_bits, kept) if keep}
    return weight, activation


def trainable_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# --- sampling and the progressive schedule ---------------------------------------------------------------------------
def test_progressive_schedule_enables_bits_over_training():
    config = SamSupernetConfig(progressive_bits_schedule=SCHEDULE)
    schedule = ProgressiveBitsSchedule(config)
    assert schedule.enabled_bits(0.0) == (8, 6, 4)
    assert schedule.enabled_bits(0.2) == (8, 6, 4)
    assert schedule.enabled_bits(0.25) == (8, 6, 4, 3)
    assert schedule.enabled_bits(1.0) == (8, 6, 4, 3, 2)
    assert schedule.weight_bit_choices(0.3) == (8, 6, 4, 3)
    assert schedule.activation_bit_choices(0.3) == (8, 6, 4)  # 3 bits is no activation choice
    with pytest.raises(ValueError, match="fraction must be in"):
        schedule.enabled_bits(1.5)


def test_sandwich_sampler_is_deterministic_and_follows_the_schedule():
    config = SamSupernetConfig(progressive_bits_schedule=SCHEDULE)
    sampler = SandwichSampler(config, num_random_subnets=2, seed=7)
    first = sampler.sample(5, 0.1)
    assert list(first) == ["largest", "smallest", "random_0", "random_1"]
    # A fresh sampler (a resumed run, another rank) draws the same subnets; other steps and seeds draw others.
    assert SandwichSampler(config, num_random_subnets=2, seed=7).sample(5, 0.1) == first
    assert sampler.sample(6, 0.1) != first
    assert SandwichSampler(config, num_random_subnets=2, seed=8).sample(5, 0.1) != first

    assert kept_bits(first["largest"], sampler) == ({8}, {8})
    assert kept_bits(first["smallest"], sampler) == ({4}, {4})  # 3 and 2 bits are not enabled yet
    for step in range(20):
        for arch in list(sampler.sample(step, 0.1).values())[2:]:
            weight, activation = kept_bits(arch, sampler)
            assert weight <= {8, 6, 4} and activation <= {8, 6, 4}
    late = sampler.sample(5, 0.9)
    assert kept_bits(late["smallest"], sampler) == ({2}, {4})
    assert late["smallest"].resolution == min(config.resolution_choices)


def test_newly_enabled_bits_start_from_the_next_higher_step_sizes(sam):
    model = make_supernet(
        sam, activation_bit_choices=[3, 4, 6, 8], progressive_bits_schedule=[[0.0, [8, 6, 4]], [0.5, [3]]]
    )
    quantizers = [m for m in model.modules() if isinstance(m, LsqQuantizer)]
    activation_quantizers = [q for q in quantizers if q.step_size.shape[1] == 1]
    with torch.no_grad():
        for number, quantizer in enumerate(activation_quantizers):
            quantizer.step_size[quantizer.bit_index(4)] = 0.1 + number
            if quantizer.offset is not None:
                quantizer.offset[quantizer.bit_index(4)] = -0.5 - number
            quantizer.initialized[quantizer.bit_index(4)] = True
    weight_quantizer = model.sam.vision_encoder.layers[0].mlp.lin1.weight_quantizer
    weight_quantizer.initialized[weight_quantizer.bit_index(3)] = False
    weight_steps_before = {id(q): q.step_size.detach().clone() for q in quantizers}

    schedule = ProgressiveBitsSchedule(model.config)
    assert schedule.initialize_new_bits(model, 0.4) == 0
    assert not any(bool(q.initialized[q.bit_index(3)]) for q in activation_quantizers)

    assert schedule.initialize_new_bits(model, 0.5) == len(activation_quantizers) + 1
    for quantizer in activation_quantizers + [weight_quantizer]:
        three, four = quantizer.bit_index(3), quantizer.bit_index(4)
        assert bool(quantizer.initialized[three])
        torch.testing.assert_close(quantizer.step_size[three], quantizer.step_size[four], rtol=0, atol=0)
        if quantizer.offset is not None:
            torch.testing.assert_close(quantizer.offset[three], quantizer.offset[four], rtol=0, atol=0)
    # Weight quantizers initialised from their weights at conversion keep their own 3-bit steps.
    other = model.sam.vision_encoder.layers[1].attn.qkv.weight_quantizer
    torch.testing.assert_close(other.step_size, weight_steps_before[id(other)], rtol=0, atol=0)

    # Exactly once: a later call, or a fresh schedule after resuming, copies nothing more.
    with torch.no_grad():
        activation_quantizers[0].step_size[activation_quantizers[0].bit_index(4)] = 5.0
    assert schedule.initialize_new_bits(model, 0.9) == 0
    assert ProgressiveBitsSchedule(model.config).initialize_new_bits(model, 0.9) == 0
    assert activation_quantizers[0].step_size[activation_quantizers[0].bit_index(3), 0].item() == pytest.approx(0.1)


def test_start_bits_calibrate_before_training_and_fsdp_refuses_late_copies(sam, train_data):
    model = make_supernet(
        sam, activation_bit_choices=[3, 4, 6, 8], progressive_bits_schedule=[[0.0, [8, 6, 4]], [0.5, [3]]]
    )
    schedule = ProgressiveBitsSchedule(model.config)
    activation_quantizers = [m for m in model.modules() if isinstance(m, LsqQuantizer) and m.step_size.shape[1] == 1]
    assert schedule.pending_copies(model) == len(activation_quantizers)
    schedule.calibrate_start_bits(model, fixed_batch(model, train_data)["pixel_values"])
    for quantizer in activation_quantizers:
        assert [bool(quantizer.initialized[quantizer.bit_index(b)]) for b in (8, 6, 4, 3)] == [True, True, True, False]
    assert model.active_subnet == model.full_precision_subnet()

    check_distributed_support(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), model, schedule)
    with pytest.raises(ValueError, match="cannot take"):
        check_distributed_support(SimpleNamespace(distributed_type=DistributedType.FSDP), model, schedule)
    schedule.initialize_new_bits(model, 0.5)
    assert schedule.pending_copies(model) == 0
    check_distributed_support(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), model, schedule)


@pytest.mark.parametrize(
    "distillation, multimask_output", [("largest", False), ("full_precision", True), (None, False)]
)
def test_sandwich_step_backpropagates_every_subnet_into_trainable_parameters(
    sam, train_data, distillation, multimask_output
):
    model = make_supernet(sam).train()
    archs = SandwichSampler(model.config, num_random_subnets=1, seed=0).sample(0, 0.0)
    output = supernet_training_step(
        model,
        fixed_batch(model, train_data),
        archs,
        accelerator=Accelerator(cpu=True),
        distillation=distillation,
        multimask_output=multimask_output,
    )
    assert list(output.losses) == ["largest", "smallest", "random_0"]
    students = {None: [], "largest": ["smallest", "random_0"], "full_precision": ["largest", "smallest", "random_0"]}
    assert list(output.distillation_losses) == students[distillation]
    assert torch.isfinite(output.total) and output.total > 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("sam.mask_decoder."))
    with pytest.raises(ValueError, match="first subnet must be named 'largest'"):
        supernet_training_step(
            model, fixed_batch(model, train_data), dict(reversed(archs.items())), accelerator=Accelerator(cpu=True)
        )
    with pytest.raises(ValueError, match="Unknown distillation teacher 'base'"):
        supernet_training_step(model, {}, archs, accelerator=Accelerator(cpu=True), distillation="base")


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_configurations_are_named(sam):
    with pytest.raises(ValueError, match="`lora_mode` is 'dual'"):
        make_supernet(sam, lora_mode="dual")
    with pytest.raises(ValueError, match="must start at fraction 0.0"):
        SamSupernetConfig(progressive_bits_schedule=[[0.5, [8]]])
    with pytest.raises(ValueError, match="not of the form"):
        SamSupernetConfig(progressive_bits_schedule=[[0.0, 8]])
    config = SamSupernetConfig(progressive_bits_schedule=[[0.0, [2, 3]], [0.5, [8, 6, 4]]])
    with pytest.raises(ValueError, match="no activation bit-width"):
        SandwichSampler(config)
    config = SamSupernetConfig()
    config.progressive_bits_schedule = [[0.0, [8]], [0.0, [4]]]  # edited after the config checked it
    with pytest.raises(ValueError, match="larger than the one before"):
        ProgressiveBitsSchedule(config)
    with pytest.raises(ValueError, match="num_random_subnets"):
        SandwichSampler(SamSupernetConfig(), num_random_subnets=-1)


def loop_arguments(output_dir, **fields) -> SupernetTrainingArguments:
    """`train_supernet`'s arguments in these tests: no checkpoints, no tracker, a 5% warm-up and a log line every 10
    steps, unless `fields` say otherwise."""
    defaults = dict(save_strategy="no", report_to="none", warmup_steps=0.05, logging_steps=10)
    return SupernetTrainingArguments(output_dir=str(output_dir), **{**defaults, **fields})


def test_bad_datasets_and_batches_are_named(sam, train_data, tmp_path):
    model = make_supernet(sam)
    common = dict(max_steps=1, learning_rate=1e-3, per_device_train_batch_size=2)
    args = loop_arguments(tmp_path, **common)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['masks'\]"):
        train_supernet(model, train_data.remove_columns("masks"), args=args)
    with pytest.raises(ValueError, match="already has a transform"):
        train_supernet(model, train_data.with_transform(make_preprocessor(model)), args=args)
    with pytest.raises(ValueError, match="`max_steps` must be a positive integer"):
        train_supernet(model, train_data, args=loop_arguments(tmp_path, **{**common, "max_steps": 0}))
    with pytest.raises(ValueError, match=r"'.*nowhere' is not a complete checkpoint: it is not a folder\. Give a complete"):
        resume = loop_arguments(tmp_path, **common, resume_from_checkpoint=str(tmp_path / "nowhere"))
        train_supernet(model, train_data, args=resume)
    with pytest.raises(TypeError, match="SamSupernetForMaskGeneration"):
        SupernetTrainer(model=make_tiny_sam(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    batch = fixed_batch(model, train_data)
    with pytest.raises(ValueError, match=r"lacks \['ground_truth_masks'\]"):
        check_training_batch({k: v for k, v in batch.items() if k != "ground_truth_masks"})
    with pytest.raises(ValueError, match="input_boxes or input_points"):
        check_training_batch({k: v for k, v in batch.items() if k != "input_boxes"})


# --- the Trainer --------------------------------------------------------------------------------------------------
def trainer_arguments(output_dir, **overrides):
    arguments = dict(
        output_dir=str(output_dir),
        max_steps=5,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=3e-4,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    arguments.update(overrides)
    return TrainingArguments(**arguments)


def test_trainer_lowers_the_loss_and_trains_only_the_supernet_parameters(pretrained_sam, train_data, tmp_path):
    model = make_supernet(pretrained_sam)
    batch = fixed_batch(model, train_data)
    before_losses = subnet_losses(model, batch)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = SupernetTrainer(
        model=model,
        args=trainer_arguments(tmp_path),
        train_dataset=train_data.with_transform(make_preprocessor(model)),
        eval_dataset=train_data.select(range(4)).with_transform(make_preprocessor(model)),
    )
    trainer.train()
    after_losses = subnet_losses(model, batch)
    assert after_losses["largest"] < before_losses["largest"]
    assert after_losses["smallest"] < before_losses["smallest"]

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"loss/largest", "loss/smallest", "loss/random_0", "loss/random_1"} <= set(logged[0])
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_mean_iou_largest"] <= 1.0 and 0.0 <= metrics["eval_mean_iou_smallest"] <= 1.0

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for name in before:
        trainable = "lora_" in name or "quantizer." in name or name.startswith("sam.mask_decoder.")
        if not trainable:
            assert name not in changed, f"frozen base weight {name} changed"
    assert any("lora_B" in name for name in changed)
    assert any("weight_quantizer.step_size" in name for name in changed)
    assert any("input_quantizer" in name for name in changed)
    assert any(name.startswith("sam.mask_decoder.") for name in changed)
    assert not any("quantizer." in name for name in trainer.get_decay_parameter_names(model))
    # The quantizers learn in their own groups, at a scaled learning rate; every trainable parameter is optimized.
    quantizer_ids = {id(p) for name, p in model.named_parameters() if "quantizer." in name}
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, optimized)) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    for group in trainer.optimizer.param_groups:
        in_group = {id(p) for p in group["params"]}
        expected = 3e-4 * QUANTIZER_LR_SCALE if in_group <= quantizer_ids else 3e-4
        assert not (in_group & quantizer_ids) or in_group <= quantizer_ids
        assert group["initial_lr"] == pytest.approx(expected)


def test_trainer_draws_new_prompts_every_epoch(sam, train_data, tmp_path):
    model = make_supernet(sam)
    preprocessor = make_preprocessor(model)
    epochs_seen = []
    original_call = SamSegmentationPreprocessor.__call__

    def recording_call(self, examples):
        epochs_seen.append(self.epoch)
        return original_call(self, examples)

    # 6 examples in batches of 2: 3 steps per epoch, so 7 steps start a third epoch.
    trainer = SupernetTrainer(
        model=model,
        args=trainer_arguments(tmp_path, max_steps=7),
        train_dataset=train_data.with_transform(preprocessor),
        num_random_subnets=1,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SamSegmentationPreprocessor, "__call__", recording_call)
        trainer.train()
    assert sorted(set(epochs_seen)) == [0, 1, 2] and preprocessor.epoch == 2


def test_trainer_resumes_from_its_checkpoint(sam, train_data, tmp_path):
    def run(output_dir, resume=None):
        model = make_supernet(sam)
        trainer = SupernetTrainer(
            model=model,
            args=trainer_arguments(output_dir, max_steps=2, save_strategy="steps", save_steps=1, logging_steps=2),
            num_random_subnets=1,
            train_dataset=train_data.with_transform(make_preprocessor(model)),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainable_state(model)

    uninterrupted = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-1"))
    torch.testing.assert_close(resumed, uninterrupted, rtol=1e-5, atol=1e-6)


# --- the Accelerate loop ------------------------------------------------------------------------------------------
def test_accelerate_loop_lowers_the_loss_and_saves_the_supernet(pretrained_sam, train_data, tmp_path):
    model = make_supernet(pretrained_sam)
    batch = fixed_batch(model, train_data)
    before_losses = subnet_losses(model, batch)
    summary = train_supernet(
        model,
        train_data,
        train_data.select(range(2)),
        args=loop_arguments(
            tmp_path, max_steps=5, learning_rate=3e-4, per_device_train_batch_size=2, per_device_eval_batch_size=2,
            num_random_subnets=1, logging_steps=3, warmup_steps=0.4,
        ),  # fmt: skip
        preprocessor=make_preprocessor(model),
    )
    after_losses = subnet_losses(model, batch)
    assert after_losses["largest"] < before_losses["largest"]
    assert after_losses["smallest"] < before_losses["smallest"]
    assert summary["steps"] == 5 and [entry["step"] for entry in summary["log_history"]] == [3, 5]
    # 2 warm-up steps (0, 1.5e-4), then linear decay over the other 3: steps 3 and 5 ran at 3e-4 and 1e-4.
    assert [entry["learning_rate"] for entry in summary["log_history"]] == pytest.approx([3e-4, 1e-4])
    assert set(summary["final_losses"]) == {"largest", "smallest", "random_0"}
    assert set(summary["mean_iou_after"]) == {"largest", "smallest"}

    reloaded = SamSupernetForMaskGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(trainable_state(reloaded), trainable_state(model), rtol=0, atol=0)
    # Provenance for the cards: the data's name, and the base model's (the shipped SAM's folder).
    assert reloaded.config.training_dataset == SYNTHETIC_DATASET_NAME
    assert reloaded.config.base_model_name_or_path == TEST_SAM


def test_fixed_architecture_trains_that_architecture_alone(sam, train_data, tmp_path):
    model = make_supernet(sam)  # multiplex adapters: one per weight bit-width
    space = model.search_space
    arch = space.uniform(96, 3, 3, 128, 4, 8)  # W4A8, narrow, one block dropped
    before = trainable_state(model)
    summary = train_supernet(
        model,
        train_data,
        args=loop_arguments(
            tmp_path, max_steps=3, learning_rate=1e-3, warmup_steps=0, per_device_train_batch_size=2,
            fixed_architecture=arch.to_dict(), distillation=None,
        ),  # fmt: skip
        preprocessor=make_preprocessor(model),
    )
    assert set(summary["final_losses"]) == {"fixed"}
    after = trainable_state(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    four_bits = model.config.weight_bit_choices.index(4)
    block0 = "sam.vision_encoder.layers.0.mlp.lin1."
    # Only the 4-bit adapter trains, and the MLP units beyond the 128 kept get no gradient.
    assert f"{block0}lora_B" in changed and f"{block0}lora_A" in changed
    lora_b_change = (after[f"{block0}lora_B"] - before[f"{block0}lora_B"]).abs().sum(dim=(2,))
    assert lora_b_change[four_bits, :128].sum() > 0 and lora_b_change[four_bits, 128:].sum() == 0
    assert torch.equal(lora_b_change[[i for i in range(len(lora_b_change)) if i != four_bits]].sum(), torch.tensor(0.0))
    skipped = f"sam.vision_encoder.layers.{space.skipped_blocks(3)[0]}.mlp.lin1.lora_B"
    assert skipped not in changed  # the dropped block never runs
    with pytest.raises(ValueError, match=r"no largest subnet to distil from; set `distillation` to None"):
        SupernetTrainingArguments(output_dir=str(tmp_path), fixed_architecture=arch.to_dict())
    with pytest.raises(ValueError, match=r"Resolution 80 is not in the search space"):
        FixedArchitectureSampler(model.config, {**arch.to_dict(), "resolution": 80})


def test_accelerate_loop_resumes_with_the_same_subnets_and_parameters(sam, train_data, tmp_path, monkeypatch):
    drawn = []
    sample = SandwichSampler.sample

    def recording_sample(self, step, fraction):
        archs = sample(self, step, fraction)
        drawn.append((step, archs))
        return archs

    monkeypatch.setattr(SandwichSampler, "sample", recording_sample)
    # 6 examples in batches of 2 (3 per epoch), 2 micro-batches per step: the resumed step skips 2 batches of the
    # first epoch and crosses into the second.
    common = dict(
        max_steps=2, learning_rate=3e-3, per_device_train_batch_size=2, num_random_subnets=1,
        gradient_accumulation_steps=2, save_strategy="steps", save_steps=1,
    )  # fmt: skip
    model = make_supernet(sam)
    full = loop_arguments(tmp_path / "full", **common)
    train_supernet(model, train_data, args=full, preprocessor=make_preprocessor(model))
    uninterrupted, uninterrupted_draws = trainable_state(model), dict(drawn)

    drawn.clear()
    model = make_supernet(sam)
    summary = train_supernet(
        model,
        train_data,
        args=loop_arguments(
            tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"), **common
        ),
        preprocessor=make_preprocessor(model),
    )
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    assert dict(drawn) == {1: uninterrupted_draws[1]}
    torch.testing.assert_close(trainable_state(model), uninterrupted, rtol=1e-5, atol=1e-6)


def calibrated_supernet(sam, train_data):
    """A supernet whose quantizers are initialised on a fixed batch, so that runs with other batch sizes compare."""
    model = make_supernet(sam)
    sampler = SandwichSampler(model.config)
    sampler.schedule.calibrate_start_bits(model, fixed_batch(model, train_data)["pixel_values"])
    return model


PER_TENSOR_QUANTIZERS = ("input_quantizer", "query_quantizer", "key_quantizer", "value_quantizer", "probs_quantizer")


def batch_size_free(state):
    """Leaves out the activation quantizers' step sizes, whose LSQ gradient scale `1 / sqrt(N * q_max)` counts the
    elements `N` of the whole micro-batch: their gradient changes with the micro-batch size, by design of LSQ."""
    return {
        name: value
        for name, value in state.items()
        if not (name.endswith("step_size") and any(kind in name for kind in PER_TENSOR_QUANTIZERS))
    }


def sgd(parameters, lr, weight_decay=0.0):
    """Plain SGD in place of AdamW: Adam's step is nearly scale-free, so it would hide a wrongly scaled gradient."""
    return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay)


def test_gradient_accumulation_and_checkpointing_leave_the_gradient_unchanged(sam, train_data, tmp_path, monkeypatch):
    monkeypatch.setattr(training_loop.torch.optim, "AdamW", sgd)

    def run(name, batch_size, accumulation, checkpointing=False):
        model = calibrated_supernet(sam, train_data)
        args = loop_arguments(
            tmp_path / name, max_steps=1, learning_rate=1.0, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, activation_checkpointing=checkpointing, num_random_subnets=1,
            max_grad_norm=None,
        )  # fmt: skip
        train_supernet(model, train_data, args=args, preprocessor=make_preprocessor(model))
        return trainable_state(model)

    one_batch = run("one_batch", batch_size=2, accumulation=1)
    torch.testing.assert_close(run("checkpointed", 2, 1, checkpointing=True), one_batch, rtol=1e-4, atol=1e-6)
    accumulated = run("accumulated", batch_size=1, accumulation=2)
    torch.testing.assert_close(batch_size_free(accumulated), batch_size_free(one_batch), rtol=1e-4, atol=1e-6)


def test_trainer_gradient_accumulation_leaves_the_gradient_unchanged(sam, train_data, tmp_path):
    def run(name, batch_size, accumulation):
        model = calibrated_supernet(sam, train_data)
        arguments = trainer_arguments(
            tmp_path / name, max_steps=1, learning_rate=1.0, max_grad_norm=0.0,
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        )  # fmt: skip
        trainable = [p for p in model.parameters() if p.requires_grad]
        trainer = SupernetTrainer(
            model=model, args=arguments, num_random_subnets=1, optimizers=(sgd(trainable, lr=1.0), None),
            train_dataset=train_data.with_transform(make_preprocessor(model)),
        )  # fmt: skip
        trainer.train()
        return trainable_state(model)

    accumulated, one_batch = run("accumulated", 1, 2), run("one_batch", 2, 1)
    torch.testing.assert_close(batch_size_free(accumulated), batch_size_free(one_batch), rtol=1e-4, atol=1e-6)


# --- one set of arguments and policies for both paths ---------------------------------------------------------------
def test_train_supernet_takes_one_arguments_object_and_refuses_what_it_cannot_honour(sam, train_data, tmp_path):
    model = make_supernet(sam)
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_dir'"):
        train_supernet(model, train_data, output_dir="x", max_steps=1, learning_rate=1.0)
    with pytest.raises(ValueError, match="without weight decay"):
        train_supernet(model, train_data, args=loop_arguments(tmp_path, max_steps=1, weight_decay=0.1))


def test_trainer_and_loop_share_options_and_quantizer_groups(sam, train_data, tmp_path):
    model = make_supernet(sam)
    args = SupernetTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=2e-3, weight_decay=0.1,
        num_random_subnets=3, distillation_kind="mse", quantizer_lr_scale=0.5,
    )  # fmt: skip
    assert SUPERNET_OPTIONS == (
        "num_random_subnets", "sandwich_seed", "distillation", "distillation_kind", "distillation_weight",
        "multimask_output", "quantizer_lr_scale", "fixed_architecture",
    )  # fmt: skip
    assert not args.remove_unused_columns and args.ddp_find_unused_parameters
    trainer = SupernetTrainer(model=model, args=args, num_random_subnets=1)
    # A keyword option overrides the arguments; the rest of them are kept.
    assert trainer.args.num_random_subnets == 1 and trainer.args.distillation_kind == "mse"
    assert len(trainer.sampler.sample(0, 0.0)) == 3 and args.num_random_subnets == 3
    plain = SupernetTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    assert isinstance(plain.args, SupernetTrainingArguments) and plain.args.distillation == "largest"
    assert plain.args.quantizer_lr_scale == QUANTIZER_LR_SCALE and not plain.args.remove_unused_columns

    # The same parameters learn at the same rates in both paths (the Trainer adds a no-decay split).
    def rates(groups):
        return {id(p): group["lr"] for group in groups for p in group["params"]}

    trainer_rates = rates(trainer.create_optimizer().param_groups)
    loop_rates = rates(quantizer_parameter_groups(model, 2e-3, 0.5))
    assert trainer_rates == loop_rates
    quantizers = {id(p) for name, p in model.named_parameters() if p.requires_grad and "quantizer." in name}
    assert quantizers and {i for i, lr in loop_rates.items() if lr == pytest.approx(1e-3)} == quantizers
    assert len(loop_rates) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown distillation|distillation"):
        SupernetTrainingArguments(output_dir=str(tmp_path), report_to="none", distillation="smallest")


def test_split_quantizer_groups_keeps_settings_and_drops_empty_groups():
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(2, 2)
    model.input_quantizer = torch.nn.Module()
    model.input_quantizer.step_size = torch.nn.Parameter(torch.ones(1))
    groups = [
        {"params": [model.layer.weight, model.input_quantizer.step_size], "lr": 0.1, "weight_decay": 0.5},
        {"params": [model.layer.bias], "lr": 0.1, "weight_decay": 0.0},
    ]
    split = split_quantizer_groups(groups, model, quantizer_lr_scale=0.01)
    assert [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in split] == [
        ([id(model.layer.weight)], 0.1, 0.5),
        ([id(model.layer.bias)], 0.1, 0.0),
        ([id(model.input_quantizer.step_size)], pytest.approx(0.001), 0.5),
    ]
    assert len(groups[0]["params"]) == 2  # the groups given are left as they were
    with pytest.raises(ValueError, match="`quantizer_lr_scale` must be non-negative, got -1"):
        split_quantizer_groups(groups, model, -1)


def test_subnet_loss_window_averages_since_the_last_pop():
    window = SubnetLossWindow()
    assert window.pop_means(Accelerator(cpu=True)) == {}
    window.add({"largest": torch.tensor(1.0), "smallest": torch.tensor(2.0)})
    window.add({"largest": torch.tensor(2.0), "smallest": torch.tensor(4.12345)})
    assert len(window) == 2
    assert window.pop_means(Accelerator(cpu=True)) == {"largest": 1.5, "smallest": 3.0617}
    assert len(window) == 0 and window.pop_means(Accelerator(cpu=True)) == {}


# --- checkpoints: complete or ignored, and nothing unpickled ----------------------------------------------------------
class Payload:
    """Unpickling this creates `path`: a stand-in for code a planted checkpoint file would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def loop_run(sam, train_data, output_dir, model=None, **overrides):
    model = model or make_supernet(sam)
    arguments = dict(
        max_steps=2, learning_rate=3e-3, per_device_train_batch_size=2, num_random_subnets=1, save_strategy="steps",
        save_steps=1,
    )  # fmt: skip
    args = loop_arguments(output_dir, **{**arguments, **overrides})
    return train_supernet(model, train_data, args=args, preprocessor=make_preprocessor(model))


@pytest.fixture(scope="module")
def loop_checkpoints(sam, train_data, tmp_path_factory):
    """An output folder of the Accelerate loop with complete checkpoints after steps 1 and 2."""
    output_dir = tmp_path_factory.mktemp("loop")
    loop_run(sam, train_data, output_dir)
    assert {p.name for p in output_dir.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    return output_dir


def test_loop_checkpoints_hold_json_state_and_no_pickled_objects(loop_checkpoints):
    checkpoint = loop_checkpoints / "checkpoint-2"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "training_state.json" in names and "checkpoint_complete.json" in names
    assert not [name for name in names if name.startswith("custom_checkpoint")]
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["step"] == 2 and state["sampler"] == {"seed": 42, "num_random_subnets": 1}  # TrainingArguments.seed
    assert state["scheduler"]["last_epoch"] == 2
    assert incompleteness(checkpoint) is None


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_resuming_runs_no_code_from_a_planted_pickle(sam, train_data, loop_checkpoints, tmp_path, planted):
    output_dir = tmp_path / "run"
    shutil.copytree(loop_checkpoints, output_dir)
    checkpoint = output_dir / "checkpoint-1"
    marker = tmp_path / "code-ran"
    torch.save(Payload(marker), checkpoint / planted)
    mark_complete(checkpoint, 1)  # the attacker rewrites the completion marker too
    if planted == "optimizer.bin":
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            loop_run(sam, train_data, output_dir, resume_from_checkpoint=checkpoint)
    elif planted.startswith("custom_checkpoint"):
        with pytest.raises(ValueError, match=r"checkpoint-1 holds pickled custom states \['custom_checkpoint_0.pkl'\], which train_supernet never writes and will not unpickle"):
            loop_run(sam, train_data, output_dir, resume_from_checkpoint=checkpoint)
    else:
        assert loop_run(sam, train_data, output_dir, resume_from_checkpoint=checkpoint)["resumed_from_step"] == 1
    assert not marker.exists()


def test_trainer_resuming_runs_no_code_from_a_planted_pickle(sam, train_data, tmp_path):
    model = make_supernet(sam)
    args = trainer_arguments(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    train_dataset = train_data.with_transform(make_preprocessor(model))
    trainer = SupernetTrainer(model=model, args=args, num_random_subnets=1, train_dataset=train_dataset)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert incompleteness(checkpoint) is None
    marker = tmp_path / "code-ran"
    torch.save(Payload(marker), checkpoint / "optimizer.pt")
    mark_complete(checkpoint, 1)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def _damage(output_dir):
    """checkpoint-3: a save killed midway (no marker); checkpoint-2: a file changed after its save."""
    partial = output_dir / "checkpoint-3"
    partial.mkdir()
    shutil.copy(output_dir / "checkpoint-2" / "model.safetensors", partial / "model.safetensors")
    with open(output_dir / "checkpoint-2" / "optimizer.bin", "ab") as handle:
        handle.write(b"\0")


def test_loop_resumes_from_the_newest_complete_checkpoint_and_names_the_skipped(sam, train_data, loop_checkpoints, tmp_path, caplog):
    output_dir = tmp_path / "run"
    shutil.copytree(loop_checkpoints, output_dir)
    _damage(output_dir)
    with caplog.at_level(logging.WARNING, logger="mpsupernet.training.resume"):
        summary = loop_run(sam, train_data, output_dir, resume_from_checkpoint=True)
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    assert (
        f"Not resuming from {output_dir / 'checkpoint-3'}: it has no checkpoint_complete.json: its save was "
        "interrupted, or an older mpsupernet wrote it." in caplog.text
    )
    assert (
        f"Not resuming from {output_dir / 'checkpoint-2'}: optimizer.bin changed after the checkpoint was saved"
        in caplog.text
    )
    with pytest.raises(ValueError, match=r"'.*checkpoint-3' is not a complete checkpoint: it has no checkpoint_complete.json"):
        loop_run(sam, train_data, output_dir, resume_from_checkpoint=output_dir / "checkpoint-3")
    shutil.rmtree(output_dir / "checkpoint-1")
    shutil.rmtree(output_dir / "checkpoint-2")  # the re-run above saved a complete one again
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True, but .* holds no complete 'checkpoint-<step>' folder; skipped: checkpoint-3 \(it has no"):
        loop_run(sam, train_data, output_dir, resume_from_checkpoint=True)


def test_loop_refuses_a_checkpoint_of_another_sampler(sam, train_data, loop_checkpoints):
    with pytest.raises(ValueError, match=r"was trained with the sandwich sampler \{'seed': 42, 'num_random_subnets': 1\}, this run has \{'seed': 42, 'num_random_subnets': 2\}"):
        loop_run(sam, train_data, loop_checkpoints, resume_from_checkpoint=loop_checkpoints / "checkpoint-1", num_random_subnets=2)


def test_trainer_resumes_from_the_newest_complete_checkpoint(sam, train_data, tmp_path, caplog):
    def trainer(output_dir, max_steps):
        model = make_supernet(sam)
        args = trainer_arguments(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=1, save_total_limit=2)
        train_dataset = train_data.with_transform(make_preprocessor(model))
        return SupernetTrainer(model=model, args=args, num_random_subnets=1, train_dataset=train_dataset)

    trainer(tmp_path, 2).train()
    assert all(incompleteness(tmp_path / f"checkpoint-{step}") is None for step in (1, 2))
    (tmp_path / "checkpoint-2" / "checkpoint_complete.json").unlink()  # as if the save of step 2 was killed
    resumed = trainer(tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="mpsupernet.training.resume"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Not resuming from {tmp_path / 'checkpoint-2'}: it has no checkpoint_complete.json" in caplog.text
    assert resumed.state.global_step == 2 and incompleteness(tmp_path / "checkpoint-2") is None


@pytest.mark.parametrize("stride", [4, pytest.param(1, marks=pytest.mark.slow)])
def test_a_training_checkpoint_survives_a_kill_at_every_write(sam, train_data, tmp_path, stride):
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    loop_run(sam, train_data, pristine, max_steps=1)  # the old state: a complete checkpoint-1

    def write():  # resume, train step 2 and save checkpoint-2; killed only while the checkpoint is written
        kill_points.ARMED = False
        save = training_loop._AccelerateLoop.save_checkpoint

        def armed(loop):
            kill_points.ARMED = True
            save(loop)
            kill_points.ARMED = False

        training_loop._AccelerateLoop.save_checkpoint = armed
        loop_run(sam, train_data, work, resume_from_checkpoint=True, max_steps=2)

    def reset():
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)

    resumed = {}

    def check(n, finished):
        chosen = resolve_checkpoint(True, work)  # never a half-written checkpoint-2
        assert chosen.name in ("checkpoint-1", "checkpoint-2") and (chosen.name == "checkpoint-2" or not finished)
        assert json.loads((chosen / "training_state.json").read_text())["step"] == int(chosen.name.split("-")[1])
        if chosen.name not in resumed:  # and it really resumes
            summary = loop_run(sam, train_data, tmp_path / f"resumed-{n}", resume_from_checkpoint=chosen, max_steps=2)
            resumed[chosen.name] = summary["resumed_from_step"]

    every_kill_point(write, reset, check, stride)
    assert resumed == {"checkpoint-1": 1, "checkpoint-2": 2}


def test_a_nan_in_the_first_training_batch_is_refused_naming_the_quantizer(sam, train_data):
    model = make_supernet(sam)
    pixel_values = fixed_batch(model, train_data)["pixel_values"].clone()
    pixel_values[0, 1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"step size of sam\.vision_encoder\.patch_embed\.projection\.input_quantizer would be set from a tensor with non-finite values"):
        SandwichSampler(model.config).schedule.calibrate_start_bits(model, pixel_values)


def test_training_warns_about_a_collapsed_step(sam, train_data, tmp_path, caplog):
    model = make_supernet(sam)
    SandwichSampler(model.config).schedule.calibrate_start_bits(model, fixed_batch(model, train_data)["pixel_values"])
    quantizer = model.sam.vision_encoder.layers[1].mlp.lin2.input_quantizer
    with torch.no_grad():
        quantizer.step_size[quantizer.bit_index(8)] = 0.0  # collapsed
    with caplog.at_level(logging.WARNING, logger="mpsupernet.training.policies"):
        loop_run(sam, train_data, tmp_path, model=model, max_steps=1, learning_rate=1e-4, save_strategy="no")
    assert "Step 1: 1 activation step size(s) at their floor or not finite: sam.vision_encoder.layers.1.mlp.lin2.input_quantizer (8-bit)." in caplog.text


def test_trainer_refuses_raw_datasets_metrics_it_would_ignore_and_torch_compile(sam, train_data, tmp_path):
    model = make_supernet(sam)
    args = trainer_arguments(tmp_path)
    with pytest.raises(ValueError, match=r"`train_dataset` has no preprocessing transform \(its columns are \['image'"):
        SupernetTrainer(model=model, args=args, train_dataset=train_data)
    with pytest.raises(ValueError, match=r"`eval_dataset\['val'\]` has no preprocessing transform"):
        SupernetTrainer(model=model, args=args, eval_dataset={"val": train_data})
    with pytest.raises(ValueError, match="SupernetTrainer does not call `compute_metrics`"):
        SupernetTrainer(model=model, args=args, compute_metrics=lambda prediction: {})
    with pytest.raises(ValueError, match=r"`torch_compile=True` is refused: every training step samples other"):
        SupernetTrainer(model=model, args=trainer_arguments(tmp_path, torch_compile=True))
    with pytest.raises(ValueError, match=r"`torch_compile=True` is refused"):
        train_supernet(model, train_data, args=SupernetTrainingArguments(output_dir=str(tmp_path), torch_compile=True))


def test_trainer_records_the_data_and_pushes_mpsupernets_card(pretrained_sam, train_data, tmp_path, local_hub):
    model = make_supernet(pretrained_sam)
    assert model.config.base_model_name_or_path == TEST_SAM and model.config.training_dataset is None
    trainer = SupernetTrainer(
        model=model,
        args=trainer_arguments(
            tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, hub_model_id="local-user/trained-supernet"
        ),
        train_dataset=train_data.with_transform(make_preprocessor(model)),
        eval_dataset=train_data.select(range(2)).with_transform(make_preprocessor(model)),
    )
    trainer.train()
    assert model.config.training_dataset == SYNTHETIC_DATASET_NAME
    trainer.push_to_hub()
    card = ModelCard.load("local-user/trained-supernet")
    assert card.data.library_name == "mpsupernet" and card.data.base_model == TEST_SAM
    assert card.data.base_model_relation == "finetune"
    full_precision = model.bitops_report(model.full_precision_subnet())
    assert card.data.bitops_full_precision == full_precision.total_bitops
    assert card.data.bitops_smallest == model.bitops_report(model.smallest_subnet()).total_bitops
    last_eval = [entry for entry in trainer.state.log_history if "eval_mean_iou_largest" in entry][-1]
    assert f"| `eval_mean_iou_largest` | {last_eval['eval_mean_iou_largest']:.4f} |" in card.text
    assert f"Trained on {SYNTHETIC_DATASET_NAME}, 2 sandwich steps." in card.text
    loaded = SamSupernetForMaskGeneration.from_pretrained("local-user/trained-supernet", cache_dir=tmp_path / "cache")
    assert loaded.config.training_dataset == SYNTHETIC_DATASET_NAME
