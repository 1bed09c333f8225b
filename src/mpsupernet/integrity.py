"""Which files a folder's `config.json` describes, their digests, and the check that a folder holds those files.

A model folder's `config.json` records the sha256 of every file it describes: the weights under `weights_sha256`,
and the files of an ONNX export under `export.sha256` (the export's `files` list names them, `config.json`
included). A file replaced by another save's, or a folder caught half-way through a save, then fails the check
instead of loading as neither model. Folders that record no digests (older saves, SAM checkpoints, older exports)
load as before.

Standard library only: the PyTorch-free runtime (`mpsupernet.runtime`) checks exports with it too.
"""

import hashlib
import json
import os
import re
from pathlib import Path

from .layout import CONFIG_NAME, EXPORT_DIGEST_KEY, EXPORT_FILES_KEY, EXPORT_KEY, WEIGHTS_DIGEST_KEY

WEIGHTS_NAME_PATTERN = re.compile(r"^(model|pytorch_model|adapter_model)[.-]")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_weights_file(name: str) -> bool:
    """Whether a file is one `from_pretrained` reads weights from: `model.safetensors`, `pytorch_model.bin`, their
    shards, variants and shard indexes. Other tensor files in the folder are not the model's."""
    if WEIGHTS_NAME_PATTERN.match(name) is None:
        return False
    return name.endswith((".safetensors", ".bin")) or ".index." in name


def digests_of(folder: str | os.PathLike, names) -> dict[str, str]:
    """`{name: sha256}` of the files `names` directly in `folder`, in name order."""
    return {name: file_sha256(Path(folder) / name) for name in sorted(names)}


def weights_digests(folder: str | os.PathLike) -> dict[str, str]:
    """`{file name: sha256}` of the weights files directly in `folder`."""
    folder = Path(folder)
    return digests_of(folder, (path.name for path in folder.iterdir() if path.is_file() and is_weights_file(path.name)))


def read_config(folder: str | os.PathLike) -> dict | None:
    """The parsed `config.json` of `folder`, or `None` where there is none or it cannot be read as a JSON object."""
    try:
        config = json.loads((Path(folder) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def write_config(folder: str | os.PathLike, config: dict) -> None:
    """Writes `config` as the `config.json` of `folder`, which its writer owns (a staging folder): the one place a
    model folder's or an export's config is written, once per save, after the files whose digests it records."""
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def described_files(config: dict | None) -> set[str]:
    """The names of the files a `config.json` describes (its weights and its ONNX export's files), `config.json`
    included when it describes any; files directly in the folder only."""
    if not config:
        return set()
    names = set()
    weights = config.get(WEIGHTS_DIGEST_KEY)
    if isinstance(weights, dict):
        names.update(weights)
    export = config.get(EXPORT_KEY)
    if isinstance(export, dict) and isinstance(export.get(EXPORT_FILES_KEY), list):
        names.update(name for name in export[EXPORT_FILES_KEY] if isinstance(name, str))
    names = {name for name in names if "/" not in name and "\\" not in name and name not in ("", ".", "..")}
    return names | {CONFIG_NAME} if names else names


KINDS = {WEIGHTS_DIGEST_KEY: ("weights", "weights file"), EXPORT_KEY: ("ONNX export files", "export file")}
"""The config entries holding digests, and how the messages call their files (the group and one file)."""


def check_digests(folder: str | os.PathLike, recorded, kind: str, source) -> None:
    """Refuses a folder whose files are not those that `recorded` (`{name: sha256}`, from its `config.json`) names.

    Args:
        folder: the local folder (or Hub cache snapshot).
        recorded: the digests as read from the config (checked here to map names to strings).
        kind (`str`): `"weights_sha256"` or `"export"`: which entry of the config they come from, for the messages.
        source: how the user named the folder (folder or Hub id), for the messages.

    Raises:
        `OSError`: naming `source`, the file, and the expected and found digests (or that the file is missing).
    """
    folder, source = Path(folder), str(source)
    group, one = KINDS[kind]
    if not isinstance(recorded, dict) or not all(isinstance(value, str) for value in recorded.values()):
        raise OSError(f"The {CONFIG_NAME} of {source!r} has a malformed {kind!r} entry: {recorded!r}.")
    for name, expected in recorded.items():
        path = folder / name
        if "/" in name or not path.is_file():
            raise OSError(
                f"{source!r} is incomplete: its {CONFIG_NAME} records the {one} {name!r}, which is missing. An "
                "interrupted save? Save the model again."
            )
        found = file_sha256(path)
        if found != expected:
            raise OSError(
                f"The {group} of {source!r} do not match its config: {CONFIG_NAME} records sha256 {expected} for "
                f"{name!r}, but the file has sha256 {found}. The file is damaged or comes from another save (an "
                "interrupted save?); save the model again."
            )


__all__ = [
    "check_digests",
    "described_files",
    "digests_of",
    "file_sha256",
    "is_weights_file",
    "read_config",
    "weights_digests",
    "write_config",
]
