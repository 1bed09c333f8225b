"""Crash-safe writes: after a kill at any moment, a file or folder holds its complete old content or its new one.

POSIX gives one atomic step, `rename`: it replaces a file, or an empty folder, in one go. A file is written to a
temporary name next to it, flushed to disk and renamed over the old one ([`write_file_atomic`]). A folder is written
by its outermost writer through the one staging helper, [`replace_folder`]: into a staging folder in the same parent
(so that the rename stays on one file system), renamed into place when the target does not exist yet; a non-empty
folder is replaced through a pointer that is itself replaced atomically (a model folder's `config.json` and its
digests; a tiers folder's `tiers.json`, see `mpsupernet.hub.save_tiers`). Inner writers write into the folder they
are given.

Staging folders are named `.<target>.mpsupernet-staging-<random>`; one left by a killed writer is never read, and
the next write to the same target removes it ([`remove_stale_staging`]). Writers of one target take turns through a
lock file beside it ([`writer_lock`]): a second writer is refused, never let into the first one's staging.
"""

import errno
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .integrity import described_files, is_weights_file, read_config
from .layout import CONFIG_NAME, LOCK_SUFFIX, STAGING_MARKER


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


class ConcurrentWriteError(BlockingIOError):
    """Another writer, in this process or another, holds the lock of the folder being written."""


_HELD_LOCKS: dict[Path, list] = {}
"""Lock files this process holds: path -> [owning thread, depth] (a writer may call another writer of its target)."""
_HELD_LOCKS_GUARD = threading.Lock()


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of `target`: `.<target>.mpsupernet-lock` beside it."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _refusal(target: Path, path: Path) -> ConcurrentWriteError:
    try:
        holder = f"process {int(path.read_text(encoding='ascii'))}"
    except (OSError, ValueError):
        holder = "another process"
    return ConcurrentWriteError(
        errno.EWOULDBLOCK,
        f"Cannot write {str(target)!r}: another writer ({holder}) is writing it (it holds {path.name!r}). Nothing was "
        "written; write again once it is done, or into another folder.",
    )


def _acquire(target: Path, path: Path) -> int:
    """Opens and locks `path`; refuses at once if another open file holds it. A holder removes the file when it is
    done, so a lock taken on a file that was removed meanwhile is dropped and taken again on the new one."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise _refusal(target, path) from None
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, str(os.getpid()).encode("ascii"))
            return descriptor
        os.close(descriptor)


@contextmanager
def writer_lock(target: str | os.PathLike) -> Iterator[None]:
    """Holds the writer's lock of `target` (an advisory `flock` on `.<target>.mpsupernet-lock` in its parent, which
    must exist): one writer at a time per target, across processes. The thread holding it may take it again.

    Raises:
        `ConcurrentWriteError` (a `BlockingIOError`): when another writer holds it; nothing is changed.
    """
    target = Path(os.path.abspath(target))
    path = lock_path(target)
    me = threading.get_ident()
    with _HELD_LOCKS_GUARD:
        held = _HELD_LOCKS.get(path)
        if held is not None and held[0] != me:
            raise _refusal(target, path)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            with _HELD_LOCKS_GUARD:
                held[1] -= 1
        return
    descriptor = _acquire(target, path)
    with _HELD_LOCKS_GUARD:
        _HELD_LOCKS[path] = [me, 1]
    try:
        yield
    finally:
        with _HELD_LOCKS_GUARD:
            del _HELD_LOCKS[path]
        # Removed while still locked: a writer that opened it meanwhile finds it gone and takes a new one.
        path.unlink(missing_ok=True)
        os.close(descriptor)


@contextmanager
def parents_made(target: str | os.PathLike) -> Iterator[None]:
    """Creates the missing parent folders of `target`, and removes them again if the block raises (a refused write
    leaves the file system as it was)."""
    target = Path(os.path.abspath(target))
    missing = [parent for parent in target.parents if not parent.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for parent in missing:  # deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Writes the folder `target` crash-safely: the one staging helper, called by the outermost writer only.

    `write(folder)` fills a fresh staging folder beside `target` (inner writers write into the folder they are
    given); its tree then gets default permissions. A missing or empty `target` is replaced by it in one rename.
    Otherwise its files move in one by one: `config.json` first, whose digests name the new files (until the last
    of them is in place the folder is refused on load, never read as a mix), the weights last; then the files the
    previous `config.json` described and the new one does not (an old export, old weight shards) are removed.
    Other files in `target` are left alone.

    The writer holds `target`'s lock throughout ([`writer_lock`]), so staging left by killed writers can be removed
    first without touching a live writer's. A refused or failed write leaves `target` and its parents as they were.

    Raises:
        `ConcurrentWriteError`: if another writer is writing `target`; and whatever `write` raises.
    """
    target = Path(target)
    with parents_made(target), writer_lock(target):
        remove_stale_staging(target)
        staging = make_staging_directory(target)
        try:
            write(staging)
            apply_default_permissions(staging)
            if not target.exists() or is_empty_directory(target):
                move_into_place(staging, target)
            else:
                _move_files_into(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _move_files_into(staging: Path, target: Path) -> None:
    previous = described_files(read_config(target))
    names = sorted(path.name for path in staging.iterdir())
    current = described_files(read_config(staging)) | set(names)
    fsync_tree(staging)
    for name in sorted(names, key=lambda name: (name != CONFIG_NAME, is_weights_file(name), name)):
        os.replace(staging / name, target / name)
    for name in sorted(previous - current):
        if (target / name).is_file():
            (target / name).unlink()
    fsync_directory(target)


__all__ = [
    "ConcurrentWriteError",
    "apply_default_permissions",
    "fsync_directory",
    "fsync_tree",
    "is_empty_directory",
    "make_staging_directory",
    "move_into_place",
    "remove_stale_staging",
    "replace_folder",
    "write_file_atomic",
    "writer_lock",
]
