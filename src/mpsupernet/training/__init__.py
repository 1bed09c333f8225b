"""Supernet training: losses."""

from .losses import (
    DISTILLATION_KINDS,
    SamLossOutput,
    dice_loss,
    iou_prediction_loss,
    mask_distillation_loss,
    sam_loss,
    sigmoid_focal_loss,
)


__all__ = [
    "DISTILLATION_KINDS",
    "SamLossOutput",
    "dice_loss",
    "iou_prediction_loss",
    "mask_distillation_loss",
    "sam_loss",
    "sigmoid_focal_loss",
]
