"""`SupernetTrainer`: the transformers `Trainer`, taught to train a supernet with the sandwich rule."""

import math
import time

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import speed_metrics
from transformers.utils import logging

from ..data.processing import SamSegmentationPreprocessor, collate_fn
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from .sampling import (
    QUANTIZER_LR_SCALE,
    SandwichSampler,
    check_distillation,
    check_distributed_support,
    check_training_batch,
    evaluate_subnets,
    is_quantizer_parameter,
    supernet_training_step,
)


logger = logging.get_logger(__name__)


class PromptEpochCallback(TrainerCallback):
    """Advances the epoch of the training set's `SamSegmentationPreprocessor` at every epoch, for fresh prompts.

    The preprocessor seeds its prompts with `(seed, epoch, example)`. The Trainer advances the epoch of a dataset
    only if the dataset has `set_epoch` (iterable datasets); a map-style `datasets.Dataset` holds the preprocessor as
    its transform (`Dataset.format["format_kwargs"]["transform"]`), which is where this finds it. Dataloader workers
    pick the new epoch up when they start, i.e. every epoch unless `dataloader_persistent_workers=True`.
    """

    def __init__(self, trainer: "SupernetTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset_format = getattr(self.trainer.train_dataset, "format", None) or {}
        transform = (dataset_format.get("format_kwargs") or {}).get("transform")
        if isinstance(transform, SamSegmentationPreprocessor):
            transform.set_epoch(math.floor(state.epoch or 0))


class SupernetTrainer(Trainer):
    """A `Trainer` that trains a `SamSupernetForMaskGeneration` with the sandwich rule.

    Each optimizer step trains the largest, the smallest and `num_random_subnets` random subnets on the same batch
    (see `SandwichSampler`; the draw depends only on the seed and `state.global_step`, so resuming from a checkpoint
    continues with the same subnets), following the progressive bit-width schedule at `global_step / max_steps`.
    Smaller subnets are distilled in place from the teacher. Everything else is the ordinary `Trainer`: gradient
    accumulation, mixed precision (`bf16=True` on GPUs), DDP / FSDP / DeepSpeed, `save_strategy`,
    `resume_from_checkpoint`, `report_to`.

    Training logs carry the mean loss of each subnet since the last log (`loss/largest`, `loss/smallest`,
    `loss/random_0`, ...) beside `loss`, the summed sandwich loss. `evaluate` reports the mean mask IoU of the
    largest and the smallest subnets of the whole search space (`eval_mean_iou_largest`,
    `eval_mean_iou_smallest`), so numbers stay comparable across the progressive schedule.

    The datasets are those of `Dataset.set_transform(SamSegmentationPreprocessor(...))`; the default collator is
    `mpsupernet.data.collate_fn`. The training preprocessor's epoch follows the Trainer's, so every epoch draws new
    prompts (`PromptEpochCallback`). Two arguments are set for this model whatever was given:
    `remove_unused_columns=False` (the transform needs the raw columns and `ground_truth_masks` is no forward
    argument) and, unless set explicitly, `ddp_find_unused_parameters=True` (each subnet leaves some trained
    parameters unused). Weight decay, if any, skips the quantizers' step sizes and offsets (decaying them would shrink
    the quantization ranges), and these learn at a scaled learning rate.

    Args:
        model (`SamSupernetForMaskGeneration`): the supernet (its base weights are frozen; the optimizer gets only the
            trainable parameters).
        args (`TrainingArguments`, *optional*): as for `Trainer`.
        data_collator (*optional*): defaults to `mpsupernet.data.collate_fn`.
        num_random_subnets (`int`, *optional*, defaults to 2): random subnets per step.
        sandwich_seed (`int`, *optional*): seed of the random subnets; defaults to `args.seed`.
        distillation (`str`, *optional*, defaults to `"largest"`): the distillation teacher, `"largest"`,
            `"full_precision"` or `None` (see `supernet_training_step`).
        distillation_kind (`str`, *optional*, defaults to `"kl"`): `"kl"` or `"mse"`.
        distillation_weight (`float`, *optional*, defaults to 1.0): weight of the distillation loss.
        multimask_output (`bool`, *optional*, defaults to `False`): train and evaluate with three masks per prompt.
        quantizer_lr_scale (`float`, *optional*, defaults to `QUANTIZER_LR_SCALE`): the quantizers' step sizes and
            offsets learn at `args.learning_rate` times this (see `quantizer_parameter_groups`).
        kwargs: every other `Trainer` argument (`train_dataset`, `eval_dataset`, `callbacks`, ...).
    """

    def __init__(
        self,
        model: SamSupernetForMaskGeneration | None = None,
        args: TrainingArguments | None = None,
        data_collator=None,
        *,
        num_random_subnets: int = 2,
        sandwich_seed: int | None = None,
        distillation: str | None = "largest",
        distillation_kind: str = "kl",
        distillation_weight: float = 1.0,
        multimask_output: bool = False,
        quantizer_lr_scale: float = QUANTIZER_LR_SCALE,
        **kwargs,
    ):
        if not isinstance(model, SamSupernetForMaskGeneration):
            raise TypeError(
                f"SupernetTrainer trains a SamSupernetForMaskGeneration, got {type(model).__name__}. Build one with "
                "`SamSupernetForMaskGeneration.from_sam(...)` or `.from_pretrained(...)`."
            )
        check_distillation(distillation, distillation_kind)
        if not quantizer_lr_scale >= 0:
            raise ValueError(f"`quantizer_lr_scale` must be non-negative, got {quantizer_lr_scale!r}.")
        args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        if args.remove_unused_columns:
            logger.info(
                "SupernetTrainer sets `remove_unused_columns=False`: the preprocessing transform needs the raw columns."
            )
            args.remove_unused_columns = False
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True
        super().__init__(model=model, args=args, data_collator=data_collator or collate_fn, **kwargs)
        self.sampler = SandwichSampler(
            model.config,
            num_random_subnets=num_random_subnets,
            seed=args.seed if sandwich_seed is None else sandwich_seed,
        )
        self.distillation = distillation
        self.distillation_kind = distillation_kind
        self.distillation_weight = distillation_weight
        self.multimask_output = multimask_output
        self.quantizer_lr_scale = quantizer_lr_scale
        self._subnet_loss_sums: dict[str, torch.Tensor] = {}
        self._subnet_loss_batches = 0
        self.add_callback(PromptEpochCallback(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, after calibrating the activation quantizers on the first training examples.

        The calibration (see `ProgressiveBitsSchedule.calibrate_start_bits`) runs before the model is wrapped for
        distributed training, on `per_device_train_batch_size` examples per process; a resumed run takes the step
        sizes from its checkpoint instead. Under FSDP or DeepSpeed, a progressive schedule that would hand step sizes
        over during training is refused (see `check_distributed_support`).
        """
        supernet = self.accelerator.unwrap_model(self.model)
        if not resume_from_checkpoint and self.train_dataset is not None:
            self._calibrate_quantizers(supernet)
        check_distributed_support(self.accelerator, supernet, self.sampler.schedule)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _calibrate_quantizers(self, supernet: SamSupernetForMaskGeneration) -> None:
        dataset = self.train_dataset
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            logger.info("The training dataset cannot be indexed: quantizers initialise on their first training batch.")
            return
        # Indexing, not a dataloader: drawing a batch must not consume the random state that shuffles the data.
        size = self.args.per_device_train_batch_size
        first = self.args.process_index * size
        batch = self.data_collator([dataset[index % len(dataset)] for index in range(first, first + size)])
        pixel_values = batch["pixel_values"].to(next(supernet.parameters()).device)
        self.sampler.schedule.calibrate_start_bits(supernet, pixel_values)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The parent's choice (no biases, no norms) without the quantizers' step sizes and offsets."""
        return [name for name in super().get_decay_parameter_names(model) if not is_quantizer_parameter(name)]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`, with the quantizers' parameters in their own groups at `learning_rate *
        quantizer_lr_scale` (see `quantizer_parameter_groups`). An optimizer given to the trainer is left as it is."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        model = model if model is not None else self.model
        quantizer_ids = {id(p) for name, p in model.named_parameters() if is_quantizer_parameter(name)}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in quantizer_ids]
            if not moved:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in quantizer_ids]
            if not group["params"]:
                optimizer.param_groups.remove(group)
            settings = {key: value for key, value in group.items() if key != "params"}
            optimizer.add_param_group({**settings, "params": moved, "lr": group["lr"] * self.quantizer_lr_scale})
        return optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Trains this step's sandwich of subnets on one micro-batch; returns the summed loss, scaled as the
        `Trainer` expects (divided by the gradient-accumulation steps)."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if not inputs:
            # Skipping here would leave the other data-parallel ranks waiting in their gradient all-reduce.
            raise ValueError(
                "A training batch is empty: every example in it has no non-empty mask. Remove such examples before "
                "training with `mpsupernet.data.remove_examples_without_masks(dataset)`."
            )
        check_training_batch(inputs)
        step = self.state.global_step
        fraction = min(step / self.state.max_steps, 1.0)
        self.sampler.schedule.initialize_new_bits(self.accelerator.unwrap_model(model), fraction)
        archs = self.sampler.sample(step, fraction)
        accumulation_steps = self.current_gradient_accumulation_steps
        backward_kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # The loss is already divided by the accumulation steps; DeepSpeed must not divide it again.
            backward_kwargs["scale_wrt_gas"] = False
        with self.compute_loss_context_manager():
            output = supernet_training_step(
                model,
                inputs,
                archs,
                accelerator=self.accelerator,
                loss_scale=1.0 / accumulation_steps,
                distillation=self.distillation,
                distillation_kind=self.distillation_kind,
                distillation_weight=self.distillation_weight,
                multimask_output=self.multimask_output,
                backward_kwargs=backward_kwargs,
            )
        for name, loss in output.losses.items():
            self._subnet_loss_sums[name] = self._subnet_loss_sums.get(name, 0.0) + loss
        self._subnet_loss_batches += 1
        return output.total / accumulation_steps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each subnet's mean loss since the last log (averaged over processes) to training logs."""
        if "loss" in logs and self._subnet_loss_batches:
            names = list(self._subnet_loss_sums)
            means = torch.stack([self._subnet_loss_sums[name] for name in names]) / self._subnet_loss_batches
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({f"loss/{name}": round(value, 4) for name, value in zip(names, means.tolist())})
            self._subnet_loss_sums, self._subnet_loss_batches = {}, 0
        super().log(logs, start_time)

    def evaluate(
        self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Mean mask IoU of the largest and the smallest subnets on the evaluation dataset.

        Args:
            eval_dataset (`Dataset` or `dict[str, Dataset]`, *optional*): overrides `self.eval_dataset`; with a
                dict, each dataset is evaluated and its name is added to the metric prefix.
            ignore_keys: unused; kept for the `Trainer` signature.
            metric_key_prefix (`str`, *optional*, defaults to `"eval"`): prefix of the metric names.

        Returns:
            `dict[str, float]` with `{prefix}_mean_iou_largest`, `{prefix}_mean_iou_smallest` and the speed metrics.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("SupernetTrainer.evaluate needs an `eval_dataset`, given here or to the trainer.")
        if isinstance(dataset, dict):
            metrics = {}
            for name, split in dataset.items():
                metrics.update(self.evaluate(split, ignore_keys, metric_key_prefix=f"{metric_key_prefix}_{name}"))
            return metrics
        start_time = time.time()
        dataloader = self.get_eval_dataloader(dataset)
        supernet = self.accelerator.unwrap_model(self.model)
        results = evaluate_subnets(
            supernet,
            dataloader,
            {"largest": supernet.largest_subnet(), "smallest": supernet.smallest_subnet()},
            multimask_output=self.multimask_output,
            device=self.args.device,
            show_progress=self.is_local_process_zero() and not self.args.disable_tqdm,
        )
        metrics = {f"{metric_key_prefix}_mean_iou_{name}": value for name, value in results.items()}
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=len(dataset)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
