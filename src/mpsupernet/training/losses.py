"""SAM's training losses on mask logits, and the in-place distillation loss of supernet training.

Mask tensors are logits of shape `(..., height, width)`; targets are binary masks of the same shape (the
`ground_truth_masks` of `mpsupernet.data.SamSegmentationPreprocessor` are in the frame of `pred_masks`). The
per-mask functions return one value per mask (shape `(...)`) so that callers can pick or weight masks before
averaging.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics.mask import mask_iou


DISTILLATION_KINDS = ("kl", "mse")


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., 2017), averaged over the pixels of each mask.

    `FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)`, with `p_t` the probability given to the true class and
    `alpha_t = alpha` on foreground pixels, `1 - alpha` on background ones.

    Args:
        logits (`torch.Tensor` of shape `(..., height, width)`):
            Mask logits.
        targets (`torch.Tensor` of shape `(..., height, width)`):
            Binary targets (0 or 1), broadcastable to `logits`.
        alpha (`float`, *optional*, defaults to 0.25):
            Weight of the foreground pixels, in [0, 1]; a negative value disables the weighting.
        gamma (`float`, *optional*, defaults to 2.0):
            Focusing exponent; 0 gives plain binary cross-entropy (times `alpha_t`).

    Returns:
        `torch.Tensor` of shape `logits.shape[:-2]`.
    """
    targets = targets.to(logits.dtype)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
    probabilities = torch.sigmoid(logits)
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss on the sigmoid of the logits, per mask: `1 - (2 |P·T| + s) / (|P| + |T| + s)`.

    Args:
        logits (`torch.Tensor` of shape `(..., height, width)`):
            Mask logits.
        targets (`torch.Tensor` of shape `(..., height, width)`):
            Binary targets, broadcastable to `logits`.
        smooth (`float`, *optional*, defaults to 1.0):
            Added to numerator and denominator, so that an empty target predicted empty costs 0, not NaN.

    Returns:
        `torch.Tensor` of shape `logits.shape[:-2]`.
    """
    probabilities = torch.sigmoid(logits)
    targets = targets.to(logits.dtype).expand_as(logits)
    intersection = (probabilities * targets).sum(dim=(-2, -1))
    total = probabilities.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1))
    return 1 - (2 * intersection + smooth) / (total + smooth)


def iou_prediction_loss(
    iou_predictions: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0
) -> torch.Tensor:
    """Squared error between predicted IoUs and the actual IoUs of the thresholded masks, per mask.

    The actual IoU is a target: no gradient flows into the masks through it.

    Args:
        iou_predictions (`torch.Tensor` of shape `(...)`):
            Predicted IoUs (SAM's `iou_scores`).
        logits (`torch.Tensor` of shape `(..., height, width)`):
            Mask logits.
        targets (`torch.Tensor` of shape `(..., height, width)`):
            Binary targets, broadcastable to `logits`.
        threshold (`float`, *optional*, defaults to 0.0):
            Logit threshold of the predicted masks.

    Returns:
        `torch.Tensor` of shape `iou_predictions.shape`.
    """
    actual = mask_iou(logits.detach(), targets.expand_as(logits), threshold).to(iou_predictions.dtype)
    return (iou_predictions - actual) ** 2


@dataclass
class SamLossOutput:
    """The combined SAM loss and its parts.

    Args:
        loss (`torch.Tensor`):
            The weighted total, a scalar to backpropagate.
        focal_loss (`torch.Tensor`):
            Mean focal loss of the chosen masks (unweighted).
        dice_loss (`torch.Tensor`):
            Mean dice loss of the chosen masks (unweighted).
        iou_loss (`torch.Tensor`):
            Mean squared error of the IoU predictions (unweighted).
        mask_indices (`torch.Tensor` of shape `(batch, prompts)`):
            Index of the mask chosen for each prompt (the one of lowest mask loss).
    """

    loss: torch.Tensor
    focal_loss: torch.Tensor
    dice_loss: torch.Tensor
    iou_loss: torch.Tensor
    mask_indices: torch.Tensor


def sam_loss(
    pred_masks: torch.Tensor,
    iou_scores: torch.Tensor,
    ground_truth_masks: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    supervise_all_iou: bool = False,
) -> SamLossOutput:
    """SAM's training loss: `focal_weight * focal + dice_weight * dice + iou_weight * IoU MSE`.

    With several masks per prompt (`multimask_output=True`), only the mask of lowest `focal_weight * focal +
    dice_weight * dice` is trained for that prompt, as in SAM, so the outputs can specialise on the different
    objects an ambiguous prompt may mean. The IoU head is trained on that mask too, or on all masks with
    `supervise_all_iou`.

    Args:
        pred_masks (`torch.Tensor` of shape `(batch, prompts, num_masks, height, width)`):
            Mask logits (SamModel's `pred_masks`).
        iou_scores (`torch.Tensor` of shape `(batch, prompts, num_masks)`):
            Predicted IoUs.
        ground_truth_masks (`torch.Tensor` of shape `(batch, prompts, height, width)`):
            Binary targets in the frame of `pred_masks`.
        focal_weight (`float`, *optional*, defaults to 20.0):
            Weight of the focal loss.
        dice_weight (`float`, *optional*, defaults to 1.0):
            Weight of the dice loss.
        iou_weight (`float`, *optional*, defaults to 1.0):
            Weight of the IoU prediction loss.
        focal_alpha (`float`, *optional*, defaults to 0.25):
            `alpha` of the focal loss.
        focal_gamma (`float`, *optional*, defaults to 2.0):
            `gamma` of the focal loss.
        supervise_all_iou (`bool`, *optional*, defaults to `False`):
            Whether to train the IoU prediction of every mask instead of the chosen one only.

    Returns:
        `SamLossOutput`. With no prompts at all every part is a zero that still depends on the inputs, so that a
        backward pass works.
    """
    if pred_masks.dim() != 5 or iou_scores.shape != pred_masks.shape[:3]:
        raise ValueError(
            "Expected pred_masks of shape (batch, prompts, num_masks, height, width) and iou_scores of shape "
            f"(batch, prompts, num_masks), got {tuple(pred_masks.shape)} and {tuple(iou_scores.shape)}."
        )
    if ground_truth_masks.shape != pred_masks.shape[:2] + pred_masks.shape[3:]:
        raise ValueError(
            f"Expected ground_truth_masks of shape {tuple(pred_masks.shape[:2] + pred_masks.shape[3:])} (batch, "
            f"prompts, height, width) to match pred_masks {tuple(pred_masks.shape)}, got "
            f"{tuple(ground_truth_masks.shape)}."
        )
    if pred_masks.shape[0] * pred_masks.shape[1] == 0:
        zero = pred_masks.sum() * 0 + iou_scores.sum() * 0
        indices = torch.zeros(pred_masks.shape[:2], dtype=torch.long, device=pred_masks.device)
        return SamLossOutput(zero, zero, zero, zero, indices)

    targets = ground_truth_masks.unsqueeze(2)
    focal = sigmoid_focal_loss(pred_masks, targets, alpha=focal_alpha, gamma=focal_gamma)
    dice = dice_loss(pred_masks, targets)
    iou_errors = iou_prediction_loss(iou_scores, pred_masks, targets)

    mask_indices = (focal_weight * focal + dice_weight * dice).argmin(dim=-1, keepdim=True)
    focal = focal.gather(-1, mask_indices).mean()
    dice = dice.gather(-1, mask_indices).mean()
    iou = iou_errors.mean() if supervise_all_iou else iou_errors.gather(-1, mask_indices).mean()
    loss = focal_weight * focal + dice_weight * dice + iou_weight * iou
    return SamLossOutput(loss, focal, dice, iou, mask_indices.squeeze(-1))


def mask_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "kl", temperature: float = 1.0
) -> torch.Tensor:
    """In-place distillation between student and teacher mask logits; the teacher is detached.

    `"kl"` (the default) is the per-pixel binary KL divergence `KL(sigmoid(t / T) || sigmoid(s / T))`, averaged over
    all pixels. Its gradient is that of binary cross-entropy against the teacher's probabilities, but it is 0 when
    the student matches the teacher, which makes it readable as a distance. It is bounded where the teacher is
    confident: SAM's logits reach tens in magnitude far from boundaries, where an MSE on logits would be dominated by
    differences that change no pixel. `"mse"` is the mean squared error on the logits, for comparison.

    Args:
        student_logits (`torch.Tensor` of shape `(..., height, width)`):
            Mask logits of the student (a smaller subnet).
        teacher_logits (`torch.Tensor` of the same shape):
            Mask logits of the teacher (the largest subnet, or the full-precision model).
        kind (`str`, *optional*, defaults to `"kl"`):
            `"kl"` or `"mse"`.
        temperature (`float`, *optional*, defaults to 1.0):
            Logits are divided by it before the sigmoid (`"kl"` only); the loss is multiplied by its square so that
            gradients keep their scale, as in Hinton et al.

    Returns:
        `torch.Tensor`: a scalar.
    """
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"Unknown distillation kind {kind!r}; choose one of {DISTILLATION_KINDS}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student and teacher logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
    teacher_logits = teacher_logits.detach()
    if kind == "mse":
        return F.mse_loss(student_logits, teacher_logits)
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    teacher_probabilities = torch.sigmoid(teacher_logits)
    cross_entropy = F.binary_cross_entropy_with_logits(student_logits, teacher_probabilities, reduction="none")
    teacher_entropy = F.binary_cross_entropy_with_logits(teacher_logits, teacher_probabilities, reduction="none")
    return (cross_entropy - teacher_entropy).mean() * temperature**2
