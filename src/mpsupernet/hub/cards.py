"""Model cards: a subnet's, a supernet's, and the root card of a tiers repository, rendered from the Jinja templates
in `templates/` (which share `how_to_run.md`), as huggingface_hub renders `ModelCard.from_template`."""

import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..bitops import format_budget
from ..layout import MANIFEST_NAME, VISION_ENCODER_NAME
from ..tasks import is_semantic, pipeline_tag
from .manifest import check_mean_iou, describe_latency_measurement, select_tier

CARD_TAGS = ["mpsupernet", "segment-anything", "sam", "mixed-precision", "quantization", "lora", "bitops"]


MISSING_PACKAGE_ERROR = (
    "ValueError: The checkpoint you are trying to load has model type `sam_subnet` but Transformers does not "
    "recognize this architecture"
)
"""How transformers' `AutoModel.from_pretrained` fails on a tier where mpsupernet is not installed (the cards quote it)."""

def _card_template_source(name: str) -> str:
    return resources.files(__package__).joinpath("templates").joinpath(name).read_text(encoding="utf-8")


def subnet_card_template() -> str:
    """The Jinja template of subnet cards (`templates/subnet_card.md` of this package)."""
    return _card_template_source("subnet_card.md")


def _render_card(template_name: str, card_data: ModelCardData, **template_kwargs) -> ModelCard:
    # A loader (which `ModelCard.from_template` lacks) lets both cards include the shared "how to run" paragraph.
    environment = jinja2.Environment(loader=jinja2.FunctionLoader(_card_template_source), keep_trailing_newline=True)
    text = environment.get_template(template_name).render(card_data=card_data.to_yaml(), **template_kwargs)
    return ModelCard(text)


def _snippet_source(repo_id: str | None) -> str:
    """What the cards' snippets load from, as a Python string literal: the repository, or a placeholder folder."""
    return f'"{repo_id}"' if repo_id else '"path/to/this/folder"'


def _hub_url(model_id: str) -> str | None:
    """The Hub page of a model id (`"org/name"`), or `None` for a local name such as `"embedded-sam"`."""
    return f"https://huggingface.co/{model_id}" if "/" in model_id and not Path(model_id).is_absolute() else None


def _subnet_card_data(
    summary: dict, base_model: str, dataset_name, dataset_split, license: str, title: str, mean_iou, latency, task: str
) -> ModelCardData:
    """The metadata of a subnet card: provenance, the mIoU as an eval result, BitOPs and the published latency."""
    eval_results = None
    if mean_iou is not None:
        eval_results = [
            EvalResult(
                task_type=task,
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=dataset_split,
                metric_type="mean_iou",
                metric_name="Mean IoU",
                metric_value=round(float(mean_iou), 6),
            )
        ]
    card_data = _card_data(base_model, dataset_name, license, title, eval_results, task)
    # BitOPs in the metadata let the Hub's search and `load_subnet` read the cost without parsing the body.
    card_data.bitops = summary["bitops"]
    card_data.bitops_share_of_full_precision = round(summary["share_of_full_precision"], 6)
    card_data.bitops_share_of_w8a8 = round(summary["share_of_w8a8"], 6)
    if latency is not None:
        card_data.latency_ms = round(float(latency["latency_ms"]), 3)
    return card_data


