"""Model cards for extracted subnets, and tiers of subnets on the Hugging Face Hub.

A *tier* is one extracted subnet, stored in a subfolder of one Hub repository; `tiers.json` at the root of that
repository lists every tier with its BitOPs, quality, file bytes and measured onnxruntime latency, so `load_subnet` can
pick the best tier under a budget or a latency limit after downloading one small file. `tiers.json` carries a
`format_version` and is validated against its schema ([`TiersManifest`]); it is the pointer readers follow, so writers
replace it last and atomically.
"""

import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    hf_hub_download,
)
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from transformers.utils import logging

from ._hub_ids import check_hub_id, finding_on_the_hub
from .atomic import fsync_tree, make_staging_directory, move_into_place, remove_stale_staging, write_file_atomic
from .bitops import format_budget, parse_budget
from .checkpoints import save_model_folder
from .tasks import is_semantic, onnx_model_class, pipeline_tag, subnet_class

logger = logging.get_logger(__name__)

MANIFEST_NAME = "tiers.json"
SUBNET_MODEL_TYPES = ("sam_subnet", "sam_semantic_subnet")
MANIFEST_FORMAT_VERSION = 2
"""The `format_version` of the `tiers.json` this mpsupernet writes; newer ones are refused, older ones read (version
2 added each tier's file bytes and measured latency)."""
TIER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_TIER_NAME_LENGTH = 96
RESERVED_NAMES = frozenset({MANIFEST_NAME, "readme.md", ".gitattributes"})
# Tier names start with a letter or digit, so these never collide with one.
GENERATION_PATTERN = re.compile(r"^_v(\d+)$")
LOCAL_LOAD_ATTEMPTS = 10
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
            `latency_measurement` (a `mpsupernet.runtime.LatencyMeasurement` as a dict); also adds the snippet that
            runs the folder's ONNX export with onnxruntime.

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


def save_subnet_with_card(subnet, save_directory: str | os.PathLike, **card_kwargs) -> ModelCard:
    """Saves a subnet (safetensors + config) and its model card (`README.md`) into `save_directory`, crash-safely.

    The three files are written as one model folder (`mpsupernet.checkpoints.save_model_folder`): after a kill at
    any moment the folder loads as the old subnet or the new one, with its own card, or is refused.
    """
    return _save_tier(subnet, save_directory, None, **card_kwargs)["card"]


def _save_tier(subnet, save_directory: str | os.PathLike, onnx_options: Mapping | None, **card_kwargs) -> dict:
    """Saves a subnet, with `onnx_options` its ONNX export and measured latency too, and its card, as one model
    folder (see [`save_subnet_with_card`]); returns the `card` and the manifest fields `file_bytes`, `latency_ms`
    and `latency_measurement`."""
    _check_mean_iou("the subnet", card_kwargs.get("mean_iou"))
    saved = {}

    def write(folder: Path) -> None:
        # The subnet's own save goes through save_model_folder too; an empty staging folder is simply replaced.
        subnet.save_pretrained(folder)
        latency = None if onnx_options is None else export_and_measure_tier(subnet, folder, onnx_options)
        # save_model_folder rewrites config.json with the same digests and layout, so these sizes stay true.
        file_bytes = {path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()}
        # A save removes the ONNX files of an earlier export (they describe the old weights): the folder has one
        # only if this save writes it.
        has_onnx = card_kwargs.pop("has_onnx", False) or latency is not None
        saved["card"] = render_subnet_card(
            subnet, file_bytes=file_bytes, latency=latency, has_onnx=has_onnx, **card_kwargs
        )
        saved["card"].save(folder / "README.md")
        saved.update(file_bytes=file_bytes, **(latency or {"latency_ms": None, "latency_measurement": None}))

    save_model_folder(save_directory, write)
    return saved


