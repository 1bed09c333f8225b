"""`train_supernet`: supernet training in a plain Accelerate loop (one process, or DDP under `accelerate launch`).

It trains exactly what `SupernetTrainer` trains (the step is `supernet_training_step`), with checkpoints that
resume bit-for-bit: the step counter, model, optimizer, learning-rate schedule and RNG states are saved with
`Accelerator.save_state`, the sandwich of a step depends only on `(seed, step)`, and the data order and prompts of an
epoch only on `(seed, epoch)`.
"""

import copy
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    set_seed,
)
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..data.processing import SamSegmentationPreprocessor, collate_fn, remove_examples_without_masks
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from .sampling import (
    QUANTIZER_LR_SCALE,
    SandwichSampler,
    check_distillation,
    check_distributed_support,
    evaluate_subnets,
    quantizer_parameter_groups,
    supernet_training_step,
)


logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint"


class TrainingProgress:
    """The optimizer steps done so far; saved in every checkpoint through `Accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")


def _check_dataset(dataset, name: str, preprocessor: SamSegmentationPreprocessor) -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"`{name}` must be a `datasets.Dataset` in the standard schema (columns `image`, `masks`, `image_id`), "
            f"got {type(dataset).__name__}."
        )
    if dataset.format["type"] == "custom":
        raise ValueError(
            f"`{name}` already has a transform (`set_transform`/`with_transform`); train_supernet preprocesses the "
            "data itself. Pass the dataset in the standard schema without a transform, and your "
            "`SamSegmentationPreprocessor` as `preprocessor=`."
        )
    required = [preprocessor.image_column, preprocessor.masks_column]
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`{name}` lacks the column(s) {missing}; it has {dataset.column_names}. Convert a Hub dataset to the "
            "standard schema with `mpsupernet.data.from_coco_annotations`, `from_instance_mask_columns` or "
            "`from_semantic_maps`."
        )


def _resolve_checkpoint(resume_from_checkpoint: str | os.PathLike | bool, output_dir: Path) -> Path:
    if resume_from_checkpoint is True:
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but {output_dir} holds no '{CHECKPOINT_PREFIX}-<step>' folder."
            )
        return Path(last)
    path = Path(resume_from_checkpoint)
    # The scheduler and the TrainingProgress are the two objects registered for checkpointing.
    if not all((path / f"custom_checkpoint_{index}.pkl").is_file() for index in (0, 1)):
        raise ValueError(
            f"{str(path)!r} is not a checkpoint of train_supernet (a '{CHECKPOINT_PREFIX}-<step>' folder written with "
            "`save_steps`); give such a folder, or True for the last one in `output_dir`."
        )
    return path


def _micro_batches(accelerator: Accelerator, dataloader, preprocessor: SamSegmentationPreprocessor, start: int):
    """Endless micro-batches from position `start`; epoch `e` has the data order and prompts of `(seed, e)`."""
    epoch, skip = divmod(start, len(dataloader))
    while True:
        preprocessor.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch, skip = epoch + 1, 0


def train_supernet(
    model: SamSupernetForMaskGeneration,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    *,
    output_dir: str | os.PathLike,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    warmup_ratio: float = 0.05,
    num_random_subnets: int = 2,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    seed: int = 0,
    resume_from_checkpoint: str | os.PathLike | bool | None = None,
    save_steps: int | None = None,
    log_steps: int = 10,
    preprocessor: SamSegmentationPreprocessor | None = None,
    distillation: str | None = "largest",
    max_grad_norm: float | None = 1.0,
    quantizer_lr_scale: float = QUANTIZER_LR_SCALE,
) -> dict:
    """Trains a supernet with the sandwich rule in an Accelerate loop and saves it with `save_pretrained`.

    Run it in one process, or under `accelerate launch` (DDP with gloo on CPUs, NCCL on GPUs; see
    `examples/accelerate_configs/`). Each optimizer step trains the largest, the smallest and `num_random_subnets`
    random subnets on `gradient_accumulation_steps` micro-batches of `batch_size` examples per process, with
    in-place distillation, following the progressive bit-width schedule of the model's config; AdamW on the
    trainable parameters only (no weight decay: it would shrink quantizer step sizes), linear decay of the learning
    rate to zero, gradient clipping.

    Args:
        model (`SamSupernetForMaskGeneration`): the supernet to train (in place).
        train_dataset (`datasets.Dataset`): examples in the standard schema (`image`, `masks`, `image_id`; see
            `mpsupernet.data`), without a transform. Examples without a non-empty mask are removed first.
        eval_dataset (`datasets.Dataset`, *optional*): the same schema; if given, the mean mask IoU of the largest
            and the smallest subnets is measured before and after training.
        output_dir (`str` or `os.PathLike`): where checkpoints (`checkpoint-<step>`) and the trained supernet go.
        max_steps (`int`): optimizer steps to train in total (a resumed run continues up to it).
        learning_rate (`float`): peak learning rate.
        warmup_ratio (`float`, *optional*, defaults to 0.05): share of `max_steps` over which the learning rate rises
            linearly from 0 (as `TrainingArguments.warmup_ratio`); a freshly initialised optimizer at the full rate
            would first knock the pretrained mask decoder off its minimum.
        batch_size (`int`): examples per micro-batch and process.
        num_random_subnets (`int`, *optional*, defaults to 2): random subnets per step.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): micro-batches per optimizer step.
        mixed_precision (`str`, *optional*, defaults to `"no"`): `"no"`, `"bf16"` (GPUs) or `"fp16"`; overridden by
            `accelerate launch --mixed_precision`.
        gradient_checkpointing (`bool`, *optional*, defaults to `False`): recompute encoder blocks in backward.
        seed (`int`, *optional*, defaults to 0): seeds the subnets drawn, the data order and the prompts.
        resume_from_checkpoint (`str`, `os.PathLike` or `bool`, *optional*): a `checkpoint-<step>` folder to resume
            from, or `True` for the last one in `output_dir`; resuming needs the same arguments as the first run.
        save_steps (`int`, *optional*): save a checkpoint every this many optimizer steps.
        log_steps (`int`, *optional*, defaults to 10): log the mean per-subnet losses every this many steps.
        preprocessor (`SamSegmentationPreprocessor`, *optional*): how examples become prompts and targets; defaults
            to box prompts, 4 per image, seeded with `seed`. Evaluation uses a copy of it fixed at epoch 0.
        distillation (`str`, *optional*, defaults to `"largest"`): the distillation teacher, `"largest"`,
            `"full_precision"` or `None` (see `supernet_training_step`).
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient-norm clipping; `None` or 0 turns it off.
        quantizer_lr_scale (`float`, *optional*, defaults to `QUANTIZER_LR_SCALE`): the quantizers' step sizes and
            offsets learn at `learning_rate` times this (see `quantizer_parameter_groups`).

    Returns:
        `dict`: `steps` (optimizer steps reached), `resumed_from_step`, `seconds` (training time of this call),
        `final_losses` (each subnet's mean loss over the last logging window), `mean_iou_before` and
        `mean_iou_after` (`{"largest": ..., "smallest": ...}`, or `None` without `eval_dataset`), `log_history`
        (the logged losses) and `output_dir`.
    """
    if not isinstance(model, SamSupernetForMaskGeneration):
        raise TypeError(f"train_supernet trains a SamSupernetForMaskGeneration, got {type(model).__name__}.")
    for name, value in (
        ("max_steps", max_steps),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("log_steps", log_steps),
    ):
        _check_positive_int(name, value)
    _check_positive_int("save_steps", save_steps, allow_none=True)
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be positive, got {learning_rate!r}.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"`warmup_ratio` must be in [0, 1), got {warmup_ratio!r}.")
    output_dir = Path(output_dir)
    preprocessor = preprocessor or SamSegmentationPreprocessor(model.config, seed=seed)
    vision = model.config.vision_config
    if (preprocessor.image_size, preprocessor.patch_size) != (vision.image_size, vision.patch_size):
        raise ValueError(
            f"The preprocessor makes {preprocessor.image_size}-pixel inputs with {preprocessor.patch_size}-pixel "
            f"patches, but the model takes {vision.image_size} pixels with {vision.patch_size}-pixel patches."
        )
    _check_dataset(train_dataset, "train_dataset", preprocessor)
    if eval_dataset is not None:
        _check_dataset(eval_dataset, "eval_dataset", preprocessor)
    check_distillation(distillation)
    checkpoint = _resolve_checkpoint(resume_from_checkpoint, output_dir) if resume_from_checkpoint else None
    sampler = SandwichSampler(model.config, num_random_subnets=num_random_subnets, seed=seed)

    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        # Optimizer steps are counted here, not per epoch: an epoch ending mid-accumulation must not force a step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(seed)

    with accelerator.main_process_first():
        train_data = remove_examples_without_masks(train_dataset, masks_column=preprocessor.masks_column)
        eval_data = (
            remove_examples_without_masks(eval_dataset, masks_column=preprocessor.masks_column)
            if eval_dataset is not None
            else None
        )
    if len(train_data) == 0:
        raise ValueError("`train_dataset` has no example with a non-empty mask; there is nothing to train on.")
    train_loader = DataLoader(
        train_data.with_transform(preprocessor), batch_size=batch_size, shuffle=True, collate_fn=collate_fn
    )
    eval_loader = None
    if eval_data is not None:
        # Each process scores its own contiguous shard; the IoU metric sums over processes, so nothing is counted
        # twice (a prepared loader would repeat examples to even out the shards).
        eval_preprocessor = copy.copy(preprocessor)
        eval_preprocessor.set_epoch(0)
        shard = eval_data.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
        eval_loader = DataLoader(shard.with_transform(eval_preprocessor), batch_size=batch_size, collate_fn=collate_fn)

    if checkpoint is None:
        # Each process initialises on its own examples; the statistics are averaged across processes.
        first = accelerator.process_index * batch_size
        processed = train_loader.dataset
        calibration = collate_fn([processed[index % len(processed)] for index in range(first, first + batch_size)])
        model.to(accelerator.device)
        sampler.schedule.calibrate_start_bits(model, calibration["pixel_values"].to(accelerator.device))
    check_distributed_support(accelerator, model, sampler.schedule)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(
        quantizer_parameter_groups(model, learning_rate, quantizer_lr_scale), lr=learning_rate, weight_decay=0.0
    )
    # Stepped by hand once per optimizer step: a prepared scheduler would step once per process.
    warmup_steps = math.ceil(warmup_ratio * max_steps)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)
    supernet = accelerator.unwrap_model(model)

    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info(f"Resumed from {checkpoint} at step {progress.step}.")
    start_step = progress.step
    if start_step > max_steps:
        raise ValueError(f"The checkpoint is at step {start_step}, beyond max_steps={max_steps}.")

    eval_archs = {"largest": supernet.largest_subnet(), "smallest": supernet.smallest_subnet()}

    def evaluate() -> dict[str, float] | None:
        if eval_loader is None:
            return None
        results = evaluate_subnets(
            supernet,
            eval_loader,
            eval_archs,
            device=accelerator.device,
            show_progress=accelerator.is_local_main_process,
        )
        model.train()
        return results

    mean_iou_before = evaluate()
    if mean_iou_before is not None:
        logger.info(f"Mean IoU before training: {mean_iou_before}")
    logger.info(
        f"Training the supernet for steps {start_step}..{max_steps}: {batch_size} examples x "
        f"{gradient_accumulation_steps} micro-batches x {accelerator.num_processes} process(es) per step, "
        f"{2 + num_random_subnets} subnets per step, {len(train_data)} training examples."
    )

    batches = _micro_batches(accelerator, train_loader, preprocessor, start_step * gradient_accumulation_steps)
    window_sums, window_batches = {}, 0
    final_losses, log_history = {}, []
    progress_bar = tqdm(
        total=max_steps, initial=start_step, desc="Training supernet", disable=not accelerator.is_local_main_process
    )
    start_time = time.perf_counter()
    for step in range(start_step, max_steps):
        fraction = step / max_steps
        sampler.schedule.initialize_new_bits(supernet, fraction)
        archs = sampler.sample(step, fraction)
        for _ in range(gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(model):
                output = supernet_training_step(model, batch, archs, accelerator=accelerator, distillation=distillation)
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for name, loss in output.losses.items():
                window_sums[name] = window_sums.get(name, 0.0) + loss
            window_batches += 1
        learning_rate_used = scheduler.get_last_lr()[0]
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        progress.step = step + 1
        progress_bar.update(1)

        if progress.step % log_steps == 0 or progress.step == max_steps:
            names = list(window_sums)
            means = accelerator.reduce(torch.stack([window_sums[name] for name in names]) / window_batches, "mean")
            final_losses = {name: round(value, 4) for name, value in zip(names, means.tolist())}
            log_history.append(
                {
                    "step": progress.step,
                    "learning_rate": learning_rate_used,
                    **{f"loss/{name}": v for name, v in final_losses.items()},
                }
            )
            progress_bar.set_postfix({name: f"{value:.3f}" for name, value in final_losses.items()})
            logger.info(f"step {progress.step}/{max_steps}: {final_losses}")
            window_sums, window_batches = {}, 0
        if save_steps and progress.step % save_steps == 0:
            saved = output_dir / f"{CHECKPOINT_PREFIX}-{progress.step}"
            accelerator.save_state(str(saved))
            logger.info(f"Saved checkpoint {saved}.")
    progress_bar.close()
    seconds = time.perf_counter() - start_time

    mean_iou_after = evaluate()
    if mean_iou_after is not None:
        logger.info(f"Mean IoU after training: {mean_iou_after}")
    accelerator.wait_for_everyone()
    # Hand the model back as `from_pretrained` would give it, not in the last random subnet.
    supernet.set_subnet(supernet.full_precision_subnet())
    supernet.save_pretrained(
        output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    accelerator.wait_for_everyone()
    logger.info(f"Saved the trained supernet to {output_dir}.")
    return {
        "steps": progress.step,
        "resumed_from_step": start_step,
        "seconds": round(seconds, 2),
        "final_losses": final_losses,
        "mean_iou_before": mean_iou_before,
        "mean_iou_after": mean_iou_after,
        "log_history": log_history,
        "output_dir": str(output_dir),
    }
