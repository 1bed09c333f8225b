"""`train_supernet`: supernet training in a plain Accelerate loop (one process, or DDP under `accelerate launch`).

It trains exactly what `SupernetTrainer` trains (the step is `supernet_training_step`), with checkpoints that
resume bit-for-bit: the model, optimizer and RNG states are saved with `Accelerator.save_state`, the step counter,
learning-rate schedule and sandwich sampler as JSON (`mpsupernet.training.resume`), the sandwich of a step depends
only on `(seed, step)`, and the data order and prompts of an epoch only on `(seed, epoch)`. Checkpoints appear whole
or not at all, and resuming reads no pickled object.
"""

import copy
import math
import time
from dataclasses import dataclass, field
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
from transformers.utils import logging

from ..data.processing import SamSegmentationPreprocessor, collate_fn, remove_examples_without_masks
from ..data.semantic import SemanticSegmentationPreprocessor, check_dataset_task
from ..modeling_sam_semantic import SamSupernetForSemanticSegmentation
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from .arguments import SupernetTrainingArguments
from .engine import check_engine
from .policies import (
    SubnetLossWindow,
    calibrate_from_dataset,
    evaluation_subnets,
    make_sandwich_sampler,
    quantizer_parameter_groups,
    record_training_dataset,
    warn_collapsed_steps,
)
from .resume import (
    CHECKPOINT_PREFIX,
    begin_checkpoint,
    checkpoint_staging,
    finish_checkpoint,
    load_state,
    resolve_checkpoint,
)
from .step import check_distributed_support, evaluate_subnets, supernet_training_step


logger = logging.get_logger(__name__)



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
    required = preprocessor.required_columns
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`{name}` lacks the column(s) {missing}; it has {dataset.column_names}. Convert a Hub dataset to the "
            "standard schema with `mpsupernet.data.from_coco_annotations`, `from_instance_mask_columns` or "
            "`from_semantic_maps`."
        )


def _micro_batches(accelerator: Accelerator, dataloader, preprocessor: SamSegmentationPreprocessor, start: int):
    """Endless micro-batches from position `start`; epoch `e` has the data order and prompts of `(seed, e)`."""
    epoch, skip = divmod(start, len(dataloader))
    while True:
        preprocessor.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch, skip = epoch + 1, 0


def _absolute_steps(value: float, max_steps: int) -> int:
    """A `TrainingArguments` step count: a share of `max_steps` below 1, else a number of steps (as `Trainer`)."""
    return math.ceil(max_steps * value) if 0 < value < 1 else int(value)


def _check_arguments(args: SupernetTrainingArguments) -> None:
    """Refuses what the loop cannot honour, rather than ignore it."""
    _check_positive_int("max_steps", args.max_steps)
    _check_positive_int("batch_size", args.per_device_train_batch_size)
    _check_positive_int("gradient_accumulation_steps", args.gradient_accumulation_steps)
    _check_positive_int("log_steps", _absolute_steps(args.logging_steps, args.max_steps))
    if args.save_strategy == "steps":
        _check_positive_int("save_steps", _absolute_steps(args.save_steps, args.max_steps))
    elif args.save_strategy != "no":
        raise ValueError(f"train_supernet saves with save_strategy 'steps' or 'no', got {args.save_strategy!r}.")
    if not args.learning_rate > 0:
        raise ValueError(f"`learning_rate` must be positive, got {args.learning_rate!r}.")
    if args.weight_decay or args.lr_scheduler_type != "linear":
        raise ValueError(
            "train_supernet trains with AdamW without weight decay and a linear schedule; got weight_decay="
            f"{args.weight_decay!r}, lr_scheduler_type={str(args.lr_scheduler_type)!r}. Use SupernetTrainer for others."
        )