def save_tiers(
    tiers: Mapping[str, object],
    save_directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    mean_ious: Mapping[str, float] | None = None,
    repo_id: str | None = None,
    export_onnx: bool = True,
    onnx_target: str = "onnxruntime",
    onnx_weight_container: str = "int8",
    latency_threads: int | None = None,
    latency_runs: int = 5,
) -> dict:
    """Writes several subnets as tiers into a folder laid out as a tiers repository (see [`push_tiers`]).

    Each tier's folder holds its safetensors, `config.json` and model card and, with `export_onnx`, its ONNX export
    (see `SamSubnetForMaskGeneration.export_onnx`), whose image encoder is timed here with onnxruntime on the CPU
    (`mpsupernet.runtime.measure_latency`: batch 1, median of `latency_runs` runs after warm-up); `tiers.json` and
    the cards publish that latency with the machine, beside the BitOPs and every file's bytes.

    A new folder gets one subfolder per tier, named after it, and is renamed into place once complete. Over earlier
    tiers (a folder holding a `tiers.json`) or into an empty folder, the new tiers go into a new generation
    subfolder (`_v<n>/<tier>`); `tiers.json` is replaced last, atomically, and only then are the tier folders of the
    previous manifest removed: after a kill at any moment the folder holds the complete old or new tiers (a concurrent
    `load_subnet` gets one or the other). Leftovers of a killed write go with the next one; nothing else is deleted.

    Args:
        tiers (`Mapping[str, SamSubnetForMaskGeneration]`): tier name (letters, digits, `.`, `_`, `-`; at most
            `MAX_TIER_NAME_LENGTH` characters; not `tiers.json` or `README.md`) → subnet.
        save_directory (`str` or `os.PathLike`): the folder: new, empty, or holding earlier tiers.
        base_model (`str`, *optional*), dataset_name (`str`, *optional*): for the cards and the manifest; default to
            what the subnets' configs record (see [`card_provenance`]).
        mean_ious (`Mapping[str, float]`, *optional*): measured mean IoU per tier, each in [0, 1].
        repo_id (`str`, *optional*): the Hub repository the folder is meant for, named in the cards.
        export_onnx (`bool`, *optional*, defaults to `True`): export each tier to ONNX and measure its latency
            (needs `pip install mpsupernet[onnx]`); `False` writes the PyTorch subnets only.
        onnx_target (`str`, *optional*, defaults to `"onnxruntime"`), onnx_weight_container (`str`, *optional*,
            defaults to `"int8"`): the export's `target` and `weight_container`.
        latency_threads (`int`, *optional*): onnxruntime intra-op threads for the measurement; all CPUs if unset.
        latency_runs (`int`, *optional*, defaults to 5): timed runs per tier.

    Returns:
        `dict`: the manifest written to `tiers.json`.

    Raises:
        `ValueError`: for a bad tier name, subnet, mean IoU or export option, a mean IoU without a dataset name, or
        a folder that is not empty and holds no tiers (it is named); nothing is written. `TypeError`: if `tiers` is
        not a mapping. `ImportError`: if `export_onnx` is set and the `onnx` extra is not installed.
    """
    mean_ious = dict(mean_ious or {})
    _check_tiers(tiers, mean_ious)
    base_model, dataset_name = card_provenance(tiers.values(), base_model, dataset_name)
    measured = sorted(name for name, value in mean_ious.items() if value is not None)
    if measured and not dataset_name:
        # Checked here, not when the cards are rendered: by then the first tiers have been exported and timed.
        raise ValueError(
            f"`mean_ious` gives tiers {measured} a mean IoU but no dataset it was measured on: give `dataset_name` "
            "(the subnets' configs record no single `training_dataset`)."
        )
    onnx_options = _check_onnx_options(export_onnx, onnx_target, onnx_weight_container, latency_threads, latency_runs)
    target = Path(save_directory)
    card_repo_id = repo_id or target.resolve().name
    previous = _previous_manifest(target)

    def write(root: Path, generation: str) -> dict:
        return _write_tiers(tiers, root, generation, base_model, dataset_name, mean_ious, card_repo_id, onnx_options)

    if previous is None:
        remove_stale_staging(target)
        staging = make_staging_directory(target)
        try:
            manifest = write(staging, "")
            _write_manifest_and_overview(staging, manifest, card_repo_id)
            move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest
    referenced = _top_folders(previous)
    generation = _next_generation(target, referenced)
    manifest = write(target, generation)
    fsync_tree(target / generation)
    _write_manifest_and_overview(target, manifest, card_repo_id)
    for folder in sorted(referenced - _top_folders(manifest)):
        shutil.rmtree(target / folder, ignore_errors=True)
    return manifest


def _next_generation(target: Path, referenced: set[str]) -> str:
    """The name of the next generation folder of a tiers folder, after removing what killed writes left behind:
    staging files of the manifest and card, and generation folders that the current manifest does not name."""
    for name in (MANIFEST_NAME, "README.md"):
        remove_stale_staging(target / name)
    generations = [int(match[1]) for p in target.iterdir() if (match := GENERATION_PATTERN.fullmatch(p.name))]
    for number in generations:
        if f"_v{number}" not in referenced:
            shutil.rmtree(target / f"_v{number}", ignore_errors=True)
    return f"_v{max(generations, default=0) + 1}"