def render_subnet_card(
    subnet,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    mean_iou: float | None = None,
    dataset_split: str | None = None,
    repo_id: str | None = None,
    subfolder: str | None = None,
    license: str = "apache-2.0",
    has_onnx: bool = False,
    file_bytes: Mapping[str, int] | None = None,
    latency: Mapping | None = None,
    manifest: Mapping | None = None,
) -> ModelCard:
    """Renders the model card of an extracted subnet.

    Args:
        subnet (`SamSubnetForMaskGeneration`): the subnet; its BitOPs report and architecture are printed.
        base_model (`str`, *optional*): the SAM checkpoint the supernet was built from (a Hub id, a folder name or
            `"embedded-sam"`); defaults to the subnet's `config.base_model_name_or_path`.
        dataset_name (`str`, *optional*): the dataset the quality was measured on; defaults to the subnet's
            `config.training_dataset`.
        mean_iou (`float`, *optional*): measured mean mask IoU; goes into the card's `model-index` too.
        dataset_split (`str`, *optional*): the split it was measured on.
        repo_id (`str`, *optional*), subfolder (`str`, *optional*): where the subnet is published, for the loading
            snippets; without `repo_id` they name a local folder.
        license (`str`, *optional*, defaults to `"apache-2.0"`): the card's license; SAM's weights are Apache-2.0.
        has_onnx (`bool`, *optional*): whether the folder holds `vision_encoder.onnx`; adds the ONNX paragraph.
        file_bytes (`Mapping[str, int]`, *optional*): bytes of each file of the folder (weights, ONNX files).
        latency (`Mapping`, *optional*): the tier's published latency, as in `tiers.json`: `latency_ms` and
            `latency_measurement` (a `mpsupernet.runtime.LatencyMeasurement` as a dict).
        manifest (`Mapping`, *optional*): the `tiers.json` of the repository the tier is published in (with
            `repo_id` and `subfolder`); adds the snippet that picks the tier by its published latency, with limits
            that select this tier from the manifest (none where no limits do).

    Returns:
        `huggingface_hub.ModelCard`: metadata (base model with `base_model_relation: quantized`, `mask-generation`,
        tags, model-index with the mIoU, the BitOPs) and a body that says first how to run the subnet (with
        mpsupernet, with onnxruntime, and what happens without mpsupernet), then the BitOPs (absolute and against both
        references), the quality, the architecture, the per-layer bits, usage snippets and `to_sam_model`'s
        availability.

    Raises:
        `ValueError`: if no base model is given or recorded, a mean IoU is not a number in [0, 1] (NaN included) or
            comes without a dataset name.
    """
    check_mean_iou("the subnet", mean_iou)
    base_model, dataset_name = card_provenance([subnet], base_model, dataset_name)
    if mean_iou is not None and not dataset_name:
        raise ValueError(
            "A mean IoU needs the dataset it was measured on: give `dataset_name` (the subnet's config records no "
            "`training_dataset`)."
        )
    report = subnet.bitops_report()
    summary = report.summary()
    gbitops = summary["gbitops"]
    title = f"{base_model.split('/')[-1]} mixed-precision subnet, {gbitops:.3g} GBitOPs"
    task = pipeline_tag(subnet.config)
    card_data = _subnet_card_data(
        summary, base_model, dataset_name, dataset_split, license, title, mean_iou, latency, task
    )
    subfolder = subfolder if repo_id else None
    return _render_card(
        "subnet_card.md",
        card_data,
        title=title,
        base_model=base_model,
        report=summary,
        rows=report.rows,
        architecture=dict(report.architecture),
        mean_iou=mean_iou,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        repo_id=repo_id,
        source=_snippet_source(repo_id),
        subfolder=subfolder,
        budget=format_budget(summary["bitops"]),
        onnx_subfolder=(subfolder or "") if has_onnx else None,
        missing_package_error=MISSING_PACKAGE_ERROR,
        sam_model_blocker=subnet.to_sam_model_blocker(),
        quantized_activations=len(subnet.quantized_input_layers()),
        float_bits=subnet.config.float_bits,
        image_size=subnet.config.vision_config.image_size,
        file_bytes=dict(file_bytes or {}),
        latency=latency,
        semantic=is_semantic(subnet.config),
        id2label=getattr(subnet.config, "id2label", None),
        latency_limits=_latency_limits(manifest, subfolder, latency) if repo_id else None,
    )


def _latency_limits(manifest: Mapping | None, subfolder: str | None, latency: Mapping | None) -> str | None:
    """The `load_subnet` arguments that select the tier in `subfolder` of `manifest` by its published latency: the
    latency rounded up to whole milliseconds, with the tier's BitOPs budget where the latency alone selects another
    tier (published latencies need not be ordered by cost); `None` where neither selects it."""
    if manifest is None or latency is None:
        return None
    name = next((name for name, tier in manifest["tiers"].items() if tier["subfolder"] == subfolder), None)
    if name is None:
        return None
    limit = math.ceil(latency["latency_ms"])
    if select_tier(manifest, max_latency_ms=limit) == name:
        return f"max_latency_ms={limit}"
    budget = format_budget(manifest["tiers"][name]["bitops"])
    if select_tier(manifest, budget, max_latency_ms=limit) == name:
        return f'max_bitops="{budget}", max_latency_ms={limit}'
    return None