def train_supernet(
    model: SamSupernetForMaskGeneration,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
    *,
    args: SupernetTrainingArguments,
    preprocessor: SamSegmentationPreprocessor | SemanticSegmentationPreprocessor | None = None,
) -> dict:
    """Trains a supernet with the sandwich rule in an Accelerate loop and saves it with `save_pretrained`.

    Run it in one process, or under `accelerate launch` (DDP with gloo on CPUs, NCCL on GPUs; see
    `examples/accelerate_configs/`). Each optimizer step trains the largest, the smallest and `num_random_subnets`
    random subnets on `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` examples per
    process, with in-place distillation, following the progressive bit-width schedule of the model's config; AdamW on
    the trainable parameters only (no weight decay: it would shrink quantizer step sizes; the quantizers learn at the
    scaled rate of `quantizer_parameter_groups`), linear warm-up and decay of the learning rate to zero, gradient
    clipping at `max_grad_norm` (`None` or 0 turns it off).

    The loop reads these fields of `args`: `output_dir`, `max_steps`, `learning_rate`, `warmup_steps` (a share of
    `max_steps` below 1), `per_device_train_batch_size`, `per_device_eval_batch_size`,
    `gradient_accumulation_steps`, `bf16`/`fp16` (overridden by `accelerate launch --mixed_precision`),
    `activation_checkpointing`, `seed`, `data_seed`, `resume_from_checkpoint` (a `checkpoint-<step>` folder, or `True`
    for the last one in `output_dir`; resuming needs the same arguments as the first run), `save_strategy` (`"steps"`
    or `"no"`) with `save_steps`, `logging_steps`, `max_grad_norm`, and every supernet option
    (`SupernetTrainingArguments`). It refuses a weight decay or a schedule other than linear; the other fields are
    `SupernetTrainer`'s.

    Args:
        model (`SamSupernetForMaskGeneration`): the supernet to train (in place).
        train_dataset (`datasets.Dataset`): examples in the standard schema (`image`, `masks`, `image_id`; see
            `mpsupernet.data`), without a transform. Examples without a non-empty mask are removed first. A
            `SamSupernetForSemanticSegmentation` trains on the semantic schema (`image`, `annotation`) instead, and
            a dataset of the other task is refused.
        eval_dataset (`datasets.Dataset`, *optional*): the same schema; if given, the mean mask IoU (semantic: the
            dataset-level class mIoU) of the largest and the smallest subnets is measured before and after training.
        args (`SupernetTrainingArguments`): the run's settings, as for `SupernetTrainer` (any `TrainingArguments`
            is read as `SupernetTrainingArguments` with the default supernet options).
        preprocessor (`SamSegmentationPreprocessor`, *optional*): how examples become prompts and targets; defaults
            to box prompts, 4 per image, seeded with `seed` (for a `SamSupernetForSemanticSegmentation`, a
            `SemanticSegmentationPreprocessor`: images and label maps, no prompts). Evaluation uses a copy of it
            fixed at epoch 0.

    Returns:
        `dict`: `steps` (optimizer steps reached), `resumed_from_step`, `seconds` (training time of this call),
        `final_losses` (each subnet's mean loss over the last logging window), `mean_iou_before` and
        `mean_iou_after` (`{"largest": ..., "smallest": ...}`, or `None` without `eval_dataset`), `log_history`
        (the logged losses) and `output_dir`.
    """
    if not isinstance(args, SupernetTrainingArguments):
        args = SupernetTrainingArguments.from_training_arguments(args)
    if not isinstance(model, SamSupernetForMaskGeneration):
        raise TypeError(f"train_supernet trains a SamSupernetForMaskGeneration, got {type(model).__name__}.")
    _check_arguments(args)
    semantic = isinstance(model, SamSupernetForSemanticSegmentation)
    check_dataset_task(train_dataset, "train_dataset", semantic)
    check_dataset_task(eval_dataset, "eval_dataset", semantic)
    if preprocessor is None:
        preprocessor = (
            SemanticSegmentationPreprocessor(model.config)
            if semantic
            else SamSegmentationPreprocessor(model.config, seed=args.seed)
        )
    vision = model.config.vision_config
    if (preprocessor.image_size, preprocessor.patch_size) != (vision.image_size, vision.patch_size):
        raise ValueError(
            f"The preprocessor makes {preprocessor.image_size}-pixel inputs with {preprocessor.patch_size}-pixel "
            f"patches, but the model takes {vision.image_size} pixels with {vision.patch_size}-pixel patches."
        )
    _check_dataset(train_dataset, "train_dataset", preprocessor)
    if eval_dataset is not None:
        _check_dataset(eval_dataset, "eval_dataset", preprocessor)
    record_training_dataset(model, train_dataset)
    loop = _AccelerateLoop(model, args, preprocessor)
    loop.prepare_data(train_dataset, eval_dataset)
    loop.prepare_training()
    return loop.run()


@dataclass
class _TrainingLog:
    """What the loop has logged: the per-subnet loss window, the last means and the history."""

    losses: SubnetLossWindow = field(default_factory=SubnetLossWindow)
    final_losses: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


