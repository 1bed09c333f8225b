"""Evaluation loops: the promptable model's mean mask IoU, and the semantic model's dataset-level class mIoU.

The mean mask IoU of one subnet of a supernet is `evaluate_mean_iou(supernet, dataloader, subnet=arch)` (or
`evaluate_dataset_mean_iou(..., subnet=arch)`): the Trainer, the training loop, the search and the benchmarks all
measure a subnet that way. `evaluate_semantic_mean_iou(..., subnet=arch)` is the same for a semantic supernet.
"""

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..data.processing import MODEL_INPUT_NAMES, SamSegmentationPreprocessor, collate_fn
from .mask import MeanMaskIoU, select_masks
from .semantic import SemanticAreas


def _model_device(model: Any) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: Any, subnet: Any = None) -> Iterator[None]:
    """Puts `model` in eval mode and, with `subnet`, activates that architecture; both are restored afterwards.

    Args:
        model: the model to evaluate; a supernet (with `using_subnet`) when `subnet` is given.
        subnet (`SubnetArchitecture` or `dict`, *optional*): the supernet's architecture to measure.

    Raises:
        `TypeError`: `subnet` given for a model that is not a supernet (raised before anything changes).
    """
    if subnet is not None and not hasattr(model, "using_subnet"):
        raise TypeError(
            f"`subnet` selects an architecture of a supernet, but the model is a {type(model).__name__}, which has "
            "no `using_subnet`; evaluate it without `subnet`."
        )
    was_training = getattr(model, "training", False)
    with model.using_subnet(subnet) if subnet is not None else contextlib.nullcontext():
        if was_training:
            model.eval()
        try:
            yield
        finally:
            if was_training:
                model.train()


