import math

import numpy as np
import pytest
import torch

from mpsupernet.training import (
    SamLossOutput,
    dice_loss,
    iou_prediction_loss,
    mask_distillation_loss,
    sam_loss,
    sigmoid_focal_loss,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reference_focal(logits: np.ndarray, targets: np.ndarray, alpha: float, gamma: float) -> float:
    """Plain per-pixel formula of the focal loss, averaged over one mask."""
    total = 0.0
    for x, t in zip(logits.ravel(), targets.ravel()):
        p = sigmoid(x)
        p_t = p if t else 1 - p
        alpha_t = alpha if t else 1 - alpha
        total += -alpha_t * (1 - p_t) ** gamma * math.log(p_t)
    return total / logits.size


def reference_dice(logits: np.ndarray, targets: np.ndarray) -> float:
    p = 1 / (1 + np.exp(-logits))
    return 1 - (2 * (p * targets).sum() + 1) / (p.sum() + targets.sum() + 1)


def random_case(seed=0, shape=(2, 3, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    targets = (torch.rand(shape, generator=generator) > 0.6).double()
    return logits, targets


def test_focal_loss_matches_the_formula():
    logits, targets = random_case()
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    assert loss.shape == (2, 3)
    for index in np.ndindex(2, 3):
        expected = reference_focal(logits[index].numpy(), targets[index].numpy(), 0.25, 2.0)
        assert loss[index].item() == pytest.approx(expected, rel=1e-9)


def test_focal_loss_reduces_to_cross_entropy():
    logits, targets = random_case(1)
    plain = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((-2, -1))
    assert torch.allclose(plain, expected)


def test_focal_and_dice_at_perfect_and_opposite_predictions():
    targets = torch.zeros(1, 16, 16)
    targets[:, 4:12, 4:12] = 1
    perfect = (targets * 2 - 1) * 40
    assert sigmoid_focal_loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-12)
    assert dice_loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-6)
    opposite = -perfect
    # Nothing shared, and all 256 pixels counted once (64 target, 192 predicted): 1 - 1 / 257.
    assert dice_loss(opposite, targets).item() == pytest.approx(1 - 1 / 257, abs=1e-6)
    # Opposite predictions cost alpha_t * 40 per pixel (|log sigmoid(-40)| ~ 40).
    expected = (0.25 * 64 + 0.75 * 192) * 40 / 256
    assert sigmoid_focal_loss(opposite, targets).item() == pytest.approx(expected, rel=1e-6)
    # An empty target predicted empty costs nothing, and is not NaN.
    assert dice_loss(torch.full((1, 4, 4), -40.0), torch.zeros(1, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_matches_the_formula():
    logits, targets = random_case(2)
    loss = dice_loss(logits, targets)
    for index in np.ndindex(2, 3):
        assert loss[index].item() == pytest.approx(reference_dice(logits[index].numpy(), targets[index].numpy()))


def test_iou_prediction_loss_uses_detached_actual_iou():
    logits, targets = random_case(3)
    logits.requires_grad_(True)
    predictions = torch.full((2, 3), 0.5, dtype=torch.float64, requires_grad=True)
    loss = iou_prediction_loss(predictions, logits, targets)
    predicted, target = logits.detach().numpy() > 0, targets.numpy() > 0
    for index in np.ndindex(2, 3):
        actual = (predicted[index] & target[index]).sum() / (predicted[index] | target[index]).sum()
        assert loss[index].item() == pytest.approx((0.5 - actual) ** 2)
    loss.sum().backward()
    assert logits.grad is None
    assert predictions.grad.abs().sum() > 0


def test_sam_loss_weights_and_single_mask():
    logits, targets = random_case(4, shape=(2, 3, 1, 8, 8))
    iou_scores = torch.rand(2, 3, 1, dtype=torch.float64)
    output = sam_loss(logits, iou_scores, targets[:, :, 0])
    assert isinstance(output, SamLossOutput)
    assert output.focal_loss.item() == pytest.approx(sigmoid_focal_loss(logits, targets).mean().item())
    assert output.dice_loss.item() == pytest.approx(dice_loss(logits, targets).mean().item())
    assert output.iou_loss.item() == pytest.approx(iou_prediction_loss(iou_scores, logits, targets).mean().item())
    total = 20 * output.focal_loss + output.dice_loss + output.iou_loss
    assert output.loss.item() == pytest.approx(total.item())
    custom = sam_loss(logits, iou_scores, targets[:, :, 0], focal_weight=1.0, dice_weight=2.0, iou_weight=0.0)
    assert custom.loss.item() == pytest.approx((output.focal_loss + 2 * output.dice_loss).item())
    assert output.mask_indices.shape == (2, 3) and (output.mask_indices == 0).all()


def test_sam_loss_trains_only_the_best_of_several_masks():
    targets = torch.zeros(1, 2, 8, 8)
    targets[0, 0, 2:6, 2:6] = 1
    targets[0, 1, 0:3, :] = 1
    wrong = torch.randn(1, 2, 3, 8, 8) * 5
    logits = wrong.clone()
    logits[0, 0, 2] = (targets[0, 0] * 2 - 1) * 30  # prompt 0: mask 2 is right
    logits[0, 1, 1] = (targets[0, 1] * 2 - 1) * 30  # prompt 1: mask 1 is right
    logits.requires_grad_(True)
    iou_scores = torch.tensor([[[0.2, 0.3, 0.9], [0.1, 0.7, 0.4]]], requires_grad=True)
    output = sam_loss(logits, iou_scores, targets)
    assert output.mask_indices.tolist() == [[2, 1]]
    assert output.focal_loss.item() == pytest.approx(0.0, abs=1e-9)
    assert output.dice_loss.item() == pytest.approx(0.0, abs=1e-6)
    # The chosen masks have IoU 1: the IoU loss is the error of their predictions only.
    assert output.iou_loss.item() == pytest.approx(((0.9 - 1) ** 2 + (0.7 - 1) ** 2) / 2, rel=1e-5)
    output.loss.backward()
    chosen = torch.zeros(1, 2, 3, dtype=torch.bool)
    chosen[0, 0, 2] = chosen[0, 1, 1] = True
    assert (logits.grad[~chosen] == 0).all()
    assert (iou_scores.grad[~chosen] == 0).all()
    all_iou = sam_loss(logits, iou_scores, targets, supervise_all_iou=True)
    predicted, target = logits.detach().numpy() > 0, targets.numpy()[:, :, None] > 0
    actual = (predicted & target).sum((-2, -1)) / (predicted | target).sum((-2, -1))
    expected = ((iou_scores.detach().numpy() - actual) ** 2).mean()
    assert all_iou.iou_loss.item() == pytest.approx(expected, rel=1e-5)


def test_sam_loss_without_prompts_is_zero_and_backpropagates():
    logits = torch.randn(2, 0, 3, 8, 8, requires_grad=True)
    iou_scores = torch.rand(2, 0, 3, requires_grad=True)
    output = sam_loss(logits, iou_scores, torch.zeros(2, 0, 8, 8))
    assert output.loss.item() == 0.0 and not torch.isnan(output.loss)
    output.loss.backward()


def test_sam_loss_shape_errors():
    with pytest.raises(ValueError, match=r"ground_truth_masks of shape \(1, 2, 8, 8\).*got \(1, 2, 4, 4\)"):
        sam_loss(torch.zeros(1, 2, 1, 8, 8), torch.zeros(1, 2, 1), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"got \(1, 2, 8, 8\) and \(1, 2\)"):
        sam_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2), torch.zeros(1, 2, 8, 8))


def test_distillation_kl_matches_the_formula_and_detaches_the_teacher():
    student, _ = random_case(5)
    teacher, _ = random_case(6)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = mask_distillation_loss(student, teacher)
    p = torch.sigmoid(teacher.detach())
    q = torch.sigmoid(student.detach())
    expected = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert mask_distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # Its gradient is that of cross-entropy against the teacher's probabilities: (sigmoid(s) - sigmoid(t)) / n.
    assert torch.allclose(student.grad, (q - p) / student.numel())


def test_distillation_mse_and_temperature():
    student, _ = random_case(7)
    teacher, _ = random_case(8)
    assert mask_distillation_loss(student, teacher, kind="mse").item() == pytest.approx(
        ((student - teacher) ** 2).mean().item()
    )
    warm = mask_distillation_loss(student, teacher, temperature=2.0)
    assert warm.item() == pytest.approx(4 * mask_distillation_loss(student / 2, teacher / 2).item())
    with pytest.raises(ValueError, match="Unknown distillation kind 'l1'"):
        mask_distillation_loss(student, teacher, kind="l1")
    with pytest.raises(ValueError, match="same shape"):
        mask_distillation_loss(student, teacher[:1])
    with pytest.raises(ValueError, match="positive, got 0"):
        mask_distillation_loss(student, teacher, temperature=0)
