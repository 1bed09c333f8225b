"""The step of supernet training: every subnet of the sandwich on one batch, gradients accumulated, and its checks.

Both training paths run it: `SupernetTrainer` (the transformers `Trainer`) and `train_supernet` (a plain Accelerate
loop). Which subnets a step trains is `mpsupernet.training.sampling`'s.
"""

import contextlib
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from ..architecture import SubnetArchitecture, parameter_kind
from ..data.processing import MODEL_INPUT_NAMES
from ..metrics.evaluation import evaluate_mean_iou, evaluate_semantic_mean_iou
from ..modeling_sam_semantic import SamSupernetForSemanticSegmentation
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from .losses import DISTILLATION_KINDS, mask_distillation_loss, sam_loss
from .sampling import ProgressiveBitsSchedule
from .semantic import check_semantic_batch, semantic_training_step


DISTILLATION_TEACHERS = ("largest", "full_precision")
PROMPT_INPUT_NAMES = ("input_boxes", "input_points")
QUANTIZER_LR_SCALE = 0.01
"""Default ratio of the quantizers' learning rate to the adapters' (see `policies.quantizer_parameter_groups`)."""


def is_quantizer_parameter(name: str) -> bool:
    """Whether a parameter name is a quantizer's step size or offset (see `mpsupernet.architecture.parameter_kind`)."""
    return parameter_kind(name) == "quantizer"


def check_training_batch(batch: dict) -> None:
    """Raises a `ValueError` naming what is missing if `batch` cannot train a SAM supernet.

    A batch needs `pixel_values`, `ground_truth_masks` and at least one prompt (`input_boxes` or `input_points`
    with `input_labels`), as `mpsupernet.data.SamSegmentationPreprocessor` and `collate_fn` make them.
    """
    missing = [name for name in ("pixel_values", "ground_truth_masks") if name not in batch]
    if not any(name in batch for name in PROMPT_INPUT_NAMES):
        missing.append(" or ".join(PROMPT_INPUT_NAMES))
    if "input_points" in batch and "input_labels" not in batch:
        missing.append("input_labels")
    if missing:
        raise ValueError(
            f"The training batch lacks {missing}; it has {sorted(batch)}. Preprocess the dataset with "
            "`mpsupernet.data.SamSegmentationPreprocessor` (through `Dataset.set_transform`) and batch it with "
            "`mpsupernet.data.collate_fn`; with the Trainer, keep `remove_unused_columns=False`."
        )


def check_distributed_support(
    accelerator: Accelerator, model: SamSupernetForMaskGeneration, schedule: ProgressiveBitsSchedule
) -> None:
    """Refuses a run whose progressive schedule would write step sizes under FSDP or DeepSpeed.

    Handing step sizes to a newly enabled bit-width writes into parameters in the middle of training. FSDP keeps
    only a shard of each parameter outside the forward pass, and DeepSpeed keeps master copies in its optimizer that
    overwrite the model's parameters at the next step, so such a write would be lost or misplaced. DDP keeps whole
    parameters on every process and is unaffected.

    Raises:
        `ValueError`: under FSDP or DeepSpeed, if some quantizer still needs a step size from a higher bit-width.
    """
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    pending = schedule.pending_copies(model)
    if pending:
        raise ValueError(
            f"The progressive schedule {model.config.progressive_bits_schedule} would copy {pending} quantizer step "
            f"size(s) into newly enabled bit-widths during training, which {accelerator.distributed_type.value} "
            "cannot take (parameters are sharded or shadowed by the optimizer). Train with DDP, or use a schedule "
            "whose bit-widths are all enabled at fraction 0.0."
        )


@dataclass
class SandwichStepOutput:
    """What one sandwich step computed, per subnet (detached, before any gradient-accumulation scaling).

    Args:
        losses (`dict[str, torch.Tensor]`): total loss of each subnet (SAM loss plus weighted distillation).
        distillation_losses (`dict[str, torch.Tensor]`): distillation loss of each distilled subnet (unweighted).
    """

    losses: dict[str, torch.Tensor]
    distillation_losses: dict[str, torch.Tensor]

    @property
    def total(self) -> torch.Tensor:
        """Sum of the subnets' losses: what the accumulated gradient is the gradient of."""
        return torch.stack(list(self.losses.values())).sum()