@torch.no_grad()
def evaluate_mean_iou(
    model: Callable[..., Any],
    dataloader: Iterable[dict[str, torch.Tensor]],
    multimask_output: bool = False,
    threshold: float = 0.0,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    show_progress: bool = True,
    description: str = "Evaluating mIoU",
    subnet: Any = None,
) -> float:
    """Runs a SAM-like model over a dataloader and returns the mean mask IoU over all prompts.

    The mean is over masks (one per prompt), each IoU measured at the resolution of `pred_masks` (the `mask_iou`
    evaluation module of `mpsupernet.load_metric` is the same figure). In a distributed run, give each process its
    shard of the data: the metric sums over processes before dividing.

    Args:
        model (`Callable`):
            A `SamModel`, or anything called with the batch's model inputs (`pixel_values`, `input_boxes`,
            `input_points`, `input_labels`, those present) and `multimask_output`, returning `pred_masks`
            `(batch, prompts, num_masks, h, w)` and `iou_scores` `(batch, prompts, num_masks)`.
        dataloader (`Iterable[dict]`):
            Batches from `mpsupernet.data.collate_fn`, with `ground_truth_masks` `(batch, prompts, h, w)`. Empty
            batches (every example skipped) are passed over.
        multimask_output (`bool`, *optional*, defaults to `False`):
            Whether the model predicts 3 masks per prompt; the one with the highest predicted IoU is scored.
        threshold (`float`, *optional*, defaults to 0.0):
            Logit threshold of the predictions.
        device (`torch.device` or `str`, *optional*):
            Device for the inputs; defaults to the device of the model's parameters (the CPU when it has none).
        max_batches (`int`, *optional*):
            Stop after this many batches.
        show_progress (`bool`, *optional*, defaults to `True`):
            Whether to show a tqdm progress bar.
        description (`str`, *optional*, defaults to `"Evaluating mIoU"`):
            Label of the progress bar.
        subnet (`SubnetArchitecture` or `dict`, *optional*):
            With a supernet, the architecture to measure: it is active during the evaluation only, and the subnet
            active before is restored afterwards (even on error).

    Returns:
        `float`: the mean IoU over all prompts (NaN when there were none).

    Raises:
        `TypeError`: `subnet` given for a model that is not a supernet.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    metric = MeanMaskIoU(threshold=threshold).to(device)
    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    with evaluating(model, subnet):
        for step, batch in enumerate(tqdm(dataloader, total=total, desc=description, disable=not show_progress)):
            if max_batches is not None and step >= max_batches:
                break
            if not batch:
                continue
            inputs = {name: batch[name].to(device) for name in MODEL_INPUT_NAMES if name in batch}
            outputs = model(**inputs, multimask_output=multimask_output)
            pred_masks = outputs["pred_masks"]
            if multimask_output:
                pred_masks = select_masks(pred_masks, outputs["iou_scores"])
            else:
                pred_masks = pred_masks[:, :, 0]
            metric.update(pred_masks, batch["ground_truth_masks"].to(device))
    return float(metric.compute())


def evaluate_dataset_mean_iou(
    model: Any,
    dataset,
    seed: int = 0,
    prompts_per_image: int = 4,
    batch_size: int = 8,
    show_progress: bool = False,
    description: str = "Evaluating mIoU",
    subnet: Any = None,
) -> float:
    """The box-prompt mean IoU of `model` on a dataset in the standard schema (`image`, `masks`, `image_id`).

    Prompts are drawn by a `SamSegmentationPreprocessor` built from `model.config` with `seed`, so every model
    evaluated with the same seed sees the same boxes: a SAM, a supernet with a subnet active, an extracted subnet.

    Args:
        model: a `SamModel`, `SamSupernetForMaskGeneration` or `SamSubnetForMaskGeneration` (anything with a SAM
            `config` that `evaluate_mean_iou` can run).
        dataset (`datasets.Dataset`): the examples, without a transform.
        seed (`int`, *optional*, defaults to 0): seeds the prompts.
        prompts_per_image (`int`, *optional*, defaults to 4): box prompts per image.
        batch_size (`int`, *optional*, defaults to 8): images per batch.
        show_progress, description, subnet: see `evaluate_mean_iou`.
    """
    preprocessor = SamSegmentationPreprocessor(model.config, prompts_per_image=prompts_per_image, seed=seed)
    loader = torch.utils.data.DataLoader(
        dataset.with_transform(preprocessor), batch_size=batch_size, collate_fn=collate_fn
    )
    return evaluate_mean_iou(model, loader, show_progress=show_progress, description=description, subnet=subnet)


@torch.no_grad()
def evaluate_semantic_mean_iou(
    model: Callable[..., Any],
    dataloader: Iterable[dict[str, torch.Tensor]],
    num_labels: int | None = None,
    ignore_index: int | None = None,
    reduce_labels: bool = False,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    show_progress: bool = True,
    description: str = "Evaluating class mIoU",
    subnet: Any = None,
) -> dict[str, float | np.ndarray]:
    """Dataset-level class mean IoU of a semantic segmenter over a dataloader (the `mean_iou` module's figure).

    The logits are upsampled bilinearly to the label maps' size (transformers' semantic loss does the same), then
    the argmax is scored with `SemanticAreas`. In a distributed run, give each process its shard: the per-class
    totals are summed over processes before dividing.

    Args:
        model (`Callable`): called with the batch's `pixel_values`; returns `logits` `(batch, num_labels, h, w)`.
        dataloader (`Iterable[dict]`): batches with `pixel_values` and `labels` `(batch, height, width)`; empty
            batches are passed over.
        num_labels (`int`, *optional*): defaults to `model.config.num_labels`.
        ignore_index (`int`, *optional*): defaults to `model.config.semantic_loss_ignore_index`, else 255.
        reduce_labels (`bool`, *optional*, defaults to `False`): ADE20K's reduction of the labels.
        device, max_batches, show_progress, description, subnet: see `evaluate_mean_iou`.

    Returns:
        `dict`: see `SemanticAreas.compute` (`mean_iou`, `per_category_iou`, ...).

    Raises:
        `ValueError`: labels outside `[0, num_labels)` other than the ignore index (the message names them).
        `TypeError`: `subnet` given for a model that is not a supernet.
    """
    config = getattr(model, "config", None)
    if num_labels is None:
        num_labels = config.num_labels
    if ignore_index is None:
        ignore_index = getattr(config, "semantic_loss_ignore_index", None)
        ignore_index = 255 if ignore_index is None else ignore_index
    areas = SemanticAreas(num_labels, ignore_index, reduce_labels)
    device = torch.device(device) if device is not None else _model_device(model)
    with evaluating(model, subnet):
        for step, batch in enumerate(tqdm(dataloader, desc=description, disable=not show_progress)):
            if max_batches is not None and step >= max_batches:
                break
            if not batch:
                continue
            logits = model(pixel_values=batch["pixel_values"].to(device))["logits"]
            labels = batch["labels"]
            logits = torch.nn.functional.interpolate(
                logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
            areas.update(logits.argmax(dim=1).cpu().numpy(), labels.cpu().numpy())
    if dist.is_available() and dist.is_initialized():
        totals = ("area_intersect", "area_union", "area_prediction", "area_reference")
        stacked = torch.from_numpy(np.stack([getattr(areas, name) for name in totals])).to(device)
        dist.all_reduce(stacked)
        for name, total in zip(totals, stacked.cpu().numpy()):
            setattr(areas, name, total)
    return areas.compute()


def evaluate_dataset_semantic_mean_iou(
    model: Any, dataset, batch_size: int = 8, show_progress: bool = False, **evaluate_kwargs
) -> dict[str, float | np.ndarray]:
    """[`evaluate_semantic_mean_iou`] on a dataset in the semantic schema (`image`, `annotation`), preprocessed with
    `mpsupernet.data.SemanticSegmentationPreprocessor` at the model's input size (`model.config`).

    Args:
        model: a `SamSupernetForSemanticSegmentation` or `SamSubnetForSemanticSegmentation`.
        dataset (`datasets.Dataset`): the examples, without a transform.
        batch_size (`int`, *optional*, defaults to 8): images per batch.
        show_progress, evaluate_kwargs: see `evaluate_semantic_mean_iou` (`subnet`, `reduce_labels`, ...).
    """
    from ..data.semantic import SemanticSegmentationPreprocessor

    loader = torch.utils.data.DataLoader(
        dataset.with_transform(SemanticSegmentationPreprocessor(model.config)), batch_size=batch_size, collate_fn=collate_fn
    )
    return evaluate_semantic_mean_iou(model, loader, show_progress=show_progress, **evaluate_kwargs)


def evaluate_real3_mean_iou(model: Any, dataset=None, seed: int = 0) -> dict[str, float]:
    """Box-prompt mean IoU on real-3 (`mpsupernet.data.load_real3_dataset`): per domain and over all instances.

    Each image is prompted once per instance (one jittered box each, drawn with `seed` as in
    `evaluate_dataset_mean_iou`), so every instance counts once. IoU is measured at the model's `pred_masks`
    resolution, as everywhere in the package.

    Args:
        model: anything `evaluate_dataset_mean_iou` accepts.
        dataset (`datasets.Dataset`, *optional*): real-3 or some of its domains (the `domain` and `masks` columns);
            loaded from the installed wheels when not given.
        seed (`int`, *optional*, defaults to 0): seeds the box jitter.

    Returns:
        `dict[str, float]`: the mIoU of each domain, `"instances"` (the mean over all instances, 152 on the whole
        of real-3) and `"domains"` (the mean of the domains' mIoUs).

    Raises:
        ImportError: when `dataset` is not given and real-3's packages are missing.
    """
    from ..data.real import load_real3_dataset

    dataset = load_real3_dataset() if dataset is None else dataset
    results, counts = {}, {}
    for index, domain in enumerate(dataset["domain"]):
        example = dataset.select([index])
        counts[domain] = len(example[0]["masks"])
        results[domain] = evaluate_dataset_mean_iou(
            model, example, seed=seed, prompts_per_image=counts[domain], batch_size=1
        )
    domains = list(counts)
    results["instances"] = sum(results[d] * counts[d] for d in domains) / sum(counts.values())
    results["domains"] = sum(results[d] for d in domains) / len(domains)
    return results


__all__ = [
    "evaluate_dataset_mean_iou",
    "evaluate_mean_iou",
    "evaluate_real3_mean_iou",
    "evaluate_semantic_mean_iou",
    "evaluating",
]