def _check_onnx_options(export_onnx, target, weight_container, threads, runs) -> dict | None:
    """The ONNX export and latency options of `save_tiers`, checked before anything is written (`None`: no export)."""
    if not isinstance(export_onnx, bool):
        raise ValueError(f"`export_onnx` must be True or False; got {export_onnx!r}.")
    if not export_onnx:
        return None
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"Tiers are exported to ONNX by default, which needs the onnx extra ({error}): `pip install "
            "mpsupernet[onnx]`, or pass `export_onnx=False` to write the PyTorch subnets only."
        ) from error
    from .export.writer import check_export_arguments

    check_export_arguments(target, weight_container, None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`latency_threads` must be a positive integer or None; got {threads!r}.")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"`latency_runs` must be a positive integer; got {runs!r}.")
    return {"target": target, "weight_container": weight_container, "threads": threads or os.cpu_count(), "runs": runs}


def export_and_measure_tier(subnet, folder: str | os.PathLike, onnx_options: Mapping) -> dict:
    """Adds the ONNX export of `subnet` to its saved `folder` and measures its encoder on onnxruntime.

    Args:
        subnet (`SamSubnetForMaskGeneration`): the tier, saved in `folder`.
        folder (`str` or `os.PathLike`): the tier's folder.
        onnx_options (`Mapping`): `target`, `weight_container` (of the export), `threads` and `runs` (of the
            measurement).

    Returns:
        `dict`: the tier's manifest fields `latency_ms` (median milliseconds per image) and `latency_measurement`
        (the rest of the `mpsupernet.runtime.LatencyMeasurement`: runs, batch, threads, CPU, runtime, date).
    """
    import onnxruntime as ort

    from .export import add_onnx_export
    from .runtime import measure_latency

    add_onnx_export(subnet, folder, target=onnx_options["target"], weight_container=onnx_options["weight_container"])
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = onnx_options["threads"]
    model = onnx_model_class(subnet.config).from_pretrained(folder, session_options=session_options)
    measurement = measure_latency(model, runs=onnx_options["runs"]).to_dict()
    return {"latency_ms": measurement.pop("ms_per_image"), "latency_measurement": measurement}


def _previous_manifest(target: Path) -> dict | None:
    """The manifest of the tiers in `target`: `None` for a missing folder, one without tiers for an empty folder.

    Raises:
        `ValueError`: for a file, or a non-empty folder without `tiers.json` (it is not ours to write into).
    """
    if not target.exists():
        return None
    if not target.is_dir():
        raise ValueError(f"Cannot write tiers to {str(target)!r}: it is a file, not a folder.")
    if not (target / MANIFEST_NAME).is_file():
        if not any(target.iterdir()):
            return {"tiers": {}}
        raise ValueError(
            f"{str(target)!r} is not empty and holds no {MANIFEST_NAME}, so it is not a tiers folder; save_tiers "
            "writes only into a new or empty folder or over earlier tiers, and never deletes files it did not "
            "write. Choose another folder."
        )
    return read_tiers_manifest(target)


def _top_folders(manifest: dict) -> set[str]:
    return {tier["subfolder"].split("/")[0] for tier in manifest["tiers"].values()}


def _write_tiers(
    tiers, root: Path, generation: str, base_model, dataset_name, mean_ious, repo_id, onnx_options
) -> dict:
    """Writes each tier into `root/<generation>/<name>` and returns the manifest naming them."""
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "base_model": base_model, "dataset": dataset_name}
    manifest["tiers"] = {}
    for name, subnet in sorted(tiers.items(), key=lambda item: item[1].config.bitops):
        subfolder = f"{generation}/{name}" if generation else name
        saved = _save_tier(
            subnet,
            root / subfolder,
            onnx_options,
            base_model=base_model,
            dataset_name=dataset_name,
            mean_iou=mean_ious.get(name),
            repo_id=repo_id,
            subfolder=subfolder,
        )
        summary = subnet.bitops_report().summary()
        manifest["full_precision_bitops"] = summary["full_precision_bitops"]
        manifest["tiers"][name] = {
            "subfolder": subfolder,
            "bitops": summary["bitops"],
            "share_of_full_precision": summary["share_of_full_precision"],
            "share_of_w8a8": summary["share_of_w8a8"],
            "mean_iou": mean_ious.get(name),
            "architecture": subnet.config.architecture,
            "file_bytes": saved["file_bytes"],
            "latency_ms": saved["latency_ms"],
            "latency_measurement": saved["latency_measurement"],
        }
    TiersManifest.model_validate(manifest)
    return manifest


