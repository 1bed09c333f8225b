"""`load_metric`: the package's `evaluate` modules, loaded from the scripts shipped inside it (no network).

`evaluate.load("mean_iou")` fetches a script from the Hugging Face Hub and, offline, fails with a misleading
`FileNotFoundError`. The package ships its metrics as `evaluate.Metric` scripts under `metrics/modules/<name>/
<name>.py`, and `evaluate.load(<that folder>)` imports a local script without any download, `HF_HUB_OFFLINE=1` or
not. The scripts only wrap this package's own computations (`semantic.mean_iou`, `mask.mask_iou`,
`instance.coco_mask_ap`), so the module and the function give the same figure.
"""

from collections.abc import Sequence
from pathlib import Path

import datasets
import evaluate


MODULES_DIR = Path(__file__).resolve().parent / "modules"

# name -> what it measures (the names of `load_metric`).
METRICS = {
    "mean_iou": "dataset-level class mean IoU of semantic label maps (evaluate's `mean_iou` definition)",
    "mask_iou": "mean IoU over the masks of a promptable model, one mask per prompt",
    "mask_ap": "COCO mask AP and AR of instance masks with scores (pycocotools)",
}


def metric_info(
    description: str, inputs_description: str, features: dict, reference_urls: Sequence[str] = ()
) -> evaluate.MetricInfo:
    """The `_info` of one of the package's `evaluate` modules (no citation; `features` as a dict of features)."""
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=inputs_description,
        features=datasets.Features(features),
        reference_urls=list(reference_urls),
    )


def map_features(dtype: str) -> dict:
    """Features of a module whose predictions and references are 2-D maps (masks or label maps) of `dtype`."""
    return {name: datasets.List(datasets.List(datasets.Value(dtype))) for name in ("predictions", "references")}


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Loads one of the package's metrics as an `evaluate.EvaluationModule`, from its script inside the package.

    Args:
        name (`str`): `"mean_iou"`, `"mask_iou"` or `"mask_ap"` (see `METRICS`).
        kwargs: passed to `evaluate.load` (`keep_in_memory`, `cache_dir`, `num_process`, `process_id`,
            `experiment_id`, ...).

    Returns:
        `evaluate.EvaluationModule`: use it as any `evaluate` metric (`add_batch`, `compute`); the arguments of each
        `compute` are in its `inputs_description`.

    Raises:
        `ValueError`: an unknown name (the message lists the names).

    Example:
        >>> metric = load_metric("mean_iou", keep_in_memory=True)
        >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 0]]], num_labels=2)["mean_iou"]
        0.25
    """
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; the package's metrics are {sorted(METRICS)}.")
    return evaluate.load(str(MODULES_DIR / name), **kwargs)


__all__ = ["METRICS", "MODULES_DIR", "load_metric", "map_features", "metric_info"]
