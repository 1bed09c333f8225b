"""Writing subnets as tiers: each tier a model folder with its card (and ONNX export), and `tiers.json` naming them."""

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import ModelCard

from ..atomic import parents_made, remove_stale_staging, replace_folder, write_file_atomic, writer_lock
from ..layout import CARD_NAME, GENERATION_PREFIX, MANIFEST_NAME
from ..tasks import onnx_model_class, pipeline_tag
from .cards import card_provenance, render_subnet_card, render_tiers_card
from .manifest import (
    MANIFEST_FORMAT_VERSION,
    MAX_TIER_NAME_LENGTH,
    RESERVED_NAMES,
    TIER_NAME_PATTERN,
    TiersManifest,
    check_mean_iou,
    read_tiers_manifest,
    top_folders,
)

# Tier names start with a letter or digit, so these never collide with one.
GENERATION_PATTERN = re.compile(rf"^{GENERATION_PREFIX}(\d+)$")
SUBNET_MODEL_TYPES = ("sam_subnet", "sam_semantic_subnet")
"""The `model_type`s a tier may have: an extracted promptable or semantic segmentation subnet."""


def save_subnet_with_card(subnet, save_directory: str | os.PathLike, **card_kwargs) -> ModelCard:
    """Saves a subnet (safetensors, config, image processor) and its model card (`README.md`) into `save_directory`.

    The folder is written through the one staging helper (`mpsupernet.atomic.replace_folder`): after a kill at any
    moment it loads as the old subnet or the new one, with its own card, or is refused. `card_kwargs` go to
    [`render_subnet_card`].
    """
    check_mean_iou("the subnet", card_kwargs.get("mean_iou"))
    if Path(save_directory).is_file():
        raise ValueError(f"Cannot save a model to {str(save_directory)!r}: it is a file, not a folder.")
    saved = {}

    def write(folder: Path) -> None:
        file_bytes = _write_tier(subnet, folder, None)["file_bytes"]
        saved["card"] = render_subnet_card(subnet, file_bytes=file_bytes, **card_kwargs)
        saved["card"].save(folder / CARD_NAME)

    replace_folder(save_directory, write)
    return saved["card"]


def _write_tier(subnet, folder: Path, onnx_options: Mapping | None) -> dict:
    """Writes a subnet's model folder into `folder`, which the caller owns, with `onnx_options` its ONNX export too,
    measured; returns the manifest fields `file_bytes` (every file but the card), `latency_ms` and
    `latency_measurement`."""
    if onnx_options is None:
        subnet.write_model_folder(folder)
        latency = {"latency_ms": None, "latency_measurement": None}
    else:
        latency = export_and_measure_tier(subnet, folder, onnx_options)
    file_bytes = {path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()}
    return {"file_bytes": file_bytes, **latency}


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
    subfolder (`_v<n>/<tier>`), renamed into place once complete; `tiers.json` is replaced last, atomically, and
    only then are the tier folders of the previous manifest removed: after a kill at any moment the folder holds the
    complete old or new tiers (a concurrent `load_subnet` gets one or the other). Leftovers of a killed write go with
    the next one; nothing else is deleted. Writers of one folder take turns (`mpsupernet.atomic.writer_lock`): a
    second `save_tiers` into a folder being written is refused, and the folder holds one writer's complete tiers.

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
        a folder that is not empty and holds no tiers (it is named); nothing is written.
        `mpsupernet.atomic.ConcurrentWriteError`: if another writer is writing the folder; nothing is written. `TypeError`: if `tiers` is
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
    if onnx_options is not None:
        from ..export.writer import check_quantizers

        for subnet in tiers.values():
            check_quantizers(subnet)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot write tiers to {str(target)!r}: it is a file, not a folder.")
    card_repo_id = repo_id or target.resolve().name

    def write(folder: Path, prefix: str) -> dict:
        return _write_tiers(tiers, folder, prefix, base_model, dataset_name, mean_ious, card_repo_id, onnx_options)

    # Under the lock no other writer changes the folder between reading its manifest and replacing it.
    with parents_made(target), writer_lock(target):
        previous = _previous_manifest(target)
        if previous is None:
            written = {}

            def write_folder(folder: Path) -> None:
                written["manifest"] = write(folder, "")
                _write_manifest_and_overview(folder, written["manifest"], card_repo_id)

            replace_folder(target, write_folder)
            return written["manifest"]
        referenced = top_folders(previous)
        generation = _next_generation(target, referenced)
        written = {}
        replace_folder(target / generation, lambda folder: written.update(manifest=write(folder, generation)))
        manifest = written["manifest"]
        _write_manifest_and_overview(target, manifest, card_repo_id)
        for folder in sorted(referenced - top_folders(manifest)):
            shutil.rmtree(target / folder, ignore_errors=True)
        return manifest


