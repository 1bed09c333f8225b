"""Model cards for extracted subnets, and tiers of subnets on the Hugging Face Hub.

A *tier* is one extracted subnet, stored in a subfolder of one Hub repository; `tiers.json` at the root of that
repository lists every tier with its BitOPs and quality, so `load_subnet` can pick the best tier under a budget after
downloading one small file.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from transformers.utils import logging

from .bitops import format_budget, parse_budget

logger = logging.get_logger(__name__)

MANIFEST_NAME = "tiers.json"
TIER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CARD_TAGS = ["mpsupernet", "segment-anything", "sam", "mixed-precision", "quantization", "lora", "bitops"]


MISSING_PACKAGE_ERROR = (
    "ValueError: The checkpoint you are trying to load has model type `sam_subnet` but Transformers does not "
    "recognize this architecture"
)
"""How transformers' `AutoModel.from_pretrained` fails on a tier where mpsupernet is not installed (the cards quote it)."""

ONNX_FILE_NAME = "vision_encoder.onnx"
"""A tier folder holding this file gets the ONNX paragraph on its card (see `mpsupernet.runtime.OnnxSamModel`)."""


def _card_template_source(name: str) -> str:
    return resources.files("mpsupernet.model_cards").joinpath(name).read_text(encoding="utf-8")


def subnet_card_template() -> str:
    """The Jinja template of subnet cards (`model_cards/subnet_card.md` in the repository)."""
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

    Returns:
        `huggingface_hub.ModelCard`: metadata (base model with `base_model_relation: quantized`, `mask-generation`,
        tags, model-index with the mIoU, the BitOPs) and a body that says first how to run the subnet (with
        mpsupernet, with onnxruntime, and what happens without mpsupernet), then the BitOPs (absolute and against both
        references), the quality, the architecture, the per-layer bits, usage snippets and `to_sam_model`'s
        availability.

    Raises:
        `ValueError`: if no base model is given or recorded, or a mean IoU comes without a dataset name.
    """
    base_model, dataset_name = card_provenance([subnet], base_model, dataset_name)
    if mean_iou is not None and not dataset_name:
        raise ValueError(
            "A mean IoU needs the dataset it was measured on: give `dataset_name` (the subnet's config records no "
            "`training_dataset`)."
        )
    report = subnet.bitops_report()
    summary = report.summary()
    gbitops = summary["gbitops"]
    eval_results = None
    if mean_iou is not None:
        eval_results = [
            EvalResult(
                task_type="mask-generation",
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=dataset_split,
                metric_type="mean_iou",
                metric_name="Mean IoU",
                metric_value=round(float(mean_iou), 6),
            )
        ]
    title = f"{base_model.split('/')[-1]} mixed-precision subnet, {gbitops:.3g} GBitOPs"
    card_data = _card_data(base_model, dataset_name, license, title, eval_results)
    # BitOPs in the metadata let the Hub's search and `load_subnet` read the cost without parsing the body.
    card_data.bitops = summary["bitops"]
    card_data.bitops_share_of_full_precision = round(summary["share_of_full_precision"], 6)
    card_data.bitops_share_of_w8a8 = round(summary["share_of_w8a8"], 6)
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
    )


def render_supernet_card(
    supernet, *, steps: int | None = None, eval_metrics: Mapping[str, float] | None = None, repo_id: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """Renders the model card of a supernet (`model_cards/supernet_card.md`), as `SupernetTrainer` publishes it.

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
        pipeline_tag="mask-generation",
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


def _card_data(base_model: str, dataset_name: str | None, license: str, title: str, eval_results) -> ModelCardData:
    return ModelCardData(
        base_model=base_model,
        base_model_relation="quantized",
        pipeline_tag="mask-generation",
        library_name="mpsupernet",
        license=license,
        tags=CARD_TAGS,
        model_name=title,
        eval_results=eval_results,
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
    )


def save_subnet_with_card(subnet, save_directory: str | os.PathLike, **card_kwargs) -> ModelCard:
    """Saves a subnet (safetensors + config) and its model card (`README.md`) into `save_directory`."""
    save_directory = Path(save_directory)
    subnet.save_pretrained(save_directory)
    card_kwargs.setdefault("has_onnx", (save_directory / ONNX_FILE_NAME).is_file())
    card = render_subnet_card(subnet, **card_kwargs)
    card.save(save_directory / "README.md")
    return card


