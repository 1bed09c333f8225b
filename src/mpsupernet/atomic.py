"""Crash-safe writes: after a kill at any moment, a file or folder holds its complete old content or its new one.

POSIX gives one atomic step, `rename`: it replaces a file, or an empty folder, in one go. A file is written to a
temporary name next to it, flushed to disk and renamed over the old one. A folder is written into a staging folder
in the same parent (so that the rename stays on one file system) and renamed into place when the target does not
exist yet; replacing a non-empty folder needs a pointer that is itself replaced atomically (see
`mpsupernet.checkpoints.save_model_folder` and `mpsupernet.hub.save_tiers`).

Staging folders are named `.<target>.mpsupernet-staging-<random>`; one left by a killed writer is never read, and
the next write to the same target removes it ([`remove_stale_staging`]).
"""

import os
import shutil
import tempfile
from pathlib import Path

from .layout import STAGING_MARKER


def _umask() -> int:
    """The process's umask, read from /proc where possible: setting it to read it would race with other threads."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_directory(path: str | os.PathLike) -> None:
    """Flushes a folder's entries (the names renamed into it) to disk; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` to `path` so that `path` holds either its old content or all of `data`, whatever happens.

    The file gets the permissions a new file gets (`0o666` less the umask), not `mkstemp`'s private `0o600`.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}{STAGING_MARKER}", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def make_staging_directory(target: str | os.PathLike) -> Path:
    """A new, empty staging folder next to `target` (same parent), readable as a folder made by `mkdir` would be."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARKER}", dir=target.parent))
    # mkdtemp makes private (0o700) folders; a saved model or tiers folder must be as readable as any other.
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def remove_stale_staging(target: str | os.PathLike) -> None:
    """Removes the staging folders and files that killed writes to `target` left next to it."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    prefix = f".{target.name}{STAGING_MARKER}"
    for leftover in target.parent.iterdir():
        if leftover.name.startswith(prefix):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flushes every file under `root`, and the folders themselves, to disk (before they are renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(folder)


def apply_default_permissions(root: str | os.PathLike) -> None:
    """Gives every file and folder under `root` the permissions `open`/`mkdir` would (umask applied).

    Some writers (safetensors, `mkstemp`, `mkdtemp`) make private files; a saved model must be readable like any
    other file its owner writes.
    """
    mask = _umask()
    for folder, folders, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def is_empty_directory(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and not any(path.iterdir())


def move_into_place(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames a complete staging folder to `target`, which must be missing or an empty folder (atomic on POSIX)."""
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    os.replace(staging, target)
    fsync_directory(target.parent)


__all__ = [
    "apply_default_permissions",
    "fsync_directory",
    "fsync_tree",
    "is_empty_directory",
    "make_staging_directory",
    "move_into_place",
    "remove_stale_staging",
    "write_file_atomic",
]
