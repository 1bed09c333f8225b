"""`mask_ap`: COCO mask AP of instance segmentation (pycocotools), as an `evaluate` metric shipped with mpsupernet.

Loaded by `mpsupernet.load_metric("mask_ap")` from this file (no download). The computation is
`mpsupernet.metrics.instance.coco_mask_ap`; this module only gives it `evaluate`'s interface.
"""

import datasets
import evaluate

from mpsupernet.metrics.instance import coco_mask_ap
from mpsupernet.metrics.loading import metric_info


_DESCRIPTION = """
COCO mask average precision and recall (`COCOeval(..., "segm")`: IoU thresholds 0.50:0.05:0.95, at most 1/10/100
detections per image, small/medium/large objects by mask area). One example is one image: its predicted instances
(masks as COCO RLEs, a score and a category each) and its reference instances.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[dict]`): per image, `image_id` (int), `segmentation` (list of `{"size": [height, width],
        "counts": str}` RLEs, see `mpsupernet.metrics.encode_masks`), `score` (list of floats), `category_id` (list
        of ints).
    references (`List[dict]`): per image, `image_id`, `segmentation`, `category_id` and `iscrowd` (list of 0/1).
Returns:
    `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_1`, `mar_10`, `mar_100`, `mar_small`,
    `mar_medium`, `mar_large` (NaN where COCO gives -1), `num_images`, `num_references`, `num_predictions`.
"""

_RLE = {"size": datasets.List(datasets.Value("int64")), "counts": datasets.Value("string")}


class MaskAP(evaluate.Metric):
    def _info(self):
        features = {
            "predictions": {
                "image_id": datasets.Value("int64"),
                "segmentation": datasets.List(_RLE),
                "score": datasets.List(datasets.Value("float64")),
                "category_id": datasets.List(datasets.Value("int64")),
            },
            "references": {
                "image_id": datasets.Value("int64"),
                "segmentation": datasets.List(_RLE),
                "category_id": datasets.List(datasets.Value("int64")),
                "iscrowd": datasets.List(datasets.Value("int64")),
            },
        }
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, features, ["https://cocodataset.org/#detection-eval"])

    def _compute(self, predictions, references):
        return coco_mask_ap(predictions, references)
