"""Losses of class segmentation: cross-entropy plus Dice on class logits, and in-place distillation of class logits.

The logits are `(batch, num_labels, h, w)`, usually at SAM's low resolution (a quarter of the input); labels are
`(batch, H, W)` class ids with an ignore index. As transformers' semantic models do, the logits are upsampled
(bilinear) to the labels' size before the loss, so every labelled pixel counts once. Ignored pixels count nowhere:
not in the cross-entropy's mean (its denominator is the number of labelled pixels, never the number of pixels) and not
in the Dice sums.
"""

import torch
import torch.nn.functional as F

CROSS_ENTROPY_WEIGHT = 0.2
DICE_WEIGHT = 0.8
"""SAMed's weights (arXiv 2304.13785: `0.2 * CE + 0.8 * Dice`), which it found best for SAM's decoder as a class head."""


def check_semantic_labels(labels: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    """Refuses labels that are not class ids of the model or its ignore index.

    Raises:
        `ValueError`: naming the first offending value, the classes and the ignore index; or the shape, if the labels
        are not `(batch, height, width)` integers.
    """
    if labels.dim() != 3 or labels.dtype.is_floating_point:
        raise ValueError(
            f"`labels` must be integer class ids of shape (batch, height, width), got {tuple(labels.shape)} "
            f"{labels.dtype}."
        )
    bad = (labels < 0) | (labels >= num_labels) & (labels != ignore_index)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"`labels` holds {value}, which is no class of this model: allowed are 0 to {num_labels - 1} "
            f"(`num_labels={num_labels}`) and the ignore index {ignore_index}. A dataset with other ids needs its "
            "labels reduced or remapped (ADE20K: `mpsupernet.data.reduce_ade20k_labels`)."
        )


def _upsampled(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def semantic_segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    cross_entropy_weight: float = CROSS_ENTROPY_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
    smooth: float = 1.0,
) -> torch.Tensor:
    """`cross_entropy_weight * CE + dice_weight * Dice` of class logits against a label map (SAMed's loss).

    The cross-entropy is averaged over the labelled pixels of the batch. The Dice loss is computed per class over the
    labelled pixels of the whole batch, `1 - (2 Σ p·t + s) / (Σ p + Σ t + s)` with `p` the softmax probability and
    `t` the one-hot label, then averaged over the classes. A batch without any labelled pixel gives a zero loss that
    still depends on the logits (so a distributed step sees every parameter used).

    Args:
        logits (`torch.Tensor` of shape `(batch, num_labels, h, w)`): class logits, upsampled to the labels' size.
        labels (`torch.LongTensor` of shape `(batch, H, W)`): class ids, `ignore_index` for ignored pixels.
        ignore_index (`int`, *optional*, defaults to 255): the label of ignored pixels.
        cross_entropy_weight (`float`), dice_weight (`float`): the weights of the two terms.
        smooth (`float`, *optional*, defaults to 1.0): keeps an absent class predicted absent at zero Dice loss.

    Returns:
        `torch.Tensor`: a scalar.
    """
    logits = _upsampled(logits, labels.shape[-2:]).float()
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    probabilities = logits.softmax(dim=1) * valid.unsqueeze(1)
    one_hot = F.one_hot(labels.masked_fill(~valid, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid.unsqueeze(1)
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = 1 - (2 * intersection + smooth) / (total + smooth)
    return cross_entropy_weight * cross_entropy + dice_weight * dice.mean()


def class_logits_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """In-place distillation on class logits: KL(teacher ‖ student) of the per-pixel class distributions.

    Averaged over pixels (batch and space) and scaled by `temperature²`, as in Hinton et al. (2015); the teacher is
    detached.

    Args:
        student, teacher (`torch.Tensor` of shape `(batch, num_labels, h, w)`): class logits of the same shape.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Student and teacher logits differ in shape: {tuple(student.shape)} vs {tuple(teacher.shape)}.")
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return kl.mean() * temperature**2


__all__ = ["check_semantic_labels", "class_logits_distillation_loss", "semantic_segmentation_loss"]
