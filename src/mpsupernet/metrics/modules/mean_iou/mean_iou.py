"""`mean_iou`: dataset-level class mean IoU of semantic segmentation, as an `evaluate` metric shipped with mpsupernet.

Loaded by `mpsupernet.load_metric("mean_iou")` from this file (no download). The computation is
`mpsupernet.metrics.semantic.mean_iou`; this module only gives it `evaluate`'s interface.
"""

import evaluate

from mpsupernet.metrics.loading import map_features, metric_info
from mpsupernet.metrics.semantic import mean_iou


_DESCRIPTION = """
Class mean intersection over union of semantic label maps, as evaluate's `mean_iou` defines it: per-class
intersection, union, predicted and reference areas are summed over the whole dataset, then divided; pixels whose
reference is `ignore_index` are left out, and a class absent from every prediction and reference is skipped by the
means. Labels outside [0, num_labels) other than `ignore_index` are refused (evaluate drops them silently).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): predicted label maps, each `(height, width)` of class indices.
    references (`List[ndarray]`): reference label maps of the same sizes.
    num_labels (`int`): number of classes.
    ignore_index (`int`, defaults to 255): reference label of the pixels left out.
    reduce_labels (`bool`, defaults to `False`): ADE20K's reduction of the references (0 becomes `ignore_index`,
        every other label moves down one).
    nan_to_num (`float`, *optional*): replaces NaN in the results.
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`, `per_category_accuracy`
    (arrays of shape `(num_labels,)`, NaN for a class with no union, respectively no reference pixel).
Example:
    >>> metric = mpsupernet.load_metric("mean_iou")
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 0]]], num_labels=2)["mean_iou"]
    0.25
"""


class MeanIoU(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _KWARGS_DESCRIPTION,
            map_features("int32"),
            ["https://huggingface.co/spaces/evaluate-metric/mean_iou"],
        )

    def _compute(self, predictions, references, num_labels, ignore_index=255, reduce_labels=False, nan_to_num=None):
        return mean_iou(predictions, references, num_labels, ignore_index, reduce_labels, nan_to_num)
