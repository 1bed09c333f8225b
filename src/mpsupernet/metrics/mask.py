"""Mask IoU of promptable segmentation and a mean-IoU metric that syncs across processes (torch only).

IoU is computed at the resolution of SAM's `pred_masks`: `SamSegmentationPreprocessor` gives `ground_truth_masks`
in that very frame, so no upsampling is needed. The losses, the export check and the evaluation loops
(`mpsupernet.metrics.evaluation`) use this module; the `mask_iou` evaluation module computes with it too.
"""

import torch
from torchmetrics import Metric
from transformers.utils import logging


logger = logging.get_logger(__name__)


def mask_iou(pred_logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Intersection over union of thresholded mask logits and binary targets, per mask.

    A mask whose prediction and target are both empty counts as a perfect prediction (IoU 1), and one with an empty
    target but a non-empty prediction as IoU 0, so empty targets never give NaN.

    Args:
        pred_logits (`torch.Tensor` of shape `(..., height, width)`):
            Mask logits; a pixel is predicted foreground where its logit is above `threshold`.
        targets (`torch.Tensor` of shape `(..., height, width)`):
            Binary targets (non-zero is foreground), of the same shape.
        threshold (`float`, *optional*, defaults to 0.0):
            Logit threshold (0 is probability one half).

    Returns:
        `torch.Tensor` of shape `pred_logits.shape[:-2]` with float32 IoUs in [0, 1].
    """
    if pred_logits.shape != targets.shape:
        raise ValueError(
            f"Predictions and targets must have the same shape, got {tuple(pred_logits.shape)} and "
            f"{tuple(targets.shape)}."
        )
    predicted = pred_logits > threshold
    target = targets > 0
    intersection = (predicted & target).sum(dim=(-2, -1)).float()
    union = (predicted | target).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


class MeanMaskIoU(Metric):
    """Mean IoU over prompts (masks), correct across processes: the sums are reduced before dividing.

    Args:
        threshold (`float`, *optional*, defaults to 0.0):
            Logit threshold of the predictions.
        **kwargs:
            Passed to `torchmetrics.Metric` (e.g. `sync_on_compute`, `process_group`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("iou_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("num_masks", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, pred_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds the IoUs of a batch of masks.

        Args:
            pred_logits (`torch.Tensor` of shape `(..., height, width)`):
                Mask logits.
            targets (`torch.Tensor` of shape `(..., height, width)`):
                Binary targets of the same shape.
        """
        ious = mask_iou(pred_logits.detach(), targets.detach(), self.threshold)
        self.iou_sum += ious.sum().to(self.iou_sum.dtype)
        self.num_masks += ious.numel()

    def compute(self) -> torch.Tensor:
        """Returns the mean IoU over all masks seen (on all processes); NaN when there were none."""
        if self.num_masks == 0:
            logger.warning("MeanMaskIoU has seen no masks; its mean is NaN.")
            return torch.tensor(float("nan"))
        return self.iou_sum / self.num_masks


def select_masks(pred_masks: torch.Tensor, iou_scores: torch.Tensor) -> torch.Tensor:
    """Keeps, for every prompt, the mask with the highest predicted IoU (SAM's choice at inference).

    Args:
        pred_masks (`torch.Tensor` of shape `(batch, prompts, num_masks, height, width)`):
            Mask logits.
        iou_scores (`torch.Tensor` of shape `(batch, prompts, num_masks)`):
            Predicted IoUs.

    Returns:
        `torch.Tensor` of shape `(batch, prompts, height, width)`.
    """
    best = iou_scores.argmax(dim=-1)
    index = best[..., None, None, None].expand(*best.shape, 1, *pred_masks.shape[-2:])
    return pred_masks.gather(2, index).squeeze(2)


__all__ = ["MeanMaskIoU", "mask_iou", "select_masks"]
