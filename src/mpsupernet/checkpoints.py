"""Saving model folders crash-safely, and clear errors for checkpoints that cannot be read or do not belong together.

A model folder pairs a `config.json` with weights. Written file by file, a kill in between could pair a new config
with old weights of the same shapes (W4A4 weights under a W4A6 config), which loads silently as neither model. So
every save records the sha256 of each weights file in `config.json` (`weights_sha256`), writes the config and the
other small files first and the weights last, and every load checks the digests: a folder whose config and weights
come from different saves is refused. Folders without digests (older saves, SAM checkpoints) load as before.
"""

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from .atomic import (
    apply_default_permissions,
    fsync_directory,
    fsync_tree,
    is_empty_directory,
    make_staging_directory,
    move_into_place,
    remove_stale_staging,
)

CONFIG_NAME = "config.json"
WEIGHTS_DIGEST_KEY = "weights_sha256"
EXPORT_KEY = "export"
"""The `config.json` section an ONNX export adds (`mpsupernet.export`), listing the files it wrote beside the weights."""
WEIGHTS_NAME_PATTERN = re.compile(r"^(model|pytorch_model|adapter_model)[.-]")


@contextmanager
def readable_safetensors(source, what: str):
    """Turns safetensors' terse header errors into an `OSError` that names the checkpoint and says what to do.

    Args:
        source: the folder or Hub repo id being loaded.
        what (`str`): what the checkpoint holds ("supernet", "subnet"), for the message.
    """
    try:
        yield
    except SafetensorError as error:
        raise OSError(
            f"The weights of {str(source)!r} are not a readable safetensors file (corrupted or truncated: {error}). "
            f"Save the {what} again, or download it again with `force_download=True`."
        ) from error


def state_dict_sha256(model) -> str:
    """sha256 (hex) of a model's state dict as it is in memory: every tensor's name, dtype, shape and bytes, in name
    order. It identifies the weights a figure was measured with (a search's front records it), whatever folder, if
    any, they were loaded from or will be saved to. Reads every tensor once (about a second for ViT-B)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def is_weights_file(name: str) -> bool:
    """Whether a file is one `from_pretrained` reads weights from: `model.safetensors`, `pytorch_model.bin`, their
    shards, variants and shard indexes. Other tensor files in the folder are not the model's."""
    if WEIGHTS_NAME_PATTERN.match(name) is None:
        return False
    return name.endswith((".safetensors", ".bin")) or ".index." in name


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digests(folder: str | os.PathLike) -> dict[str, str]:
    """`{file name: sha256}` of the weights files directly in `folder`."""
    folder = Path(folder)
    return {
        path.name: file_sha256(path)
        for path in sorted(folder.iterdir())
        if path.is_file() and is_weights_file(path.name)
    }


