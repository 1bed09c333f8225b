"""Metrics of the package: the masks' IoU, the evaluation loops, and the `evaluate` modules of `load_metric`.

Rooms: `mask` (mask IoU and a streaming mean that syncs across processes; torch only), `semantic` (dataset-level
class mIoU; numpy only), `evaluation` (the loops: the promptable model's mIoU over a dataloader or a dataset and the
semantic model's class mIoU, of a model or of one subnet of a supernet), `instance` (COCO mask AP, and the promptable
model's AP with box prompts), `loading` (`load_metric`, the `evaluate` modules shipped in `modules/`). The
torch-only and numpy-only names load eagerly; the others (which import the data pipeline, `evaluate` or pycocotools)
on first use.
"""

from .._lazy import lazy_attributes
from .mask import MeanMaskIoU, mask_iou, select_masks
from .semantic import SemanticAreas, intersect_and_union, mean_iou, reduce_label_map


_LAZY_NAMES = {
    "evaluate_dataset_mean_iou": "evaluation",
    "evaluate_dataset_semantic_mean_iou": "evaluation",
    "evaluate_mean_iou": "evaluation",
    "evaluate_real3_mean_iou": "evaluation",
    "evaluate_semantic_mean_iou": "evaluation",
    "evaluating": "evaluation",
    "COCO_STAT_NAMES": "instance",
    "GROUND_TRUTH_BOX_PROTOCOL": "instance",
    "coco_mask_ap": "instance",
    "encode_masks": "instance",
    "evaluate_mask_ap": "instance",
    "METRICS": "loading",
    "load_metric": "loading",
}

__all__ = [
    "MeanMaskIoU",
    "SemanticAreas",
    "intersect_and_union",
    "mask_iou",
    "mean_iou",
    "reduce_label_map",
    "select_masks",
    *_LAZY_NAMES,
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES)