def _write_manifest_and_overview(root: Path, manifest: dict, repo_id: str) -> None:
    # The manifest is the pointer readers follow: replaced in one step, after everything it names is in place.
    write_file_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=2))
    write_file_atomic(root / "README.md", str(render_tiers_card(manifest, root, repo_id=repo_id)))


def _check_mean_iou(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) <= 1:
        raise ValueError(f"The mean IoU of {name} is {value!r}; give a finite number in [0, 1], or None if unmeasured.")


def _check_tiers(tiers: Mapping[str, object], mean_ious: Mapping[str, float]) -> None:
    if not isinstance(tiers, Mapping):
        raise TypeError(
            f"`tiers` must map tier names to subnets, such as {{'s': subnet}}; got a {type(tiers).__name__}."
        )
    if not tiers:
        raise ValueError("`tiers` is empty; give at least one tier name → subnet.")
    for name, subnet in tiers.items():
        if not isinstance(name, str) or not TIER_NAME_PATTERN.match(name):
            raise ValueError(f"Tier name {name!r} is not a valid folder name; use letters, digits, '.', '_' and '-'.")
        if len(name) > MAX_TIER_NAME_LENGTH:
            raise ValueError(
                f"Tier name {name[:20]!r}... has {len(name)} characters; use at most {MAX_TIER_NAME_LENGTH}."
            )
        if name.lower() in RESERVED_NAMES:
            raise ValueError(
                f"Tier name {name!r} is reserved for a file of the tiers repository ({sorted(RESERVED_NAMES)}); "
                "choose another."
            )
        if getattr(getattr(subnet, "config", None), "model_type", None) not in SUBNET_MODEL_TYPES:
            raise ValueError(
                f"Tier {name!r} is a {type(subnet).__name__}, not an extracted SamSubnetForMaskGeneration (or "
                "SamSubnetForSemanticSegmentation)."
            )
    tasks = {name: pipeline_tag(subnet.config) for name, subnet in tiers.items()}
    if len(set(tasks.values())) > 1:
        raise ValueError(
            f"The tiers mix tasks ({tasks}): one tiers repository serves one task, so that `load_subnet` returns the "
            "same kind of model under every budget. Save promptable and semantic tiers apart."
        )
    unknown = sorted(set(mean_ious) - set(tiers))
    if unknown:
        raise ValueError(f"`mean_ious` names tiers {unknown} that are not among {sorted(tiers)}.")
    for name, value in mean_ious.items():
        _check_mean_iou(f"tier {name!r}", value)


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
    **save_kwargs,
) -> str:
    """Publishes several subnets as tiers of one Hub repository, in one commit.

    Each tier goes into its own subfolder (weights, config and model card); `tiers.json` lists them, and the root
    `README.md` compares them. Everything is staged and checked locally before anything is sent. The commit adds
    the new tiers and deletes every file in the tier folders of the repository's previous `tiers.json` that it does
    not replace (other files of the repository are kept). It is made on top of the head read at the start
    (`parent_commit`), so a concurrent push makes it fail rather than mix. A failure leaves the repository as it
    was: a repository this call created is deleted again.

    Args:
        tiers (`Mapping[str, SamSubnetForMaskGeneration]`): tier name (used as the subfolder) → subnet.
        repo_id (`str`): the Hub repository, created if missing.
        base_model (`str`, *optional*), dataset_name (`str`, *optional*): for the cards; default to what the
            subnets' configs record (see [`card_provenance`]).
        mean_ious (`Mapping[str, float]`, *optional*): measured mean IoU per tier.
        private (`bool`), token (`str`), revision (`str`), commit_message (`str`): as in `huggingface_hub`.
        save_kwargs: the ONNX export and latency options of [`save_tiers`] (`export_onnx=True` by default,
            `onnx_target`, `onnx_weight_container`, `latency_threads`, `latency_runs`).

    Returns:
        `str`: the commit's URL.

    Raises:
        `TypeError`, `ValueError`: for a `repo_id` that is not a Hub repository id, and what [`save_tiers`] raises;
        both before anything is exported or sent.
    """
    # Checked before save_tiers exports and times every tier, which huggingface_hub would only refuse afterwards.
    if not isinstance(repo_id, str):
        raise TypeError(f"`repo_id` must be a Hub repository id such as 'my-org/sam-mp'; got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id` {repo_id!r} is not a Hub repository id ('namespace/name'): {error}") from None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mpsupernet-tiers-") as staging:
        folder = Path(staging) / "repo"
        save_tiers(
            tiers, folder, base_model=base_model, dataset_name=dataset_name, mean_ious=mean_ious, repo_id=repo_id,
            **save_kwargs,
        )
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        created = not api.repo_exists(repo_id)
        parent_commit = None
        if not created:
            parent_commit = api.repo_info(repo_id, revision=revision).sha
            uploaded = {operation.path_in_repo for operation in operations}
            operations += _stale_tier_deletions(api, repo_id, parent_commit, uploaded, token)
        else:
            api.create_repo(repo_id, private=private, exist_ok=False)
        try:
            commit = api.create_commit(
                repo_id=repo_id,
                operations=operations,
                revision=revision,
                parent_commit=parent_commit,
                commit_message=commit_message or f"Publish {len(tiers)} mpsupernet tiers: {', '.join(sorted(tiers))}",
            )
        except BaseException:
            if created:
                api.delete_repo(repo_id, missing_ok=True)
            raise
    logger.info(f"Pushed tiers {sorted(tiers)} to {repo_id}")
    return commit.commit_url