def save_tiers(
    tiers: Mapping[str, object],
    save_directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    mean_ious: Mapping[str, float] | None = None,
    repo_id: str | None = None,
) -> dict:
    """Writes several subnets as tiers into a folder laid out as a tiers repository (see [`push_tiers`]).

    Args:
        tiers (`Mapping[str, SamSubnetForMaskGeneration]`): tier name (used as the subfolder) → subnet.
        save_directory (`str` or `os.PathLike`): the folder; created if missing.
        base_model (`str`, *optional*), dataset_name (`str`, *optional*): for the cards and the manifest; default to
            what the subnets' configs record (see [`card_provenance`]).
        mean_ious (`Mapping[str, float]`, *optional*): measured mean IoU per tier.
        repo_id (`str`, *optional*): the Hub repository the folder is meant for, named in the cards.

    Returns:
        `dict`: the manifest written to `tiers.json`.
    """
    mean_ious = dict(mean_ious or {})
    _check_tiers(tiers, mean_ious)
    base_model, dataset_name = card_provenance(tiers.values(), base_model, dataset_name)
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed at the end, so that a failure never leaves half a tiers folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        manifest = _write_tiers(tiers, staging, base_model, dataset_name, mean_ious, repo_id or target.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_tiers(tiers, save_directory: Path, base_model, dataset_name, mean_ious, repo_id) -> dict:
    manifest = {"base_model": base_model, "dataset": dataset_name, "tiers": {}}
    for name, subnet in sorted(tiers.items(), key=lambda item: item[1].config.bitops):
        save_subnet_with_card(
            subnet,
            save_directory / name,
            base_model=base_model,
            dataset_name=dataset_name,
            mean_iou=mean_ious.get(name),
            repo_id=repo_id,
            subfolder=name,
        )
        summary = subnet.bitops_report().summary()
        manifest["full_precision_bitops"] = summary["full_precision_bitops"]
        manifest["tiers"][name] = {
            "subfolder": name,
            "bitops": summary["bitops"],
            "share_of_full_precision": summary["share_of_full_precision"],
            "share_of_w8a8": summary["share_of_w8a8"],
            "mean_iou": mean_ious.get(name),
            "architecture": subnet.config.architecture,
        }
    (save_directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    render_tiers_card(manifest, save_directory, repo_id=repo_id).save(save_directory / "README.md")
    return manifest


def _check_tiers(tiers: Mapping[str, object], mean_ious: Mapping[str, float]) -> None:
    if not tiers:
        raise ValueError("`tiers` is empty; give at least one tier name → subnet.")
    for name, subnet in tiers.items():
        if not TIER_NAME_PATTERN.match(name):
            raise ValueError(f"Tier name {name!r} is not a valid folder name; use letters, digits, '.', '_' and '-'.")
        if getattr(subnet.config, "model_type", None) != "sam_subnet":
            raise ValueError(f"Tier {name!r} is a {type(subnet).__name__}, not an extracted SamSubnetForMaskGeneration.")
    unknown = sorted(set(mean_ious) - set(tiers))
    if unknown:
        raise ValueError(f"`mean_ious` names tiers {unknown} that are not among {sorted(tiers)}.")


def push_tiers(
    tiers: Mapping[str, object],
    repo_id: str,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    mean_ious: Mapping[str, float] | None = None,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Publishes several subnets as tiers of one Hub repository, in one commit.

    Each tier goes into its own subfolder (weights, config and model card); `tiers.json` lists them, and the root
    `README.md` compares them. Everything is staged locally (checked before anything is sent) and uploaded as a single
    commit, so a failure leaves the repository as it was.

    Args:
        tiers (`Mapping[str, SamSubnetForMaskGeneration]`): tier name (used as the subfolder) → subnet.
        repo_id (`str`): the Hub repository, created if missing.
        base_model (`str`, *optional*), dataset_name (`str`, *optional*): for the cards; default to what the
            subnets' configs record (see [`card_provenance`]).
        mean_ious (`Mapping[str, float]`, *optional*): measured mean IoU per tier.
        private (`bool`), token (`str`), revision (`str`), commit_message (`str`): as in `huggingface_hub`.

    Returns:
        `str`: the commit's URL.
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mpsupernet-tiers-") as staging:
        folder = Path(staging) / "repo"
        save_tiers(tiers, folder, base_model=base_model, dataset_name=dataset_name, mean_ious=mean_ious, repo_id=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Publish {len(tiers)} mpsupernet tiers: {', '.join(sorted(tiers))}",
        )
    logger.info(f"Pushed tiers {sorted(tiers)} to {repo_id}")
    return commit.commit_url


def render_tiers_card(
    manifest: dict, save_directory: str | os.PathLike, *, repo_id: str | None = None, license: str = "apache-2.0"
) -> ModelCard:
    """Renders the root model card of a tiers repository (`model_cards/tiers_card.md`), the card the Hub shows.

    Args:
        manifest (`dict`): the repository's `tiers.json` (see [`save_tiers`]). A tier entry's optional
            `latency_ms` (a measured latency in milliseconds) adds a latency column.
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
                "has_onnx": (tier_folder / ONNX_FILE_NAME).is_file(),
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
    return _render_card(
        "tiers_card.md",
        card_data,
        title=title,
        base_model=base_model,
        base_model_url=_hub_url(base_model),
        dataset_name=dataset_name,
        manifest_name=MANIFEST_NAME,
        tiers=rows,
        has_latency=any(row["latency_ms"] is not None for row in rows),
        full_precision_gbitops=manifest["full_precision_bitops"] / 1e9,
        example=next((row for row in rows if row["budget"]), rows[0]),
        source=_snippet_source(repo_id),
        onnx_subfolder=onnx_tiers[0] if onnx_tiers else None,
        missing_package_error=MISSING_PACKAGE_ERROR,
    )


def read_tiers_manifest(repo_id: str | os.PathLike, revision: str | None = None, token: str | None = None) -> dict:
    """The `tiers.json` of a Hub repository or a local folder."""
    if Path(repo_id).is_dir():
        path = Path(repo_id) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(repo_id)!r} has no {MANIFEST_NAME}; it was not written by `push_tiers`.")
    else:
        path = hf_hub_download(str(repo_id), MANIFEST_NAME, revision=revision, token=token)
    return json.loads(Path(path).read_text())


def select_tier(manifest: dict, max_bitops) -> str:
    """The tier to use under `max_bitops`: the best measured mean IoU among those that fit, else the costliest.

    `max_bitops` takes what `mpsupernet.bitops.parse_budget` takes ("40G", "5%", a number).
    """
    budget = parse_budget(max_bitops, manifest["full_precision_bitops"])
    tiers = manifest["tiers"]
    fitting = {name: tier for name, tier in tiers.items() if tier["bitops"] <= budget}
    if not fitting:
        cheapest = min(tiers, key=lambda name: tiers[name]["bitops"])
        raise ValueError(
            f"No tier fits under {max_bitops!r} ({budget} BitOPs); the cheapest tier, {cheapest!r}, needs "
            f"{tiers[cheapest]['bitops']} BitOPs ({tiers[cheapest]['bitops'] / 1e9:.3f} G). Available tiers: "
            + ", ".join(f"{name}={tier['bitops'] / 1e9:.3f}G" for name, tier in tiers.items())
        )

    def rank(name):
        tier = fitting[name]
        return (tier["mean_iou"] is not None, tier["mean_iou"] or 0.0, tier["bitops"])

    return max(fitting, key=rank)


def load_subnet(repo_id: str | os.PathLike, max_bitops, revision: str | None = None, token: str | None = None, **kwargs):
    """Downloads and loads the best ready-made subnet under a BitOPs budget.

    Args:
        repo_id (`str` or `os.PathLike`): a Hub repository written by [`push_tiers`], or a local copy of one.
        max_bitops (`int`, `float` or `str`): the budget: a number of BitOPs, `"40G"`, `"1.5T"`, or `"5%"` of the
            full-precision model.
        revision (`str`), token (`str`): as in `huggingface_hub`.
        kwargs: passed to `SamSubnetForMaskGeneration.from_pretrained`.

    Returns:
        `SamSubnetForMaskGeneration`: the chosen tier's subnet; its `config.bitops` is within the budget.
    """
    from .modeling_sam_subnet import SamSubnetForMaskGeneration

    manifest = read_tiers_manifest(repo_id, revision=revision, token=token)
    tier = select_tier(manifest, max_bitops)
    logger.info(f"Loading tier {tier!r} ({manifest['tiers'][tier]['bitops'] / 1e9:.3f} GBitOPs) from {repo_id}")
    if Path(repo_id).is_dir():
        return SamSubnetForMaskGeneration.from_pretrained(Path(repo_id) / manifest["tiers"][tier]["subfolder"], **kwargs)
    return SamSubnetForMaskGeneration.from_pretrained(
        str(repo_id), subfolder=manifest["tiers"][tier]["subfolder"], revision=revision, token=token, **kwargs
    )