def check_distillation(teacher: str | None, kind: str = "kl") -> None:
    """Raises a `ValueError` naming the value if the distillation teacher or kind is unknown."""
    if teacher is not None and teacher not in DISTILLATION_TEACHERS:
        raise ValueError(f"Unknown distillation teacher {teacher!r}; allowed: {list(DISTILLATION_TEACHERS)} or None.")
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"Unknown distillation kind {kind!r}; allowed: {list(DISTILLATION_KINDS)}.")


@contextlib.contextmanager
def _defer_gradient_sync(accelerator: Accelerator, model: nn.Module):
    """Backward passes inside accumulate gradients locally; the next one outside synchronises everything.

    DDP (and FSDP) skip their all-reduce under `no_sync`. DeepSpeed's engine instead steps its optimizer after every
    backward that accelerate marks as a sync point, so the sync flag is lowered as well. Only entered when the caller
    would synchronise (`accelerator.sync_gradients`): otherwise the caller's own `no_sync` already covers every
    backward, and FSDP2's `no_sync` would switch synchronisation back on when it exits.
    """
    gradient_state = accelerator.gradient_state
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        gradient_state._set_sync_gradients(True)


def check_batch_for(supernet, batch: dict) -> None:
    """Raises a `ValueError` naming what is missing if `batch` cannot train `supernet` (its task's inputs)."""
    if isinstance(supernet, SamSupernetForSemanticSegmentation):
        check_semantic_batch(batch)
    else:
        check_training_batch(batch)


def _check_step_inputs(supernet, batch: dict, archs: dict, distillation: str | None, distillation_kind: str) -> None:
    check_distillation(distillation, distillation_kind)
    if not archs:
        raise ValueError("`archs` is empty; give at least one subnet to train.")
    if distillation == "largest" and next(iter(archs)) != "largest":
        raise ValueError(
            f"With distillation='largest' the first subnet must be named 'largest' (it is the teacher); got the "
            f"order {list(archs)}."
        )
    check_batch_for(supernet, batch)


@torch.no_grad()
def _full_precision_logits(model: nn.Module, supernet, inputs: dict, multimask_output: bool) -> torch.Tensor:
    """The mask logits of the full-precision subnet, the teacher of `distillation="full_precision"`."""
    supernet.set_subnet(supernet.full_precision_subnet())
    return model(**inputs, multimask_output=multimask_output).pred_masks.float()


