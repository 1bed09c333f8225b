"""Dataset-level class mean IoU of semantic segmentation (numpy only), as `evaluate`'s `mean_iou` defines it.

Intersection, union, predicted and reference areas are counted per class and summed over the whole dataset before
anything is divided: the figure is not a mean of per-image IoUs. Pixels whose reference is `ignore_index` are left
out; a class absent from every prediction and every reference has a NaN IoU and is skipped by the mean. This is the
definition of mmsegmentation's `mean_iou` that `evaluate`'s module follows (intersect-and-union per image, totals,
then `nanmean`). Two differences, both refusals: labels outside `[0, num_labels)` other than `ignore_index`, which
`evaluate` drops silently, raise a `ValueError` here; `label_map` is not offered (evaluate#810: it remaps in place).

`SemanticAreas` accumulates the counts batch by batch, so that a dataset's label maps never have to be held at once;
`mean_iou` is the one-call form, and the `mean_iou` evaluation module (`mpsupernet.load_metric("mean_iou")`) runs it.
"""

from collections.abc import Iterable

import numpy as np


def _label_map(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"A {name} must be a 2-D map of class indices (height, width), got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"A {name} must hold integer class indices, got values of dtype {array.dtype}.")
    return array.astype(np.int64)


def reduce_label_map(reference: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K's label reduction: class 0 ("other objects") becomes `ignore_index`, every other class moves down one.

    Args:
        reference (`np.ndarray` of shape `(height, width)`): integer labels; `ignore_index` stays as it is.
        ignore_index (`int`, *optional*, defaults to 255): the label left out of the metric.

    Returns:
        `np.ndarray` of int64, the same shape.
    """
    reference = np.asarray(reference, dtype=np.int64)
    return np.where((reference == 0) | (reference == ignore_index), ignore_index, reference - 1)


def intersect_and_union(
    prediction, reference, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel counts of one predicted label map against its reference.

    Args:
        prediction (array-like of shape `(height, width)`): predicted class indices in `[0, num_labels)`.
        reference (array-like of shape `(height, width)`): reference class indices in `[0, num_labels)`, or
            `ignore_index` for pixels left out (before the reduction when `reduce_labels`).
        num_labels (`int`): number of classes.
        ignore_index (`int`, *optional*, defaults to 255): reference label of the pixels left out.
        reduce_labels (`bool`, *optional*, defaults to `False`): apply `reduce_label_map` to the reference first
            (class 0 becomes `ignore_index`; `evaluate` hard-codes 255 there, the same with the default).

    Returns:
        `(area_intersect, area_union, area_prediction, area_reference)`: four int64 arrays of shape `(num_labels,)`.

    Raises:
        `ValueError`: maps of different shapes, non-integer labels, or a label outside `[0, num_labels)` that is not
        `ignore_index` (the message names the values found).
    """
    prediction = _label_map(prediction, "prediction")
    reference = _label_map(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(
            f"A prediction of shape {prediction.shape} was given for a reference of shape {reference.shape}; "
            "predictions must have their reference's size (resize the logits before the argmax)."
        )
    if reduce_labels:
        reference = reduce_label_map(reference, ignore_index)
    scored = reference != ignore_index
    prediction, reference = prediction[scored], reference[scored]
    for values, name in ((reference, "reference"), (prediction, "prediction")):
        outside = np.unique(values[(values < 0) | (values >= num_labels)])
        if outside.size:
            raise ValueError(
                f"The {name} holds the labels {outside[:10].tolist()}, outside [0, {num_labels}) (num_labels="
                f"{num_labels}, ignore_index={ignore_index}, reduce_labels={reduce_labels})."
            )
    area_intersect = np.bincount(prediction[prediction == reference], minlength=num_labels)
    area_prediction = np.bincount(prediction, minlength=num_labels)
    area_reference = np.bincount(reference, minlength=num_labels)
    return area_intersect, area_prediction + area_reference - area_intersect, area_prediction, area_reference


class SemanticAreas:
    """Per-class areas summed over a dataset, fed one label map (or a batch of them) at a time.

    Args:
        num_labels (`int`): number of classes (at least 1).
        ignore_index (`int`, *optional*, defaults to 255): reference label of the pixels left out.
        reduce_labels (`bool`, *optional*, defaults to `False`): reduce every reference (`reduce_label_map`).

    Example: `areas = SemanticAreas(3); areas.update(predictions, references); areas.compute()["mean_iou"]`.
    The four totals are plain arrays (`area_intersect`, ...): in a distributed run, sum them across processes
    before `compute`.
    """

    def __init__(self, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False):
        if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
            raise ValueError(f"`num_labels` must be a positive integer, got {num_labels!r}.")
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.reduce_labels = bool(reduce_labels)
        self.area_intersect = np.zeros(self.num_labels, dtype=np.int64)
        self.area_union = np.zeros(self.num_labels, dtype=np.int64)
        self.area_prediction = np.zeros(self.num_labels, dtype=np.int64)
        self.area_reference = np.zeros(self.num_labels, dtype=np.int64)

    def update(self, predictions: Iterable, references: Iterable) -> None:
        """Adds a batch of label maps: sequences of `(height, width)` maps, or `(batch, height, width)` arrays.

        A refused batch (see `intersect_and_union`) adds nothing.
        """
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
        counts = [
            intersect_and_union(p, r, self.num_labels, self.ignore_index, self.reduce_labels)
            for p, r in zip(predictions, references)
        ]
        for intersect, union, prediction, reference in counts:
            self.area_intersect += intersect
            self.area_union += union
            self.area_prediction += prediction
            self.area_reference += reference

    def compute(self, nan_to_num: float | None = None) -> dict[str, float | np.ndarray]:
        """The metrics of everything seen so far.

        Args:
            nan_to_num (`float`, *optional*): replaces NaN in every result (a class absent everywhere), as
                `evaluate`'s `mean_iou` does.

        Returns:
            `dict` with `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats; NaN when nothing was scored) and
            `per_category_iou`, `per_category_accuracy` (float64 arrays of shape `(num_labels,)`, NaN for a class
            with no union, respectively no reference pixel). Accuracy of a class is its intersection over its
            reference area (recall); the overall accuracy is the scored pixels predicted right.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.area_intersect / self.area_union
            accuracy = self.area_intersect / self.area_reference
            overall = self.area_intersect.sum() / self.area_reference.sum()
        results = {
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan"),
            "overall_accuracy": float(overall),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
        if nan_to_num is not None:
            results = {name: _nan_to_num(value, nan_to_num) for name, value in results.items()}
        return results


def _nan_to_num(value, nan: float):
    replaced = np.nan_to_num(value, nan=nan)
    return float(replaced) if np.ndim(replaced) == 0 else replaced


def mean_iou(
    predictions: Iterable,
    references: Iterable,
    num_labels: int,
    ignore_index: int = 255,
    reduce_labels: bool = False,
    nan_to_num: float | None = None,
) -> dict[str, float | np.ndarray]:
    """Dataset-level class mean IoU of predicted label maps against their references.

    Args:
        predictions, references: sequences of `(height, width)` integer label maps, pairwise of the same size.
        num_labels, ignore_index, reduce_labels: see `SemanticAreas`.
        nan_to_num: see `SemanticAreas.compute`.

    Returns:
        `dict`: see `SemanticAreas.compute`.

    Example:
        >>> mean_iou([[[0, 1], [1, 1]]], [[[0, 1], [255, 0]]], num_labels=2)["per_category_iou"].tolist()
        [0.5, 0.5]
    """
    areas = SemanticAreas(num_labels, ignore_index, reduce_labels)
    areas.update(predictions, references)
    return areas.compute(nan_to_num)


__all__ = ["SemanticAreas", "intersect_and_union", "mean_iou", "reduce_label_map"]
