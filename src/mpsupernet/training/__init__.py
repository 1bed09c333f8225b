"""Supernet training: losses, the sandwich rule with progressive bit-widths, the Trainer and the Accelerate loop."""

from .loop import train_supernet
from .losses import (
    DISTILLATION_KINDS,
    SamLossOutput,
    dice_loss,
    iou_prediction_loss,
    mask_distillation_loss,
    sam_loss,
    sigmoid_focal_loss,
)
from .sampling import (
    DISTILLATION_TEACHERS,
    QUANTIZER_LR_SCALE,
    ProgressiveBitsSchedule,
    SandwichSampler,
    SandwichStepOutput,
    check_distillation,
    check_distributed_support,
    check_training_batch,
    evaluate_subnets,
    is_quantizer_parameter,
    quantizer_parameter_groups,
    supernet_training_step,
)
from .trainer import PromptEpochCallback, SupernetTrainer


__all__ = [
    "DISTILLATION_KINDS",
    "DISTILLATION_TEACHERS",
    "ProgressiveBitsSchedule",
    "PromptEpochCallback",
    "QUANTIZER_LR_SCALE",
    "SamLossOutput",
    "SandwichSampler",
    "SandwichStepOutput",
    "SupernetTrainer",
    "check_distillation",
    "check_distributed_support",
    "check_training_batch",
    "dice_loss",
    "evaluate_subnets",
    "iou_prediction_loss",
    "is_quantizer_parameter",
    "mask_distillation_loss",
    "quantizer_parameter_groups",
    "sam_loss",
    "sigmoid_focal_loss",
    "supernet_training_step",
    "train_supernet",
]
