import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader
from transformers import SamModel

from mpsupernet.data import SamSegmentationPreprocessor, collate_fn, make_synthetic_segmentation_dataset
from mpsupernet.metrics import MeanMaskIoU, evaluate_dataset_mean_iou, evaluate_mean_iou, mask_iou, select_masks
from mpsupernet.testing_utils import make_sam_config


def numpy_iou(logits: np.ndarray, target: np.ndarray) -> float:
    predicted = set(zip(*np.nonzero(logits > 0)))
    truth = set(zip(*np.nonzero(target > 0)))
    union = predicted | truth
    return len(predicted & truth) / len(union) if union else 1.0


def test_mask_iou_matches_set_counts():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 12, 12, generator=generator)
    targets = (torch.rand(3, 4, 12, 12, generator=generator) > 0.5).float()
    ious = mask_iou(logits, targets)
    assert ious.shape == (3, 4)
    for index in np.ndindex(3, 4):
        assert ious[index].item() == pytest.approx(numpy_iou(logits[index].numpy(), targets[index].numpy()))


def test_mask_iou_of_empty_targets_is_never_nan():
    empty = torch.zeros(2, 5, 5)
    predictions = torch.full((2, 5, 5), -3.0)
    predictions[1, 0, 0] = 3.0
    assert mask_iou(predictions, empty).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"same shape, got \(2, 5, 5\) and \(2, 4, 4\)"):
        mask_iou(predictions, torch.zeros(2, 4, 4))


def test_mean_mask_iou_accumulates_over_batches():
    generator = torch.Generator().manual_seed(1)
    metric = MeanMaskIoU()
    all_ious = []
    for size in (1, 3, 2):
        logits = torch.randn(size, 2, 8, 8, generator=generator)
        targets = (torch.rand(size, 2, 8, 8, generator=generator) > 0.5).float()
        metric.update(logits, targets)
        all_ious += [numpy_iou(p.numpy(), t.numpy()) for p, t in zip(logits.flatten(0, 1), targets.flatten(0, 1))]
    assert metric.compute().item() == pytest.approx(np.mean(all_ious), rel=1e-6)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())


def test_select_masks_takes_the_highest_predicted_iou():
    pred_masks = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 2, 2)
    iou_scores = torch.tensor([[[0.1, 0.9, 0.2], [0.8, 0.1, 0.3]]])
    selected = select_masks(pred_masks, iou_scores)
    assert torch.equal(selected[0, 0], pred_masks[0, 0, 1]) and torch.equal(selected[0, 1], pred_masks[0, 1, 0])


class FixedModel(torch.nn.Module):
    """Predicts, for every prompt, the target of a fixed table shifted by one column (a known IoU)."""

    def __init__(self, num_masks: int = 1):
        super().__init__()
        self.num_masks = num_masks
        self.calls = []

    def forward(self, pixel_values, input_boxes, multimask_output):
        self.calls.append((self.training, multimask_output))
        batch, prompts = input_boxes.shape[:2]
        masks = torch.full((batch, prompts, self.num_masks, 4, 4), -1.0)
        masks[..., :2] = 1.0  # columns 0-1
        iou_scores = torch.zeros(batch, prompts, self.num_masks)
        if self.num_masks > 1:
            masks[:, :, 0] = 1.0  # a worse mask with a lower predicted IoU
            iou_scores[:, :, 1] = 1.0
        return {"pred_masks": masks, "iou_scores": iou_scores}


def fixed_batches():
    target = torch.zeros(4, 4)
    target[:, 1:3] = 1  # columns 1-2: IoU with columns 0-1 is 1/3
    batch = {
        "pixel_values": torch.zeros(2, 3, 16, 16),
        "input_boxes": torch.zeros(2, 2, 4),
        "ground_truth_masks": target.expand(2, 2, 4, 4).clone(),
    }
    perfect = dict(batch, ground_truth_masks=torch.zeros(2, 2, 4, 4))
    perfect["ground_truth_masks"][..., :2] = 1
    return [batch, {}, perfect]  # the empty batch stands for one whose examples were all skipped


def test_evaluate_mean_iou_with_a_known_model():
    model = FixedModel().train()
    value = evaluate_mean_iou(model, fixed_batches(), show_progress=False)
    assert value == pytest.approx((4 * (1 / 3) + 4 * 1.0) / 8)
    assert model.training and model.calls == [(False, False), (False, False)]
    assert evaluate_mean_iou(model, fixed_batches(), max_batches=1, show_progress=False) == pytest.approx(1 / 3)
    multimask = evaluate_mean_iou(FixedModel(num_masks=3), fixed_batches(), multimask_output=True, show_progress=False)
    assert multimask == pytest.approx(value)


def test_evaluate_mean_iou_runs_a_sam_model():
    config = make_sam_config(image_size=64, patch_size=8)
    dataset = make_synthetic_segmentation_dataset(4, image_size=48, seed=2)
    dataset.set_transform(SamSegmentationPreprocessor(config, prompts_per_image=2))
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    value = evaluate_mean_iou(SamModel(config), loader, multimask_output=True, show_progress=False)
    assert 0.0 <= value <= 1.0


def test_evaluate_dataset_mean_iou_averages_every_prompt(tiny_sam, tiny_supernet):
    dataset = make_synthetic_segmentation_dataset(5, image_size=tiny_sam.config.vision_config.image_size, seed=3)
    value = evaluate_dataset_mean_iou(tiny_sam, dataset, seed=1, prompts_per_image=2, batch_size=2)
    # The same prompts one image at a time, scored by set counting.
    preprocessor = SamSegmentationPreprocessor(tiny_sam.config, prompts_per_image=2, seed=1)
    ious = []
    for batch in DataLoader(dataset.with_transform(preprocessor), batch_size=1, collate_fn=collate_fn):
        with torch.no_grad():
            logits = tiny_sam(
                pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False
            ).pred_masks[0, :, 0]
        ious += [numpy_iou(p.numpy(), t.numpy()) for p, t in zip(logits, batch["ground_truth_masks"][0])]
    assert len(ious) == 10 and value == pytest.approx(np.mean(ious), abs=1e-6)
    # A supernet with its full-precision subnet active is the same SAM and sees the same prompts.
    tiny_supernet.set_subnet(tiny_supernet.full_precision_subnet())
    assert evaluate_dataset_mean_iou(tiny_supernet, dataset, seed=1, prompts_per_image=2) == pytest.approx(value)


def _distributed_worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Rank 0 sees 3 masks, rank 1 one mask: the global mean differs from the mean of the two means.
        logits = torch.full((3, 4, 4), -1.0) if rank == 0 else torch.full((1, 4, 4), -1.0)
        targets = torch.zeros_like(logits)
        if rank == 0:
            logits[0, :2] = 1.0
            targets[0, :1] = 1.0  # IoU 1/2; the two others are empty/empty: IoU 1
        else:
            logits[0, 0, 0] = 1.0
            targets[0, 1, 1] = 1.0  # IoU 0
        metric = MeanMaskIoU()
        metric.update(logits, targets)
        value = metric.compute().item()
        with open(os.path.join(results, f"rank{rank}.txt"), "w") as handle:
            handle.write(repr(value))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 8 s alone on 2 cores (two interpreters importing torch), over 20 s on a busy machine
def test_mean_mask_iou_syncs_across_processes(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    values = [float((tmp_path / f"rank{rank}.txt").read_text()) for rank in range(2)]
    assert values == pytest.approx([(0.5 + 1 + 1 + 0) / 4] * 2)