def _stale_tier_deletions(api: HfApi, repo_id: str, commit: str, uploaded: set[str], token) -> list:
    """Deletions of the files in the tier folders of the repository's current `tiers.json` that the new upload does
    not replace: tiers dropped, and files a tier kept under its name no longer has (old weight shards)."""
    files = set(api.list_repo_files(repo_id, revision=commit))
    if MANIFEST_NAME not in files:
        return []
    try:
        previous = read_tiers_manifest(repo_id, revision=commit, token=token)
    except (ValueError, OSError) as error:
        logger.warning(f"The current {MANIFEST_NAME} of {repo_id} cannot be read ({error}); its tiers are kept.")
        return []
    owned = _top_folders(previous)
    stale = sorted(path for path in files if "/" in path and path.split("/")[0] in owned and path not in uploaded)
    return [CommitOperationDelete(path_in_repo=path) for path in stale]


def render_tiers_card(
    manifest: dict, save_directory: str | os.PathLike, *, repo_id: str | None = None, license: str = "apache-2.0"
) -> ModelCard:
    """Renders the root model card of a tiers repository (`model_cards/tiers_card.md`), the card the Hub shows.

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


class LatencyMeasurementEntry(BaseModel):
    """How a tier's published latency was measured (`mpsupernet.runtime.LatencyMeasurement` without its median)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    runs_ms: list[float] = Field(min_length=1)
    warmup_runs: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    threads: int = Field(ge=1)
    cpu: str
    runtime: str
    runtime_version: str
    provider: str
    date: str


class TierEntry(BaseModel):
    """One tier of `tiers.json`: where its subnet is, what it costs, how good and how fast it is.

    Format version 2 added `file_bytes` (bytes of each file of the tier's folder but its card), `latency_ms` (the
    median onnxruntime CPU latency of its image encoder, one image) and `latency_measurement` (how and where it was
    measured); they are absent (`None`) in version 1, and the latency is `None` for tiers saved without ONNX export.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    subfolder: str
    bitops: int = Field(gt=0)
    share_of_full_precision: float = Field(ge=0, allow_inf_nan=False)
    share_of_w8a8: float = Field(ge=0, allow_inf_nan=False)
    mean_iou: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    architecture: dict
    file_bytes: dict[str, int] | None = None
    latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    latency_measurement: LatencyMeasurementEntry | None = None

    @field_validator("subfolder")
    @classmethod
    def _inside_the_repository(cls, subfolder: str) -> str:
        parts = subfolder.split("/")
        if "\\" in subfolder or subfolder.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(
                f"{subfolder!r} is not a relative path inside the repository (no '..', '.', empty parts, backslashes "
                "or leading '/')"
            )
        return subfolder


class TiersManifest(BaseModel):
    """The schema of `tiers.json`, format version `MANIFEST_FORMAT_VERSION`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format_version: int = 1  # a manifest without one predates versioning
    base_model: str
    dataset: str | None = None
    full_precision_bitops: int = Field(gt=0)
    tiers: dict[str, TierEntry] = Field(min_length=1)