def supernet_training_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    archs: dict[str, SubnetArchitecture],
    *,
    accelerator: Accelerator,
    loss_scale: float = 1.0,
    distillation: str | None = "largest",
    distillation_kind: str = "kl",
    distillation_weight: float = 1.0,
    multimask_output: bool = False,
    backward_kwargs: dict | None = None,
) -> SandwichStepOutput:
    """Trains the sandwich on one batch: forward and backward of every subnet, gradients accumulated.

    For each subnet in order: activate it, run the batch, compute SAM's loss (focal + dice + IoU MSE) against
    `ground_truth_masks` and, for every subnet but the teacher, add `distillation_weight` times the in-place
    distillation loss towards the teacher's mask logits; then backpropagate `loss * loss_scale` at once.

    Memory: each subnet is backpropagated right after its forward, so only one subnet's activations live at a time
    (summing the losses and calling backward once would hold all of them). With several backward passes per
    optimizer step, data-parallel gradients must be reduced once, not once per subnet: every backward but the last
    runs under `accelerator.no_sync`, and the last one reduces the gradients accumulated by all of them. When the
    caller does not synchronise this micro-batch (`accelerator.sync_gradients` is False: not the last micro-batch of
    a gradient-accumulation cycle, already under the caller's `no_sync`), nothing is reduced at all. DDP must be
    built with `find_unused_parameters=True`: subnets use different adapters, heads and blocks, so the last backward
    does not reach every trained parameter.

    Args:
        model (`nn.Module`): the supernet as prepared by `accelerator` (possibly wrapped in DDP).
        batch (`dict[str, torch.Tensor]`): a batch from `mpsupernet.data.collate_fn`, on the model's device.
        archs (`dict[str, SubnetArchitecture]`): the subnets, e.g. from `SandwichSampler.sample`; with
            `distillation="largest"` the first must be named `"largest"`.
        accelerator (`Accelerator`): runs the backward passes (mixed precision, DeepSpeed) and defers the syncs.
        loss_scale (`float`, *optional*, defaults to 1.0): multiplies every loss before backward (the Trainer divides
            by its gradient-accumulation steps here; accelerate's own loop lets `accelerator.backward` do it).
        distillation (`str`, *optional*, defaults to `"largest"`): the teacher of in-place distillation.
            `"largest"`: the largest subnet's mask logits of this very step, detached (no extra cost); the other
            subnets learn from it. `"full_precision"`: the supernet's full-precision subnet (float weights with the
            current adapters and mask decoder), run once more without gradients; every subnet, the largest
            included, learns from it. `None`: no distillation. A teacher with the adapters switched off is not
            offered: the mask decoder trains too, so the base model no longer exists inside the supernet once
            training has started.
        distillation_kind (`str`, *optional*, defaults to `"kl"`): `"kl"` or `"mse"`, see
            `mpsupernet.training.mask_distillation_loss`.
        distillation_weight (`float`, *optional*, defaults to 1.0): weight of the distillation loss.
        multimask_output (`bool`, *optional*, defaults to `False`): whether SAM predicts three masks per prompt
            (the best one is trained, as in SAM) or one.
        backward_kwargs (`dict`, *optional*): passed to `accelerator.backward`.

    Returns:
        `SandwichStepOutput` with each subnet's (detached, unscaled) losses.
    """
    supernet = accelerator.unwrap_model(model)
    _check_step_inputs(supernet, batch, archs, distillation, distillation_kind)
    if isinstance(supernet, SamSupernetForSemanticSegmentation):
        losses, distillation_losses = semantic_training_step(
            model,
            batch,
            archs,
            accelerator=accelerator,
            defer_gradient_sync=_defer_gradient_sync,
            loss_scale=loss_scale,
            distillation=distillation,
            distillation_kind=distillation_kind,
            distillation_weight=distillation_weight,
            backward_kwargs=backward_kwargs,
        )
        return SandwichStepOutput(losses=losses, distillation_losses=distillation_losses)
    inputs = {name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}
    targets = batch["ground_truth_masks"]
    teacher_logits = None
    if distillation == "full_precision":
        teacher_logits = _full_precision_logits(model, supernet, inputs, multimask_output)

    losses, distillation_losses = {}, {}
    names = list(archs)
    for position, name in enumerate(names):
        supernet.set_subnet(archs[name])
        defer_sync = accelerator.sync_gradients and position < len(names) - 1
        with _defer_gradient_sync(accelerator, model) if defer_sync else contextlib.nullcontext():
            outputs = model(**inputs, multimask_output=multimask_output)
            pred_masks = outputs.pred_masks.float()
            loss = sam_loss(pred_masks, outputs.iou_scores.float(), targets).loss
            if distillation == "largest" and name == "largest":
                teacher_logits = pred_masks.detach()
            elif teacher_logits is not None:
                distilled = mask_distillation_loss(pred_masks, teacher_logits, kind=distillation_kind)
                distillation_losses[name] = distilled.detach()
                loss = loss + distillation_weight * distilled
            accelerator.backward(loss * loss_scale, **(backward_kwargs or {}))
        losses[name] = loss.detach()
    return SandwichStepOutput(losses=losses, distillation_losses=distillation_losses)


def evaluate_subnets(
    model: nn.Module, dataloader, archs: dict[str, SubnetArchitecture], **evaluate_kwargs
) -> dict[str, float]:
    """Mean mask IoU of each subnet on a dataloader (`mpsupernet.metrics.evaluate_mean_iou` with `subnet`); for a
    semantic supernet, the dataset-level class mIoU (`mpsupernet.metrics.evaluate_semantic_mean_iou`).

    The model's active subnet is restored afterwards.

    Args:
        model (`SamSupernetForMaskGeneration`): the (unwrapped) supernet.
        dataloader: batches from `mpsupernet.data.collate_fn`; in a distributed run, each process's shard.
        archs (`dict[str, SubnetArchitecture]`): the subnets to evaluate, by name.
        evaluate_kwargs: passed to `evaluate_mean_iou` (`multimask_output`, `device`, `show_progress`, ...).

    Returns:
        `dict[str, float]`: the mean IoU of each subnet.
    """
    if isinstance(model, SamSupernetForSemanticSegmentation):
        # A class head has no prompts, so it takes no `multimask_output`.
        kwargs = {key: value for key, value in evaluate_kwargs.items() if key != "multimask_output"}
        return {
            name: evaluate_semantic_mean_iou(
                model, dataloader, subnet=arch, description=f"class mIoU of the {name} subnet", **kwargs
            )["mean_iou"]
            for name, arch in archs.items()
        }
    return {
        name: evaluate_mean_iou(
            model, dataloader, subnet=arch, description=f"mIoU of the {name} subnet", **evaluate_kwargs
        )
        for name, arch in archs.items()
    }
