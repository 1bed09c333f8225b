"""`mask_iou`: mean IoU over the masks of a promptable segmenter, as an `evaluate` metric shipped with mpsupernet.

Loaded by `mpsupernet.load_metric("mask_iou")` from this file (no download). The computation is
`mpsupernet.metrics.mask.mask_iou`, the IoU of every evaluation loop of the package; this module only gives it
`evaluate`'s interface.
"""

import evaluate
import numpy as np
import torch

from mpsupernet.metrics.loading import map_features, metric_info
from mpsupernet.metrics.mask import mask_iou


_DESCRIPTION = """
Mean mask IoU of a promptable segmenter such as SAM: one predicted mask per prompt against that prompt's reference
mask, IoU per mask, then the mean over all masks (each prompt counts once, as in SAM's and its followers' mIoU with
box prompts). A mask whose prediction and reference are both empty counts as IoU 1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): one `(height, width)` mask per prompt: logits, or 0/1 (foreground where the value is
        above `threshold`).
    references (`List[ndarray]`): the reference masks, the same sizes (non-zero is foreground).
    threshold (`float`, defaults to 0.0): threshold of the predictions (0 is probability one half for logits).
Returns:
    `mean_iou` (float, NaN without masks), `num_masks` (int) and `per_mask_iou` (array of shape `(num_masks,)`).
Example:
    >>> metric = mpsupernet.load_metric("mask_iou")
    >>> metric.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])["mean_iou"]
    0.5
"""


class MaskIoU(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, map_features("float32"))

    def _compute(self, predictions, references, threshold=0.0):
        ious = np.array(
            [
                float(mask_iou(torch.tensor(prediction), torch.tensor(reference), threshold))
                for prediction, reference in zip(predictions, references)
            ]
        )
        mean = float(ious.mean()) if ious.size else float("nan")
        return {"mean_iou": mean, "num_masks": int(ious.size), "per_mask_iou": ious}
