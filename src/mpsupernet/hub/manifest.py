"""`tiers.json`, the manifest of a tiers folder or repository: its schema, reading it, and choosing a tier from it.

The manifest lists every tier with its BitOPs, quality, file bytes and measured onnxruntime latency, so that
`load_subnet` can pick the best tier under a budget or a latency limit after downloading one small file. It carries a
`format_version` and is validated against its schema ([`TiersManifest`]); it is the pointer readers follow, so
writers replace it last and atomically.
"""

import json
import math
import numbers
import os
import re
from pathlib import Path

from huggingface_hub import hf_hub_download
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .._hub_ids import check_hub_id
from ..bitops import parse_budget
from ..layout import CARD_NAME, MANIFEST_NAME

MANIFEST_FORMAT_VERSION = 2
"""The `format_version` of the `tiers.json` this mpsupernet writes; newer ones are refused, older ones read (version
2 added each tier's file bytes and measured latency)."""
TIER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_TIER_NAME_LENGTH = 96
RESERVED_NAMES = frozenset({MANIFEST_NAME, CARD_NAME.lower(), ".gitattributes"})


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


TIERS_SOURCE = "the folder written by `save_tiers` or the Hub repository written by `push_tiers`"
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
        check_hub_id(repo_id, TIERS_SOURCE)
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


def top_folders(manifest: dict) -> set[str]:
    """The top-level folders of a tiers folder that the tiers of `manifest` live in (generations or tier names)."""
    return {tier["subfolder"].split("/")[0] for tier in manifest["tiers"].values()}


def check_mean_iou(name: str, value) -> None:
    """Refuses a mean IoU that is not `None` or a finite number in [0, 1]; `name` says whose it is."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) <= 1:
        raise ValueError(f"The mean IoU of {name} is {value!r}; give a finite number in [0, 1], or None if unmeasured.")