def render_supernet_card(
    supernet, *, steps: int | None = None, eval_metrics: Mapping[str, float] | None = None, repo_id: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """Renders the model card of a supernet (`templates/supernet_card.md`), as `SupernetTrainer` publishes it.

    Args:
        supernet (`SamSupernetForMaskGeneration`): the supernet; its provenance (`config.base_model_name_or_path`,
            `config.training_dataset`) and the BitOPs of its search space are stated.
        steps (`int`, *optional*): the training steps taken.
        eval_metrics (`Mapping[str, float]`, *optional*): the last evaluation's metrics (e.g.
            `eval_mean_iou_largest`), shown in a table.
        repo_id (`str`, *optional*): where the supernet is published, for the snippet.
        license (`str`, *optional*, defaults to `"apache-2.0"`): the card's license.

    Returns:
        `huggingface_hub.ModelCard`: metadata with `library_name: mpsupernet`, the base model
        (`base_model_relation: finetune`: frozen base weights plus trained adapters), the training data and the
        full-precision, W8A8 and smallest subnets' BitOPs; a body with a snippet that extracts a subnet.
    """
    config = supernet.config
    base_model = config.base_model_name_or_path or "an unrecorded SAM checkpoint"
    full_precision = supernet.bitops_report(supernet.full_precision_subnet())
    smallest = supernet.bitops_report(supernet.smallest_subnet())
    title = (
        f"{base_model.split('/')[-1]} mixed-precision supernet"
        if config.base_model_name_or_path
        else "Mixed-precision SAM supernet"
    )
    card_data = ModelCardData(
        base_model=config.base_model_name_or_path,
        base_model_relation="finetune" if config.base_model_name_or_path else None,
        pipeline_tag=pipeline_tag(config),
        library_name="mpsupernet",
        license=license,
        tags=CARD_TAGS + ["supernet"],
        model_name=title,
        datasets=[config.training_dataset] if config.training_dataset and "/" in config.training_dataset else None,
    )
    card_data.bitops_full_precision = full_precision.total_bitops
    card_data.bitops_w8a8 = full_precision.w8a8_bitops
    card_data.bitops_smallest = smallest.total_bitops
    return _render_card(
        "supernet_card.md",
        card_data,
        title=title,
        base_model=base_model,
        base_model_url=_hub_url(base_model),
        source=_snippet_source(repo_id),
        example_budget=format_budget(smallest.total_bitops),
        missing_package_error=MISSING_PACKAGE_ERROR.replace("`sam_subnet`", f"`{config.model_type}`"),
        full_precision_bitops=full_precision.total_bitops,
        w8a8_bitops=full_precision.w8a8_bitops,
        smallest_bitops=smallest.total_bitops,
        float_bits=config.float_bits,
        training_dataset=config.training_dataset,
        steps=steps,
        eval_metrics=dict(eval_metrics or {}),
    )


def card_provenance(models, base_model: str | None, dataset_name: str | None) -> tuple[str, str | None]:
    """The base model and dataset a card states: those given, else those the models' configs record.

    Args:
        models (`Iterable[PreTrainedModel]`): subnets (or supernets) whose `config.base_model_name_or_path` and
            `config.training_dataset` fill what is not given; where they record different values, nothing is guessed.
        base_model (`str`, *optional*), dataset_name (`str`, *optional*): explicit values, used as they are.

    Returns:
        `tuple[str, str | None]`: the base model and the dataset name (`None` where none is recorded).

    Raises:
        `ValueError`: if no base model is given and the configs record none, or several.
    """
    configs = [model.config for model in models]
    if base_model is None:
        recorded = {config.base_model_name_or_path for config in configs}
        if len(recorded) != 1 or None in recorded:
            raise ValueError(
                f"Give `base_model`: the models' configs record {sorted(map(str, recorded))} as their base model "
                "(`base_model_name_or_path`, set by `SamSupernetForMaskGeneration.from_sam`)."
            )
        base_model = recorded.pop()
    if dataset_name is None:
        recorded = {config.training_dataset for config in configs}
        dataset_name = recorded.pop() if len(recorded) == 1 else None
    return base_model, dataset_name


def _card_data(
    base_model: str, dataset_name: str | None, license: str, title: str, eval_results, task: str = "mask-generation"
) -> ModelCardData:
    return ModelCardData(
        base_model=base_model,
        base_model_relation="quantized",
        pipeline_tag=task,
        library_name="mpsupernet",
        license=license,
        tags=CARD_TAGS,
        model_name=title,
        eval_results=eval_results,
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
    )


def render_tiers_card(
    manifest: dict, save_directory: str | os.PathLike, *, repo_id: str | None = None, license: str = "apache-2.0"
) -> ModelCard:
    """Renders the root model card of a tiers repository (`templates/tiers_card.md`), the card the Hub shows.

    Args:
        manifest (`dict`): the repository's `tiers.json` (see [`save_tiers`]). A tier entry's optional
            `latency_ms` (a measured latency in milliseconds) adds a latency column, with the machine of its
            `latency_measurement`.
        save_directory (`str` or `os.PathLike`): the tiers folder; each tier's weight bytes (its `*.safetensors`
            files) are read there, and a tier holding `vision_encoder.onnx` adds the ONNX paragraph.
        repo_id (`str`, *optional*): the Hub repository, for the snippets; without it they name a local folder.
        license (`str`, *optional*, defaults to `"apache-2.0"`): the card's license.

    Returns:
        `huggingface_hub.ModelCard`: metadata with the license, `base_model` and `base_model_relation: quantized`,
        `library_name: mpsupernet` and a `model-index` holding every measured tier's mean IoU (`metric_config` is
        the tier's name); a body saying how to run the tiers, a table of their BitOPs, bytes, quality (and latency
        where measured) with the `max_bitops` budget that selects each, and usage snippets.
    """
    folder = Path(save_directory)
    base_model, dataset_name = manifest["base_model"], manifest.get("dataset")
    rows = []
    for name, tier in sorted(manifest["tiers"].items(), key=lambda item: item[1]["bitops"]):
        tier_folder = folder / tier["subfolder"]
        budget = format_budget(tier["bitops"])
        rows.append(
            {
                "name": name,
                "subfolder": tier["subfolder"],
                "gbitops": tier["bitops"] / 1e9,
                "share_of_full_precision": tier["share_of_full_precision"],
                "share_of_w8a8": tier["share_of_w8a8"],
                "weights_bytes": sum(path.stat().st_size for path in tier_folder.glob("*.safetensors")),
                "mean_iou": tier.get("mean_iou"),
                "latency_ms": tier.get("latency_ms"),
                # A tier that a cheaper, better-measured tier dominates is reached by name only.
                "budget": budget if select_tier(manifest, budget) == name else None,
                "has_onnx": (tier_folder / VISION_ENCODER_NAME).is_file(),
            }
        )
    eval_results = [
        EvalResult(
            task_type="mask-generation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type="mean_iou",
            metric_name=f"Mean IoU ({row['name']})",
            metric_config=row["name"],
            metric_value=round(float(row["mean_iou"]), 6),
        )
        for row in rows
        if row["mean_iou"] is not None and dataset_name
    ]
    name = (repo_id or folder.name).split("/")[-1]
    title = f"{name}: mixed-precision SAM subnets by BitOPs tier"
    card_data = _card_data(base_model, dataset_name, license, title, eval_results or None)
    onnx_tiers = [row["subfolder"] for row in rows if row["has_onnx"]]
    measured = [tier for tier in manifest["tiers"].values() if tier.get("latency_ms") is not None]
    return _render_card(
        "tiers_card.md",
        card_data,
        title=title,
        base_model=base_model,
        base_model_url=_hub_url(base_model),
        dataset_name=dataset_name,
        manifest_name=MANIFEST_NAME,
        tiers=rows,
        has_latency=bool(measured),
        latency_machine=describe_latency_measurement(measured[0]) if measured else None,
        full_precision_gbitops=manifest["full_precision_bitops"] / 1e9,
        example=next((row for row in rows if row["budget"]), rows[0]),
        source=_snippet_source(repo_id),
        onnx_subfolder=onnx_tiers[0] if onnx_tiers else None,
        missing_package_error=MISSING_PACKAGE_ERROR,
    )
