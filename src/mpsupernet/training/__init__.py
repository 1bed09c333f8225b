"""Supernet training: losses, the sandwich rule with progressive bit-widths, the Trainer and the Accelerate loop."""

from .arguments import SUPERNET_OPTIONS, SupernetTrainingArguments
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
from .policies import (
    SubnetLossWindow,
    calibrate_from_dataset,
    evaluation_subnets,
    make_sandwich_sampler,
    quantizer_parameter_groups,
    split_quantizer_groups,
)
from .sampling import FixedArchitectureSampler, ProgressiveBitsSchedule, SandwichSampler
from .step import (
    DISTILLATION_TEACHERS,
    QUANTIZER_LR_SCALE,
    SandwichStepOutput,
    check_distillation,
    check_distributed_support,
    check_training_batch,
    evaluate_subnets,
    is_quantizer_parameter,
    supernet_training_step,
)
from .trainer import PromptEpochCallback, SupernetTrainer


__all__ = [
    "DISTILLATION_KINDS",
    "DISTILLATION_TEACHERS",
    "FixedArchitectureSampler",
    "ProgressiveBitsSchedule",
    "PromptEpochCallback",
    "QUANTIZER_LR_SCALE",
    "SUPERNET_OPTIONS",
    "SamLossOutput",
    "SandwichSampler",
    "SandwichStepOutput",
    "SubnetLossWindow",
    "SupernetTrainer",
    "SupernetTrainingArguments",
    "calibrate_from_dataset",
    "check_distillation",
    "check_distributed_support",
    "check_training_batch",
    "dice_loss",
    "evaluate_subnets",
    "evaluation_subnets",
    "iou_prediction_loss",
    "make_sandwich_sampler",
    "is_quantizer_parameter",
    "mask_distillation_loss",
    "quantizer_parameter_groups",
    "sam_loss",
    "sigmoid_focal_loss",
    "split_quantizer_groups",
    "supernet_training_step",
    "train_supernet",
]