def validate_tiers_manifest(data, source: str) -> dict:
    """Checks a parsed `tiers.json` against its schema; `source` names the repository and file in every error.

    A manifest without `format_version` is of the format before versioning, which is version 1; versions 1 to
    `MANIFEST_FORMAT_VERSION` are read.

    Raises:
        `ValueError`: naming `source` and each offending field; also for a format version newer than this
        mpsupernet reads.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source} is not a valid tiers manifest: it holds a {type(data).__name__}, not an object.")
    version = data.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version {version}, newer than this mpsupernet reads ({MANIFEST_FORMAT_VERSION}); "
            "upgrade mpsupernet."
        )
    try:
        manifest = TiersManifest.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"field `{'.'.join(str(part) for part in problem['loc'])}`: {problem['msg']}"
            for problem in error.errors()
        )
        raise ValueError(f"{source} is not a valid tiers manifest: {problems}.") from None
    if not 1 <= manifest.format_version <= MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"{source} is not a valid tiers manifest: field `format_version`: {manifest.format_version} is not a "
            f"format version (this mpsupernet reads 1 to {MANIFEST_FORMAT_VERSION})."
        )
    return manifest.model_dump()


_TIERS_SOURCE = "the folder written by `save_tiers` or the Hub repository written by `push_tiers`"
"""What `read_tiers_manifest` and `load_subnet` take, for the message naming a value that is neither."""


def read_tiers_manifest(repo_id: str | os.PathLike, revision: str | None = None, token: str | None = None) -> dict:
    """The validated `tiers.json` of a Hub repository (at `revision`) or of a local folder.

    Raises:
        `FileNotFoundError`: for a local folder without `tiers.json`, or what is neither a folder nor a Hub id.
        `ValueError`: for a manifest that is not JSON or does not follow the schema, naming the repository, the
            file and the field (see [`validate_tiers_manifest`]).
    """
    local = Path(repo_id).is_dir()
    if local:
        path = Path(repo_id) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(repo_id)!r} has no {MANIFEST_NAME}, so it is not a tiers folder written by `save_tiers` or "
                "`push_tiers` (the folder of one subnet loads with `SamSubnetForMaskGeneration.from_pretrained`)."
            )
    else:
        check_hub_id(repo_id, _TIERS_SOURCE)
        path = hf_hub_download(str(repo_id), MANIFEST_NAME, revision=revision, token=token)
    where = f"{MANIFEST_NAME} of {str(repo_id)!r}" + (f" at revision {revision!r}" if revision and not local else "")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}.") from None
    return validate_tiers_manifest(data, where)


def select_tier(manifest: dict, max_bitops=None, *, max_latency_ms: float | None = None) -> str:
    """The tier to use under a BitOPs budget, a latency limit or both: the best measured mean IoU among the tiers that
    fit, else the costliest of them.

    Args:
        manifest (`dict`): a `tiers.json` (see [`read_tiers_manifest`]). A mean IoU that is not a finite number
            counts as unmeasured.
        max_bitops (*optional*): what `mpsupernet.bitops.parse_budget` takes ("40G", "5%", a number).
        max_latency_ms (`float`, *optional*): milliseconds per image of the image encoder on onnxruntime, as published
            in the manifest (`latency_ms`, measured by `save_tiers` on the machine named in `latency_measurement`).

    Raises:
        `ValueError`: if neither limit is given, a limit is not understood, or no tier fits (naming the cheapest tier,
        or the fastest measured latency and the machine it was measured on).
    """
    if max_bitops is None and max_latency_ms is None:
        raise ValueError("Give `max_bitops`, `max_latency_ms` or both to select a tier.")
    fitting = dict(manifest["tiers"])
    if max_bitops is not None:
        fitting = _tiers_within_bitops(manifest, max_bitops)
    if max_latency_ms is not None:
        fitting = _tiers_within_latency(fitting, max_latency_ms, under=None if max_bitops is None else max_bitops)

    def rank(name):
        tier = fitting[name]
        measured = tier["mean_iou"] is not None and math.isfinite(tier["mean_iou"])
        return (measured, tier["mean_iou"] if measured else 0.0, tier["bitops"])

    return max(fitting, key=rank)


def _tiers_within_bitops(manifest: dict, max_bitops) -> dict:
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
    return fitting


def _tiers_within_latency(tiers: dict, max_latency_ms, under=None) -> dict:
    """The tiers of `tiers` whose published latency is at most `max_latency_ms`; `under` names the BitOPs budget
    that already narrowed `tiers`, for the error."""
    if isinstance(max_latency_ms, bool) or not isinstance(max_latency_ms, numbers.Real) or not (
        math.isfinite(max_latency_ms) and max_latency_ms > 0
    ):
        raise ValueError(f"`max_latency_ms` got {max_latency_ms!r}; give a positive number of milliseconds per image.")
    measured = {name: tier for name, tier in tiers.items() if tier.get("latency_ms") is not None}
    scope = "" if under is None else f" under max_bitops={under!r}"
    if not measured:
        raise ValueError(
            f"No tier{scope} has a published latency (the tiers were saved with `export_onnx=False`); select them with "
            "`max_bitops`."
        )
    fitting = {name: tier for name, tier in measured.items() if tier["latency_ms"] <= max_latency_ms}
    if not fitting:
        fastest = min(measured, key=lambda name: measured[name]["latency_ms"])
        raise ValueError(
            f"No tier{scope} runs within {max_latency_ms} ms per image; the fastest, {fastest!r}, measured "
            f"{measured[fastest]['latency_ms']:.2f} ms per image on {describe_latency_measurement(measured[fastest])}. "
            "Measured tiers: "
            + ", ".join(f"{name}={tier['latency_ms']:.2f} ms" for name, tier in measured.items())
        )
    return fitting


def describe_latency_measurement(tier: dict) -> str:
    """The machine and settings of a tier's published latency, in words."""
    machine = tier["latency_measurement"]
    return (
        f"{machine['cpu']} ({machine['threads']} thread{'s' if machine['threads'] != 1 else ''}, batch "
        f"{machine['batch_size']}, {machine['runtime']} "
        f"{machine['runtime_version']}, {machine['date']})"
    )


