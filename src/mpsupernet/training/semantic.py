"""The sandwich step of a class-segmentation supernet: CE + Dice on class logits, in-place distillation of them.

`supernet_training_step` hands a [`SamSupernetForSemanticSegmentation`] to [`semantic_training_step`], so both
training paths (`SupernetTrainer`, `train_supernet`) train either task with the same sampler, schedule, checkpoints
and gradient synchronisation.
"""

import contextlib

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ..search_space import SubnetArchitecture
from ..semantic_loss import class_logits_distillation_loss

SEMANTIC_BATCH_NAMES = ("pixel_values", "labels")


def check_semantic_batch(batch: dict) -> None:
    """Raises a `ValueError` naming what is missing if `batch` cannot train a semantic supernet."""
    missing = [name for name in SEMANTIC_BATCH_NAMES if name not in batch]
    if missing:
        raise ValueError(
            f"The training batch lacks {missing}; it has {sorted(batch)}. A semantic segmentation supernet trains on "
            "`pixel_values` and `labels` (class ids): preprocess the dataset with "
            "`mpsupernet.data.SemanticSegmentationPreprocessor` and batch it with `mpsupernet.data.collate_fn`."
        )


def class_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """`"kl"`: KL of the per-pixel class distributions; `"mse"`: mean squared error of the logits."""
    if kind == "kl":
        return class_logits_distillation_loss(student, teacher)
    return F.mse_loss(student.float(), teacher.detach().float())


def semantic_training_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    archs: dict[str, SubnetArchitecture],
    *,
    accelerator: Accelerator,
    defer_gradient_sync,
    loss_scale: float = 1.0,
    distillation: str | None = "largest",
    distillation_kind: str = "kl",
    distillation_weight: float = 1.0,
    backward_kwargs: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trains the sandwich on one batch of images and label maps, as `supernet_training_step` does for prompts.

    For each subnet in order: activate it, compute its class logits and its loss (`0.2 * CE + 0.8 * Dice`, ignored
    pixels counted nowhere), add `distillation_weight` times the distillation loss towards the teacher's class
    logits (`"largest"`: the largest subnet's of this step, detached; `"full_precision"`: the full-precision
    subnet's, run once more without gradients), then backpropagate `loss * loss_scale`; every backward but the last
    runs under `defer_gradient_sync` (see `supernet_training_step`).

    Returns:
        `tuple[dict, dict]`: each subnet's (detached, unscaled) total loss and distillation loss, by name (the
        fields of `SandwichStepOutput`).
    """
    check_semantic_batch(batch)
    supernet = accelerator.unwrap_model(model)
    pixel_values, labels = batch["pixel_values"], batch["labels"]
    teacher_logits = None
    if distillation == "full_precision":
        with torch.no_grad():
            supernet.set_subnet(supernet.full_precision_subnet())
            teacher_logits = model(pixel_values=pixel_values).logits.float()

    losses, distillation_losses = {}, {}
    names = list(archs)
    for position, name in enumerate(names):
        supernet.set_subnet(archs[name])
        defer_sync = accelerator.sync_gradients and position < len(names) - 1
        with defer_gradient_sync(accelerator, model) if defer_sync else contextlib.nullcontext():
            outputs = model(pixel_values=pixel_values, labels=labels)
            loss = outputs.loss
            if distillation == "largest" and name == "largest":
                teacher_logits = outputs.logits.detach().float()
            elif teacher_logits is not None:
                distilled = class_distillation_loss(outputs.logits, teacher_logits, distillation_kind)
                distillation_losses[name] = distilled.detach()
                loss = loss + distillation_weight * distilled
            accelerator.backward(loss * loss_scale, **(backward_kwargs or {}))
        losses[name] = loss.detach()
    return losses, distillation_losses


__all__ = ["check_semantic_batch", "class_distillation_loss", "semantic_training_step"]