def _next_generation(target: Path, referenced: set[str]) -> str:
    """The name of the next generation folder of a tiers folder, after removing what killed writes left behind:
    staging files of the manifest and card, and generation folders that the current manifest does not name."""
    for name in (MANIFEST_NAME, CARD_NAME):
        remove_stale_staging(target / name)
    generations = [int(match[1]) for p in target.iterdir() if (match := GENERATION_PATTERN.fullmatch(p.name))]
    for number in generations:
        if f"{GENERATION_PREFIX}{number}" not in referenced:
            shutil.rmtree(target / f"{GENERATION_PREFIX}{number}", ignore_errors=True)
    return f"{GENERATION_PREFIX}{max(generations, default=0) + 1}"


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
    from ..export.writer import check_export_arguments

    opset = check_export_arguments(target, weight_container, None)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`latency_threads` must be a positive integer or None; got {threads!r}.")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"`latency_runs` must be a positive integer; got {runs!r}.")
    return {
        "target": target,
        "weight_container": weight_container,
        "opset": opset,
        "threads": threads or os.cpu_count(),
        "runs": runs,
    }


def export_and_measure_tier(subnet, folder: str | os.PathLike, onnx_options: Mapping) -> dict:
    """Writes the model folder of `subnet` with its ONNX export into `folder`, which the caller owns (a staging
    folder), and measures its encoder on onnxruntime.

    Args:
        subnet (`SamSubnetForMaskGeneration`): the tier.
        folder (`str` or `os.PathLike`): the tier's folder.
        onnx_options (`Mapping`): `target`, `weight_container`, `opset` (of the export), `threads` and `runs` (of
            the measurement), as `save_tiers` checked them.

    Returns:
        `dict`: the tier's manifest fields `latency_ms` (median milliseconds per image) and `latency_measurement`
        (the rest of the `mpsupernet.runtime.LatencyMeasurement`: runs, batch, threads, CPU, runtime, date).
    """
    import onnxruntime as ort

    from ..export.writer import write_onnx_files
    from ..runtime import measure_latency

    export = {key: onnx_options[key] for key in ("target", "weight_container", "opset")}
    subnet.write_model_folder(Path(folder), export=lambda folder: write_onnx_files(subnet, folder, **export))
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


def _write_tiers(
    tiers, folder: Path, prefix: str, base_model, dataset_name, mean_ious, repo_id, onnx_options
) -> dict:
    """Writes each tier into `folder/<name>` (a folder the caller owns) and returns the manifest naming them, with
    `prefix` (a generation, or nothing) before each name; the tiers' cards come last, once the manifest is known."""
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "base_model": base_model, "dataset": dataset_name}
    manifest["tiers"] = {}
    ordered = sorted(tiers.items(), key=lambda item: item[1].config.bitops)
    for name, subnet in ordered:
        saved = _write_tier(subnet, folder / name, onnx_options)
        summary = subnet.bitops_report().summary()
        manifest["full_precision_bitops"] = summary["full_precision_bitops"]
        manifest["tiers"][name] = {
            "subfolder": f"{prefix}/{name}" if prefix else name,
            "bitops": summary["bitops"],
            "share_of_full_precision": summary["share_of_full_precision"],
            "share_of_w8a8": summary["share_of_w8a8"],
            "mean_iou": mean_ious.get(name),
            "architecture": subnet.config.architecture,
            **saved,
        }
    TiersManifest.model_validate(manifest)
    for name, subnet in ordered:
        entry = manifest["tiers"][name]
        latency = None if entry["latency_ms"] is None else {key: entry[key] for key in ("latency_ms", "latency_measurement")}
        card = render_subnet_card(
            subnet,
            base_model=base_model,
            dataset_name=dataset_name,
            mean_iou=entry["mean_iou"],
            repo_id=repo_id,
            subfolder=entry["subfolder"],
            has_onnx=latency is not None,
            file_bytes=entry["file_bytes"],
            latency=latency,
            manifest=manifest,
        )
        card.save(folder / name / CARD_NAME)
    return manifest


def _write_manifest_and_overview(root: Path, manifest: dict, repo_id: str) -> None:
    # The manifest is the pointer readers follow: replaced in one step, after everything it names is in place.
    write_file_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=2))
    write_file_atomic(root / CARD_NAME, str(render_tiers_card(manifest, root, repo_id=repo_id)))




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
        check_mean_iou(f"tier {name!r}", value)
