"""Loading the best ready-made tier under a budget, from a tiers folder or a Hub repository."""

import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from transformers.utils import logging

from .._hub_ids import check_hub_id, finding_on_the_hub
from ..bitops import parse_budget
from ..layout import CONFIG_NAME, MANIFEST_NAME, VISION_ENCODER_NAME
from ..tasks import onnx_model_class, subnet_class
from .manifest import TIERS_SOURCE, read_tiers_manifest, select_tier

logger = logging.get_logger(__name__)

LOCAL_LOAD_ATTEMPTS = 10
LOAD_RUNTIMES = ("pytorch", "onnxruntime", "openvino")
"""What `load_subnet` can return a tier for: the PyTorch subnet, or its ONNX export on onnxruntime or OpenVINO."""


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
    commit, so a push in between cannot pair one tier's entry with another's weights. Offline (`HF_HUB_OFFLINE=1`)
    or with the Hub unreachable, the commit is the last one the local cache saw, and the tier is read from the
    cache, as `huggingface_hub` and transformers do. In a local folder that is
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
            neither a folder nor a Hub repository that exists and can be read (`FileNotFoundError`, naming it), or
            the Hub was not reached and the cache lacks the manifest or the tier (`FileNotFoundError`, naming what
            is missing).
    """
    if runtime not in LOAD_RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; allowed: {list(LOAD_RUNTIMES)}.")
    kwargs.update(max_latency_ms=max_latency_ms, runtime=runtime)
    if not Path(repo_id).is_dir():
        check_hub_id(repo_id, TIERS_SOURCE)
        commit = _resolve_commit(str(repo_id), revision, token, kwargs.get("cache_dir"))
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


def _resolve_commit(repo_id: str, revision: str | None, token, cache_dir) -> str:
    """The commit `revision` of `repo_id` points at, read where `huggingface_hub` reads it when it downloads
    `tiers.json`: from the Hub, or, offline (`HF_HUB_OFFLINE=1`) or with the Hub unreachable, from the local cache
    (the last commit it saw for `revision`).

    Raises:
        `FileNotFoundError`: when the Hub was not reached and the cache holds no `tiers.json` of `repo_id` at
            `revision`, naming both; and what `mpsupernet._hub_ids.finding_on_the_hub` raises.
    """
    try:
        with finding_on_the_hub(repo_id, TIERS_SOURCE):
            try:
                path = hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, token=token, cache_dir=cache_dir)
            except LocalEntryNotFoundError as error:
                first_line = next(iter(str(error).strip().splitlines()), "")
                at = f" at revision {revision!r}" if revision else ""
                raise FileNotFoundError(
                    f"{repo_id!r} cannot be loaded: the Hub was not reached and the local cache holds no "
                    f"{MANIFEST_NAME} of it{at} ({first_line}). Load it once with the Hub reachable, or give a local "
                    "tiers folder."
                ) from error
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} holds no {MANIFEST_NAME}, so it is not a tiers repository written by `push_tiers` (the "
            "repository of one subnet loads with `SamSubnetForMaskGeneration.from_pretrained`)."
        ) from None
    return Path(path).parent.name  # <cache>/models--<namespace>--<name>/snapshots/<commit>/tiers.json


def _tier_config(source, subfolder: str, kwargs: dict) -> dict:
    """The `config.json` of a tier (a promptable or a semantic subnet), read before its weights."""
    from transformers import PretrainedConfig

    if isinstance(source, Path):
        return PretrainedConfig.get_config_dict(source / subfolder)[0]
    hub = {key: kwargs[key] for key in ("revision", "token") if key in kwargs}
    return PretrainedConfig.get_config_dict(source, subfolder=subfolder, **hub)[0]


def _load_tier(manifest: dict, max_bitops, where: str, source, *, max_latency_ms, runtime, **kwargs):
    tier = select_tier(manifest, max_bitops, max_latency_ms=max_latency_ms)
    entry = manifest["tiers"][tier]
    subfolder = entry["subfolder"]
    if runtime != "pytorch":
        if VISION_ENCODER_NAME not in (entry["file_bytes"] or {}):
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
            if not (folder / CONFIG_NAME).is_file():
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
    except FileNotFoundError as error:
        if isinstance(source, Path):
            raise
        raise FileNotFoundError(f"Could not load tier {tier!r} (subfolder {subfolder!r}) of {where}: {error}") from error
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