class _AccelerateLoop:
    """The phases of `train_supernet`: data, calibration and optimizer, the steps, evaluation and saving."""

    def __init__(self, model: SamSupernetForMaskGeneration, args: SupernetTrainingArguments, preprocessor):
        self.args = args
        self.preprocessor = preprocessor
        self.output_dir = Path(args.output_dir)
        resume = args.resume_from_checkpoint
        self.checkpoint = resolve_checkpoint(resume, self.output_dir) if resume else None
        self.sampler = make_sandwich_sampler(model, args)
        mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            # Optimizer steps are counted here, not per epoch: an epoch ending mid-accumulation must not force a step.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True, data_seed=args.seed if args.data_seed is None else args.data_seed
            ),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        check_engine(self.accelerator)
        set_seed(args.seed)
        self.model = model
        self.supernet = model
        self.eval_loader = None

    def prepare_data(self, train_dataset: Dataset, eval_dataset: Dataset | None) -> None:
        """The training dataloader and, with `eval_dataset`, this process's shard of the evaluation data."""
        accelerator = self.accelerator
        self.train_data, eval_data = train_dataset, eval_dataset
        if isinstance(self.preprocessor, SamSegmentationPreprocessor):
            # Label maps always have pixels to train on; per-object masks may all be empty.
            masks_column = self.preprocessor.masks_column
            with accelerator.main_process_first():
                self.train_data = remove_examples_without_masks(train_dataset, masks_column=masks_column)
                eval_data = (
                    remove_examples_without_masks(eval_dataset, masks_column=masks_column)
                    if eval_dataset is not None
                    else None
                )
        if len(self.train_data) == 0:
            raise ValueError("`train_dataset` has no example with a non-empty mask; there is nothing to train on.")
        self.train_loader = DataLoader(
            self.train_data.with_transform(self.preprocessor),
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            collate_fn=collate_fn,
        )
        if eval_data is not None:
            # Each process scores its own contiguous shard; the IoU metric sums over processes, so nothing is counted
            # twice (a prepared loader would repeat examples to even out the shards).
            eval_preprocessor = copy.copy(self.preprocessor)
            eval_preprocessor.set_epoch(0)
            shard = eval_data.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
            self.eval_loader = DataLoader(
                shard.with_transform(eval_preprocessor),
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=collate_fn,
            )

    def prepare_training(self) -> None:
        """Calibration (a fresh run only), the optimizer, the schedule, and the wrapping for distributed training."""
        args, accelerator, model = self.args, self.accelerator, self.model
        model.to(accelerator.device)
        if self.checkpoint is None:
            batch_size, rank = args.per_device_train_batch_size, accelerator.process_index
            calibrate_from_dataset(self.sampler, model, self.train_loader.dataset, collate_fn, batch_size, rank)
        check_distributed_support(accelerator, model, self.sampler.schedule)
        if args.activation_checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        optimizer = torch.optim.AdamW(
            quantizer_parameter_groups(model, args.learning_rate, args.quantizer_lr_scale),
            lr=args.learning_rate,
            weight_decay=0.0,
        )
        # Stepped by hand once per optimizer step: a prepared scheduler would step once per process.
        self.scheduler = get_scheduler(
            "linear",
            optimizer,
            num_warmup_steps=args.get_warmup_steps(args.max_steps),
            num_training_steps=args.max_steps,
        )
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, self.train_loader)
        self.step = 0
        self.supernet = accelerator.unwrap_model(self.model)
        if self.checkpoint is not None:
            self.resume()
        if self.step > args.max_steps:
            raise ValueError(f"The checkpoint is at step {self.step}, beyond max_steps={args.max_steps}.")

    def loop_state(self) -> dict:
        """What a checkpoint holds beside Accelerate's files: the step, the learning-rate schedule, the sampler."""
        sampler = {"seed": self.sampler.seed, "num_random_subnets": self.sampler.num_random_subnets}
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "sampler": sampler}

    def resume(self) -> None:
        """Loads a complete checkpoint: nothing registered for pickling, every tensor file read with weights_only."""
        state = load_state(self.checkpoint)
        sampler = {"seed": self.sampler.seed, "num_random_subnets": self.sampler.num_random_subnets}
        if state["sampler"] != sampler:
            raise ValueError(
                f"{self.checkpoint} was trained with the sandwich sampler {state['sampler']}, this run has {sampler}; "
                "resuming needs the same seed and num_random_subnets as the first run."
            )
        pickled = sorted(path.name for path in Path(self.checkpoint).glob("custom_checkpoint_*.pkl"))
        if pickled:
            # Accelerate unpickles custom states with weights_only=False, i.e. runs whatever they hold.
            raise ValueError(
                f"{self.checkpoint} holds pickled custom states {pickled}, which train_supernet never writes and will "
                "not unpickle (that could run code); remove them, or resume from a checkpoint this version wrote."
            )
        self.accelerator.load_state(str(self.checkpoint), load_kwargs={"weights_only": True})
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        logger.info(f"Resumed from {self.checkpoint} at step {self.step}.")

    def save_checkpoint(self) -> None:
        """Writes `checkpoint-<step>` so that it appears complete or not at all (see `mpsupernet.training.resume`)."""
        accelerator = self.accelerator
        target = self.output_dir / f"{CHECKPOINT_PREFIX}-{self.step}"
        if accelerator.is_main_process:
            begin_checkpoint(target)
        accelerator.wait_for_everyone()
        # Every process writes its own files (RNG states) into the one staging folder the main process made.
        accelerator.save_state(str(checkpoint_staging(target)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_checkpoint(target, self.step, self.loop_state())
            logger.info(f"Saved checkpoint {target}.")
        accelerator.wait_for_everyone()

    def evaluate(self) -> dict[str, float] | None:
        """Mean IoU of the evaluation subnets, or `None` without evaluation data."""
        if self.eval_loader is None:
            return None
        results = evaluate_subnets(
            self.supernet,
            self.eval_loader,
            evaluation_subnets(self.supernet),
            multimask_output=self.args.multimask_output,
            device=self.accelerator.device,
            show_progress=self.accelerator.is_local_main_process,
        )
        self.model.train()
        return results

    def run(self) -> dict:
        """Evaluates, trains up to `max_steps`, evaluates again and saves; returns `train_supernet`'s summary."""
        args, accelerator = self.args, self.accelerator
        start_step = self.step
        mean_iou_before = self.evaluate()
        if mean_iou_before is not None:
            logger.info(f"Mean IoU before training: {mean_iou_before}")
        logger.info(
            f"Training the supernet for steps {start_step}..{args.max_steps}: {args.per_device_train_batch_size} "
            f"examples x {args.gradient_accumulation_steps} micro-batches x {accelerator.num_processes} process(es) "
            f"per step, {2 + args.num_random_subnets} subnets per step, {len(self.train_data)} training examples."
        )
        start_time = time.perf_counter()
        log = self.train_steps(start_step)
        seconds = time.perf_counter() - start_time
        mean_iou_after = self.evaluate()
        if mean_iou_after is not None:
            logger.info(f"Mean IoU after training: {mean_iou_after}")
        self.save()
        return {
            "steps": self.step,
            "resumed_from_step": start_step,
            "seconds": round(seconds, 2),
            "final_losses": log.final_losses,
            "mean_iou_before": mean_iou_before,
            "mean_iou_after": mean_iou_after,
            "log_history": log.history,
            "output_dir": str(self.output_dir),
        }

    def train_steps(self, start_step: int) -> _TrainingLog:
        """The optimizer steps from `start_step` to `max_steps`, with logging and checkpoints."""
        args, accelerator = self.args, self.accelerator
        accumulation = args.gradient_accumulation_steps
        batches = _micro_batches(accelerator, self.train_loader, self.preprocessor, start_step * accumulation)
        log_steps = _absolute_steps(args.logging_steps, args.max_steps)
        save_steps = _absolute_steps(args.save_steps, args.max_steps) if args.save_strategy == "steps" else None
        log = _TrainingLog()
        progress_bar = tqdm(
            total=args.max_steps,
            initial=start_step,
            desc="Training supernet",
            disable=not accelerator.is_local_main_process,
        )
        for step in range(start_step, args.max_steps):
            learning_rate = self.train_step(step, batches, log.losses)
            self.step = step + 1
            progress_bar.update(1)
            if self.step % log_steps == 0 or self.step == args.max_steps:
                self.log(log, learning_rate, progress_bar)
            if save_steps and self.step % save_steps == 0:
                self.save_checkpoint()
        progress_bar.close()
        return log

    def train_step(self, step: int, batches, losses: SubnetLossWindow) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the learning rate it used."""
        args, accelerator, model = self.args, self.accelerator, self.model
        fraction = step / args.max_steps
        self.sampler.schedule.initialize_new_bits(self.supernet, fraction)
        archs = self.sampler.sample(step, fraction)
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(model):
                output = supernet_training_step(
                    model,
                    batch,
                    archs,
                    accelerator=accelerator,
                    distillation=args.distillation,
                    distillation_kind=args.distillation_kind,
                    distillation_weight=args.distillation_weight,
                    multimask_output=args.multimask_output,
                )
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            losses.add(output.losses)
        learning_rate = self.scheduler.get_last_lr()[0]
        if not accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        return learning_rate

    def log(self, log: _TrainingLog, learning_rate: float, progress_bar) -> None:
        log.final_losses = log.losses.pop_means(self.accelerator)
        log.history.append(
            {
                "step": self.step,
                "learning_rate": learning_rate,
                **{f"loss/{name}": value for name, value in log.final_losses.items()},
            }
        )
        progress_bar.set_postfix({name: f"{value:.3f}" for name, value in log.final_losses.items()})
        logger.info(f"step {self.step}/{self.args.max_steps}: {log.final_losses}")
        warn_collapsed_steps(self.supernet, self.step)

    def save(self) -> None:
        """Saves the supernet as `from_pretrained` would give it, not in the last random subnet."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        self.supernet.set_subnet(self.supernet.full_precision_subnet())
        self.supernet.save_pretrained(
            self.output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(self.model),
        )
        accelerator.wait_for_everyone()
        logger.info(f"Saved the trained supernet to {self.output_dir}.")