LOAD_RUNTIMES = ("pytorch", "onnxruntime", "openvino")
"""What `load_subnet` can return a tier for: the PyTorch subnet, or its ONNX export on onnxruntime or OpenVINO."""


def _tier_config(source, subfolder: str, kwargs: dict) -> dict:
    """The `config.json` of a tier (a promptable or a semantic subnet), read before its weights."""
    from transformers import PretrainedConfig

    if isinstance(source, Path):
        return PretrainedConfig.get_config_dict(source / subfolder)[0]
    hub = {key: kwargs[key] for key in ("revision", "token") if key in kwargs}
    return PretrainedConfig.get_config_dict(source, subfolder=subfolder, **hub)[0]


def load_subnet(
    repo_id: str | os.PathLike,
    max_bitops=None,
    revision: str | None = None,
    token: str | None = None,
    *,
    max_latency_ms: float | None = None,
    runtime: str = "pytorch",
    **kwargs,
):
    """Downloads and loads the best ready-made tier under a BitOPs budget, a latency limit or both.

    On the Hub, `revision` is resolved to a commit once, and the manifest and the weights are both read at that
    commit, so a push in between cannot pair one tier's entry with another's weights. In a local folder that is
    being rewritten by `save_tiers`, a tier removed while it loads makes this read the new manifest and try again.
    Either way the loaded subnet's BitOPs, counted from its own architecture, are checked against the budget.

    Args:
        repo_id (`str` or `os.PathLike`): a Hub repository written by [`push_tiers`], or a local copy of one.
        max_bitops (`int`, `float` or `str`, *optional*): the budget: a number of BitOPs, `"40G"`, `"1.5T"`, or
            `"5%"` of the full-precision model.
        revision (`str`), token (`str`): as in `huggingface_hub`.
        max_latency_ms (`float`, *optional*): the published onnxruntime CPU latency of the image encoder, in
            milliseconds per image, that the tier must not exceed (see [`select_tier`]; measured on the machine the
            manifest and the tier's card name, so scale it to yours).
        runtime (`str`, *optional*, defaults to `"pytorch"`): `"pytorch"` returns the `SamSubnetForMaskGeneration`;
            `"onnxruntime"` (or `"openvino"`) returns the tier's ONNX export as a `mpsupernet.runtime.OnnxSamModel`.
        kwargs: passed to `SamSubnetForMaskGeneration.from_pretrained` or `OnnxSamModel.from_pretrained`
            (e.g. `provider`, `session_options`).

    Returns:
        `SamSubnetForMaskGeneration` or `OnnxSamModel`: the chosen tier; its BitOPs are within the budget.

    Raises:
        `ValueError`: if no tier fits, the manifest is invalid, the loaded tier is over the budget, `runtime` is
            unknown, or the tier holds no ONNX export for an ONNX runtime.
        `OSError`: if the tier's folder is missing or its files cannot be read (the tier is named), or `repo_id` is
            neither a folder nor a Hub repository that exists and can be read (`FileNotFoundError`, naming it).
    """
    if runtime not in LOAD_RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; allowed: {list(LOAD_RUNTIMES)}.")
    kwargs.update(max_latency_ms=max_latency_ms, runtime=runtime)
    if not Path(repo_id).is_dir():
        check_hub_id(repo_id, _TIERS_SOURCE)
        with finding_on_the_hub(str(repo_id), _TIERS_SOURCE):
            commit = HfApi(token=token).repo_info(str(repo_id), revision=revision, token=token).sha
        manifest = read_tiers_manifest(repo_id, revision=commit, token=token)
        where = f"{repo_id!r} at commit {commit}"
        return _load_tier(manifest, max_bitops, where, str(repo_id), revision=commit, token=token, **kwargs)
    root = Path(repo_id)
    for _ in range(LOCAL_LOAD_ATTEMPTS):
        manifest = read_tiers_manifest(root)
        try:
            return _load_tier(manifest, max_bitops, repr(str(root)), root, **kwargs)
        except (OSError, RuntimeError) as error:
            # A concurrent save_tiers removes the old tiers only after replacing the manifest: if it changed, retry.
            # (transformers memory-maps safetensors files, and reports one removed under it as a RuntimeError.)
            if read_tiers_manifest(root) == manifest:
                raise
            interrupted = error
    raise OSError(
        f"The tiers in {str(root)!r} were rewritten {LOCAL_LOAD_ATTEMPTS} times while loading; load again once "
        "the writer is done."
    ) from interrupted


