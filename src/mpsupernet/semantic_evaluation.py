"""Dataset-level class mean IoU of a semantic segmentation model, as `evaluate`'s `mean_iou` defines it.

Intersections and unions are summed over the whole dataset (a confusion matrix), then divided: not a mean of
per-image IoUs. Pixels labelled with the ignore index are dropped; a class absent from both predictions and labels
everywhere is skipped in the mean. The logits are reduced to class ids on each process before anything is gathered,
and only the `num_labels x num_labels` matrix is summed across processes (a torchmetrics state).
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from tqdm.auto import tqdm


class ClassConfusionMatrix(Metric):
    """Confusion matrix of class maps, `matrix[label, prediction]` pixel counts, summed across processes.

    Args:
        num_labels (`int`): the classes, ids `0..num_labels - 1`.
        ignore_index (`int`, *optional*, defaults to 255): the label of pixels not counted.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_labels: int, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_labels, self.ignore_index = num_labels, ignore_index
        self.add_state("matrix", default=torch.zeros(num_labels, num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds class maps `predictions` against `labels`, both `(batch, height, width)` integer ids."""
        valid = labels != self.ignore_index
        index = labels[valid].long() * self.num_labels + predictions[valid].long()
        self.matrix += torch.bincount(index, minlength=self.num_labels**2).reshape(self.num_labels, self.num_labels)

    def compute(self) -> dict[str, Any]:
        return class_mean_iou(self.matrix)


def class_mean_iou(matrix: torch.Tensor) -> dict[str, Any]:
    """`mean_iou`, `mean_accuracy`, `overall_accuracy`, `per_category_iou`, `per_category_accuracy` of a confusion
    matrix (`matrix[label, prediction]`), with NaN for classes absent from both labels and predictions (per-category
    accuracy: absent from the labels), which the means skip.

    To be replaced by `mpsupernet.load_metric("mean_iou")` once the package ships its `evaluate` modules.
    """
    matrix = matrix.double()
    intersection = matrix.diagonal()
    labelled = matrix.sum(dim=1)
    union = labelled + matrix.sum(dim=0) - intersection
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
    accuracy = torch.where(labelled > 0, intersection / labelled.clamp(min=1), nan)
    total = labelled.sum()
    return {
        "mean_iou": float(iou.nanmean()),
        "mean_accuracy": float(accuracy.nanmean()),
        "overall_accuracy": float(intersection.sum() / total) if total > 0 else float("nan"),
        "per_category_iou": iou.tolist(),
        "per_category_accuracy": accuracy.tolist(),
    }


def class_predictions(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class ids `(batch, *size)` from class logits: upsampled (bilinear) to the labels' size, then the argmax."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate_class_mean_iou(
    model,
    dataloader: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    show_progress: bool = True,
    description: str = "Evaluating class mIoU",
    **_: Any,
) -> dict[str, Any]:
    """Runs a semantic segmentation model over a dataloader; returns the dataset-level class mIoU and its parts.

    In a distributed run, give each process its shard of the data: the confusion matrices are summed across processes.

    Args:
        model: called as `model(pixel_values=...)`, returning `logits` `(batch, num_labels, h, w)`; its config gives
            `num_labels` and `semantic_loss_ignore_index`.
        dataloader: batches with `pixel_values` and `labels` (`mpsupernet.data.SemanticSegmentationPreprocessor` and
            `collate_fn`).
        device (*optional*): for the inputs; defaults to the model's.
        max_batches (`int`, *optional*): stop after this many batches.
        show_progress (`bool`), description (`str`): the progress bar.

    Returns:
        `dict`: see [`class_mean_iou`].
    """
    config = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    metric = ClassConfusionMatrix(config.num_labels, config.semantic_loss_ignore_index).to(device)
    was_training = model.training
    model.eval()
    try:
        for step, batch in enumerate(tqdm(dataloader, desc=description, disable=not show_progress)):
            if max_batches is not None and step >= max_batches:
                break
            if not batch:
                continue
            labels = batch["labels"].to(device)
            logits = model(pixel_values=batch["pixel_values"].to(device)).logits
            metric.update(class_predictions(logits, labels.shape[-2:]), labels)
        return metric.compute()
    finally:
        model.train(was_training)




def evaluate_dataset_class_mean_iou(model, dataset, batch_size: int = 8, **evaluate_kwargs) -> dict[str, Any]:
    """[`evaluate_class_mean_iou`] on a dataset in the semantic schema (`image`, `annotation`), preprocessed with
    `mpsupernet.data.SemanticSegmentationPreprocessor` at the model's input size."""
    from torch.utils.data import DataLoader

    from .data import SemanticSegmentationPreprocessor, collate_fn

    loader = DataLoader(
        dataset.with_transform(SemanticSegmentationPreprocessor(model.config)), batch_size=batch_size, collate_fn=collate_fn
    )
    return evaluate_class_mean_iou(model, loader, **{"show_progress": False, **evaluate_kwargs})


__all__ = [
    "ClassConfusionMatrix",
    "class_mean_iou",
    "class_predictions",
    "evaluate_class_mean_iou",
    "evaluate_dataset_class_mean_iou",
]