def exported_file_names(directory: str | os.PathLike) -> set[str]:
    """The names an ONNX export wrote into `directory`, `config.json` included (empty if its `config.json` has no
    `export` section or cannot be read)."""
    try:
        export = json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))[EXPORT_KEY]
        return {CONFIG_NAME, *export["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _recorded_digests(config_path: Path) -> dict:
    """The digests an existing `config.json` records, or `{}` when it records none or cannot be read."""
    try:
        recorded = json.loads(config_path.read_text(encoding="utf-8")).get(WEIGHTS_DIGEST_KEY)
    except (OSError, ValueError, AttributeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def save_model_folder(save_directory: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Writes a model folder so that a kill at any moment leaves the old model, the new one, or a refused folder.

    `write(folder)` fills a fresh staging folder next to `save_directory` (same parent). The digests of its weights
    go into its `config.json`. A missing or empty `save_directory` is then replaced by the staging folder in one
    rename. Otherwise the files move in one by one: `config.json` first, then the other small files, the weights
    last, so that until the last weights file is in place the config's digests do not match and the folder is
    refused on load; weights files and ONNX export files of the previous save that the new one does not have are
    removed at the end (only those the previous `config.json` recorded, i.e. that a save or an export wrote: an
    export of the old weights would no longer match, and the new `config.json` does not describe it). Other files in
    the folder are left alone.

    Raises:
        `ValueError`: if `save_directory` is a file.
    """
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"Cannot save a model to {str(target)!r}: it is a file, not a folder.")
    remove_stale_staging(target)
    staging = make_staging_directory(target)
    try:
        write(staging)
        apply_default_permissions(staging)
        config_path = staging / CONFIG_NAME
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config[WEIGHTS_DIGEST_KEY] = weights_digests(staging)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if not target.exists() or is_empty_directory(target):
            move_into_place(staging, target)
            return
        previous = _recorded_digests(target / CONFIG_NAME)
        previous_export = exported_file_names(target)
        fsync_tree(staging)
        names = sorted(path.name for path in staging.iterdir())
        order = sorted(names, key=lambda name: (name != CONFIG_NAME, is_weights_file(name), name))
        for name in order:
            os.replace(staging / name, target / name)
        for name in previous:
            if name not in names and is_weights_file(name) and "/" not in name:
                (target / name).unlink(missing_ok=True)
        for name in sorted(previous_export - set(names)):
            if "/" not in name and (target / name).is_file():
                (target / name).unlink(missing_ok=True)
        fsync_directory(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_weights_digests(folder: str | os.PathLike, source=None) -> None:
    """Refuses a model folder whose weights are not those its `config.json` records (no digest: nothing to check).

    Args:
        folder: the local folder (or Hub cache snapshot) holding `config.json` and the weights.
        source: how the user named it (folder or Hub id), for the message; defaults to `folder`.

    Raises:
        `OSError`: naming the folder, the file, and the expected and found digests.
    """
    folder = Path(folder)
    source = str(source if source is not None else folder)
    try:
        recorded = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get(WEIGHTS_DIGEST_KEY)
    except (OSError, ValueError, AttributeError):
        return
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise OSError(f"The {CONFIG_NAME} of {source!r} has a malformed {WEIGHTS_DIGEST_KEY!r} entry: {recorded!r}.")
    for name, expected in recorded.items():
        path = folder / name
        if not path.is_file():
            raise OSError(
                f"{source!r} is incomplete: its {CONFIG_NAME} records the weights file {name!r}, which is missing. "
                "An interrupted save? Save the model again."
            )
        found = file_sha256(path)
        if found != expected:
            raise OSError(
                f"The weights of {source!r} do not match its config: {CONFIG_NAME} records sha256 {expected} for "
                f"{name!r}, but the file has sha256 {found}. The file is damaged or comes from another save (an "
                "interrupted save?); save the model again."
            )
    present = (path.name for path in folder.iterdir() if path.is_file() and is_weights_file(path.name))
    unrecorded = sorted(name for name in present if name not in recorded)
    if unrecorded:
        raise OSError(
            f"{source!r} holds weights files {unrecorded} that its {CONFIG_NAME} does not record: they come from "
            "another save (an interrupted save?). Save the model again."
        )


def loaded_folder(source, kwargs: dict) -> Path | None:
    """The folder `from_pretrained(source, **kwargs)` read: the local folder, or the Hub cache snapshot."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(source):
        return Path(source) / subfolder
    from transformers.utils import cached_file

    path = cached_file(
        str(source),
        CONFIG_NAME,
        subfolder=subfolder,
        revision=kwargs.get("revision"),
        cache_dir=kwargs.get("cache_dir"),
        token=kwargs.get("token"),
        local_files_only=True,
        _raise_exceptions_for_missing_entries=False,
    )
    return Path(path).parent if path else None


class CrashSafeSaveMixin:
    """`save_pretrained` that writes the folder through [`save_model_folder`], and `from_pretrained` that checks it.

    Put it before `PreTrainedModel` among the bases.
    """

    checkpoint_kind = "model"

    def _save_companion_files(self, folder: Path) -> None:
        """Files that belong in the saved folder beside config and weights (none here); written inside the save."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        """As `PreTrainedModel.save_pretrained`, but crash-safe (see `mpsupernet.checkpoints.save_model_folder`)."""
        if not is_main_process:
            # Other processes of a distributed save write nothing; transformers only creates the folder.
            return super().save_pretrained(save_directory, is_main_process=False, **kwargs)
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision", "tags")
            if key in kwargs
        }
        save = super().save_pretrained

        def write(folder: Path) -> None:
            save(folder, **kwargs)
            self._save_companion_files(folder)

        save_model_folder(save_directory, write)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            return self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, refusing a folder whose config and weights do not belong together."""
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        name = f"{source}/{kwargs['subfolder']}" if kwargs.get("subfolder") else source
        local = os.path.isdir(source)
        if local and kwargs.get("config") is None and not (loaded_folder(source, kwargs) / CONFIG_NAME).is_file():
            # transformers would build a default SAM and fail on the weights with a size-mismatch report
            raise FileNotFoundError(
                f"{str(name)!r} has no {CONFIG_NAME}: it is not a complete {cls.checkpoint_kind} folder (the file is "
                f"missing beside {sorted(path.name for path in loaded_folder(source, kwargs).glob('*'))}). Save the "
                f"{cls.checkpoint_kind} again with `save_pretrained`."
            )
        if local:
            # Checked before reading: mismatched weights can fail in transformers with a less telling error.
            check_weights_digests(loaded_folder(source, kwargs), name)
        with readable_safetensors(source, cls.checkpoint_kind):
            loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        folder = None if local else loaded_folder(source, kwargs)
        if folder is not None:
            check_weights_digests(folder, name)
        # The digests and an ONNX export's section describe the files just read, not the model in memory; a later
        # save records its own (and `add_onnx_export` a fresh export section), never a stale copy of these.
        model.config.__dict__.pop(WEIGHTS_DIGEST_KEY, None)
        model.config.__dict__.pop(EXPORT_KEY, None)
        return loaded