def _load_tier(manifest: dict, max_bitops, where: str, source, *, max_latency_ms, runtime, **kwargs):
    tier = select_tier(manifest, max_bitops, max_latency_ms=max_latency_ms)
    entry = manifest["tiers"][tier]
    subfolder = entry["subfolder"]
    if runtime != "pytorch":
        from .runtime import VISION_ENCODER_FILE

        if VISION_ENCODER_FILE not in (entry["file_bytes"] or {}):
            raise ValueError(
                f"Tier {tier!r} of {where} has no ONNX export (it was saved with `export_onnx=False`); load it with "
                "runtime='pytorch', or save the tiers again with their ONNX files."
            )
    logger.info(f"Loading tier {tier!r} ({entry['bitops'] / 1e9:.3f} GBitOPs) from {where}")
    try:
        if isinstance(source, Path):
            folder = source / subfolder
            if not folder.resolve().is_relative_to(source.resolve()):
                raise ValueError(f"Tier {tier!r} of {MANIFEST_NAME} in {where} points outside it: {subfolder!r}.")
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"Tier {tier!r} of {MANIFEST_NAME} in {where} names the subfolder {subfolder!r}, which holds no "
                    "subnet (no config.json)."
                )
        config = _tier_config(source, subfolder, kwargs)
        if runtime != "pytorch":
            model = onnx_model_class(config).from_pretrained(source, subfolder=subfolder, runtime=runtime, **kwargs)
        elif isinstance(source, Path):
            model = subnet_class(config).from_pretrained(source / subfolder, **kwargs)
        else:
            model = subnet_class(config).from_pretrained(source, subfolder=subfolder, **kwargs)
    except FileNotFoundError:
        raise
    except (OSError, EntryNotFoundError) as error:
        raise OSError(f"Could not load tier {tier!r} (subfolder {subfolder!r}) of {where}: {error}") from error
    if max_bitops is None:
        return model
    budget = parse_budget(max_bitops, manifest["full_precision_bitops"])
    if runtime != "pytorch":
        bitops = model.config["bitops"]
    else:
        bitops = max(model.config.bitops, model.bitops_report().total_bitops)
    if bitops > budget:
        raise ValueError(
            f"Tier {tier!r} of {where} loaded as a subnet of {bitops} BitOPs, over the budget {max_bitops!r} "
            f"({budget} BitOPs), although {MANIFEST_NAME} lists it at {entry['bitops']}: the manifest and the tier do "
            "not match. Refusing it."
        )
    return model
