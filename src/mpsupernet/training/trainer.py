"""`SupernetTrainer`: the transformers `Trainer`, taught to train a supernet with the sandwich rule."""

import math
import os
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints, speed_metrics
from transformers.utils import logging

from ..data.processing import SamSegmentationPreprocessor, collate_fn
from ..layout import CARD_NAME
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from .arguments import SUPERNET_OPTIONS, SupernetTrainingArguments
from .engine import check_engine
from .policies import (
    SubnetLossWindow,
    calibrate_from_dataset,
    evaluation_subnets,
    make_sandwich_sampler,
    record_training_dataset,
    split_quantizer_groups,
    warn_collapsed_steps,
)
from .resume import mark_complete, resolve_checkpoint
from .step import (
    check_distributed_support,
    check_batch_for,
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
        args (`SupernetTrainingArguments` or `TrainingArguments`, *optional*): as for `Trainer`, with the supernet
            options (`num_random_subnets`, `sandwich_seed`, `distillation`, `distillation_kind`,
            `distillation_weight`, `multimask_output`, `quantizer_lr_scale`); plain `TrainingArguments` are copied
            into `SupernetTrainingArguments` with the options' defaults. `self.args` is always the latter.
        data_collator (*optional*): defaults to `mpsupernet.data.collate_fn`.
        kwargs: a supernet option given by name overrides the one in `args`; every other `Trainer` argument
            (`train_dataset`, `eval_dataset`, `callbacks`, ...).
    """

    def __init__(
        self,
        model: SamSupernetForMaskGeneration | None = None,
        args: TrainingArguments | None = None,
        data_collator=None,
        **kwargs,
    ):
        if not isinstance(model, SamSupernetForMaskGeneration):
            raise TypeError(
                f"SupernetTrainer trains a SamSupernetForMaskGeneration, got {type(model).__name__}. Build one with "
                "`SamSupernetForMaskGeneration.from_sam(...)` or `.from_pretrained(...)`."
            )
        for name in ("compute_metrics", "preprocess_logits_for_metrics"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"SupernetTrainer does not call `{name}`: its `evaluate` measures the mean mask IoU of the largest "
                    "and the smallest subnets. For other metrics or subnets, run "
                    "`mpsupernet.training.evaluate_subnets` (or `mpsupernet.metrics`) on the trained supernet."
                )
        for name in ("train_dataset", "eval_dataset"):
            _check_preprocessed(kwargs.get(name), name)
        options = {name: kwargs.pop(name) for name in SUPERNET_OPTIONS if name in kwargs}
        if args is None:
            args = SupernetTrainingArguments(output_dir="trainer_output", **options)
        else:
            args = SupernetTrainingArguments.from_training_arguments(args, **options)
        if args.remove_unused_columns:
            logger.info(
                "SupernetTrainer sets `remove_unused_columns=False`: the preprocessing transform needs the raw columns."
            )
            args.remove_unused_columns = False
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True
        super().__init__(model=model, args=args, data_collator=data_collator or collate_fn, **kwargs)
        check_engine(self.accelerator, args)
        self.sampler = make_sandwich_sampler(model, args)
        self._subnet_losses = SubnetLossWindow()
        self.add_callback(PromptEpochCallback(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, after calibrating the activation quantizers on the first training examples.

        `resume_from_checkpoint` must name a complete checkpoint (one whose `checkpoint_complete.json` matches its
        files); `True` resumes from the newest complete one in `output_dir`, logging the newer ones skipped and why.

        The calibration (see `ProgressiveBitsSchedule.calibrate_start_bits`) runs before the model is wrapped for
        distributed training, on `per_device_train_batch_size` examples per process; a resumed run takes the step
        sizes from its checkpoint instead. Under FSDP or DeepSpeed, a progressive schedule that would hand step sizes
        over during training is refused (see `check_distributed_support`).
        """
        if resume_from_checkpoint:
            # Only a complete checkpoint (see `mpsupernet.training.resume`); `True` takes the newest complete one.
            resume_from_checkpoint = str(resolve_checkpoint(resume_from_checkpoint, self.args.output_dir))
        supernet = self.accelerator.unwrap_model(self.model)
        record_training_dataset(supernet, self.train_dataset)
        if not resume_from_checkpoint and self.train_dataset is not None:
            calibrate_from_dataset(
                self.sampler,
                supernet,
                self.train_dataset,
                self.data_collator,
                self.args.per_device_train_batch_size,
                self.args.process_index,
            )
        check_distributed_support(self.accelerator, supernet, self.sampler.schedule)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """`Trainer._save_checkpoint`, then the completion marker; older checkpoints are rotated out only after it.

        The Trainer writes a checkpoint file by file; the marker, written last, is what makes it one to resume from.
        """
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the parent would rotate before the marker exists
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            mark_complete(Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}", self.state.global_step)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def create_model_card(self, *args, **kwargs) -> None:
        """Writes mpsupernet's supernet card (`mpsupernet.hub.render_supernet_card`) to `output_dir/README.md`.

        `push_to_hub` calls this. transformers' own card would call the model a plain transformers fine-tune with
        no base model and no BitOPs; this one states the base SAM, the training data, the search space's BitOPs and
        the last evaluation. The arguments of `Trainer.create_model_card` (`license`, `tags`, ...) are accepted;
        only `license` is used.
        """
        if not self.is_world_process_zero():
            return
        from ..hub import render_supernet_card

        evaluations = [entry for entry in self.state.log_history if any(key.startswith("eval_") for key in entry)]
        metrics = {
            key: value
            for key, value in (evaluations[-1] if evaluations else {}).items()
            if key.startswith("eval_mean_iou")
        }
        card = render_supernet_card(
            self.accelerator.unwrap_model(self.model),
            steps=self.state.global_step or None,
            eval_metrics=metrics,
            repo_id=self.hub_model_id,
            license=kwargs.get("license") or "apache-2.0",
        )
        card.save(os.path.join(self.args.output_dir, CARD_NAME))

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The parent's choice (no biases, no norms) without the quantizers' step sizes and offsets."""
        return [name for name in super().get_decay_parameter_names(model) if not is_quantizer_parameter(name)]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`, with the quantizers' parameters in their own groups at `learning_rate *
        quantizer_lr_scale` (see `quantizer_parameter_groups`). An optimizer given to the trainer is left as it is."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        groups = split_quantizer_groups(
            optimizer.param_groups, model if model is not None else self.model, self.args.quantizer_lr_scale
        )
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
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
        check_batch_for(self.accelerator.unwrap_model(model), inputs)
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
                distillation=self.args.distillation,
                distillation_kind=self.args.distillation_kind,
                distillation_weight=self.args.distillation_weight,
                multimask_output=self.args.multimask_output,
                backward_kwargs=backward_kwargs,
            )
        self._subnet_losses.add(output.losses)
        return output.total / accumulation_steps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each subnet's mean loss since the last log (averaged over processes) to training logs, and warns about
        collapsed step sizes (`warn_collapsed_steps`)."""
        if "loss" in logs and len(self._subnet_losses):
            means = self._subnet_losses.pop_means(self.accelerator)
            logs.update({f"loss/{name}": value for name, value in means.items()})
            warn_collapsed_steps(self.accelerator.unwrap_model(self.model), self.state.global_step)
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
            evaluation_subnets(supernet),
            multimask_output=self.args.multimask_output,
            device=self.args.device,
            show_progress=self.is_local_process_zero() and not self.args.disable_tqdm,
        )
        metrics = {f"{metric_key_prefix}_mean_iou_{name}": value for name, value in results.items()}
        metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=len(dataset)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _check_preprocessed(dataset, name: str) -> None:
    """Refuses a `datasets.Dataset` that yields raw examples: the Trainer's batches must be SAM inputs."""
    if isinstance(dataset, dict):
        for key, split in dataset.items():
            _check_preprocessed(split, f"{name}[{key!r}]")
        return
    if isinstance(dataset, Dataset) and dataset.format["type"] != "custom" and "pixel_values" not in dataset.column_names:
        raise ValueError(
            f"`{name}` has no preprocessing transform (its columns are {dataset.column_names}): SupernetTrainer "
            f"trains on SAM inputs. Give `{name}.with_transform(SamSegmentationPreprocessor(model.config))` (from "
            "`mpsupernet.data`). `train_supernet`, by contrast, takes the dataset in the standard schema without a "
            "transform and preprocesses it itself."
        )
