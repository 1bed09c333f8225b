"""Training checkpoints that are either complete or ignored, and that resume without running code from the disk.

A checkpoint folder (`checkpoint-<step>`) is complete once `checkpoint_complete.json` is in it: written last,
atomically, it lists the sha256 of every other file. Resuming takes the newest complete checkpoint and says which
newer ones it skipped and why (an interrupted save leaves no marker; a file changed afterwards no longer matches).
The loop's own state (step, schedule, sandwich sampler) is JSON; every other file is read as safetensors or with
`torch.load(weights_only=True)`, as the transformers `Trainer` does, so no pickled object is ever executed.
"""

import json
import os
import re
import shutil
from pathlib import Path

from transformers.utils import logging

from ..atomic import (
    apply_default_permissions,
    make_staging_directory,
    move_into_place,
    remove_stale_staging,
    write_file_atomic,
)
from ..integrity import file_sha256
from ..layout import CHECKPOINT_COMPLETE_NAME, CHECKPOINT_PREFIX, STAGING_MARKER, TRAINING_STATE_NAME

logger = logging.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    """Writes the completion marker of a checkpoint folder: the sha256 of every file in it. Call it last."""
    folder = Path(folder)
    digests = {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_COMPLETE_NAME
    }
    write_file_atomic(folder / CHECKPOINT_COMPLETE_NAME, json.dumps({"step": step, "sha256": digests}, indent=2) + "\n")


def incompleteness(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or `None` if it is one."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    try:
        digests = json.loads((folder / CHECKPOINT_COMPLETE_NAME).read_text(encoding="utf-8"))["sha256"]
    except FileNotFoundError:
        return f"it has no {CHECKPOINT_COMPLETE_NAME}: its save was interrupted, or an older mpsupernet wrote it"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {CHECKPOINT_COMPLETE_NAME} cannot be read"
    if not isinstance(digests, dict):
        return f"its {CHECKPOINT_COMPLETE_NAME} cannot be read"
    for name, expected in digests.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"its {CHECKPOINT_COMPLETE_NAME} names {name!r}, outside the checkpoint"
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} changed after the checkpoint was saved (its sha256 differs from the one recorded)"
    return None


def resolve_checkpoint(resume_from_checkpoint: str | os.PathLike | bool, output_dir: str | os.PathLike) -> Path:
    """The checkpoint to resume from: a given folder, which must be complete, or (`True`) the newest complete one.

    Raises:
        `ValueError`: naming the folder and why it is not complete, or saying that `output_dir` has none.
    """
    output_dir = Path(output_dir)
    if resume_from_checkpoint is True:
        candidates = (
            sorted(
                (path for path in output_dir.iterdir() if CHECKPOINT_PATTERN.match(path.name) and path.is_dir()),
                key=lambda path: int(CHECKPOINT_PATTERN.match(path.name)[1]),
                reverse=True,
            )
            if output_dir.is_dir()
            else []
        )
        skipped = []
        for candidate in candidates:
            reason = incompleteness(candidate)
            if reason is None:
                return candidate
            logger.warning(f"Not resuming from {candidate}: {reason}.")
            skipped.append(f"{candidate.name} ({reason})")
        raise ValueError(
            f"resume_from_checkpoint=True, but {output_dir} holds no complete '{CHECKPOINT_PREFIX}-<step>' folder"
            + (f"; skipped: {'; '.join(skipped)}." if skipped else ".")
        )
    path = Path(resume_from_checkpoint)
    reason = incompleteness(path)
    if reason is not None:
        raise ValueError(
            f"{str(path)!r} is not a complete checkpoint: {reason}. Give a complete '{CHECKPOINT_PREFIX}-<step>' "
            "folder, or True for the newest complete one in `output_dir`."
        )
    return path


def checkpoint_staging(target: str | os.PathLike) -> Path:
    """The staging folder of checkpoint folder `target`: one fixed name, so that every process writes into it."""
    target = Path(target)
    return target.parent / f".{target.name}{STAGING_MARKER}partial"


def begin_checkpoint(target: str | os.PathLike) -> Path:
    """Creates the empty staging folder of checkpoint `target` (main process only); returns it.

    Staging folders that earlier, killed saves of `target` left are removed first.
    """
    remove_stale_staging(target)
    staging = checkpoint_staging(target)
    staging.mkdir(parents=True)
    return staging


def finish_checkpoint(target: str | os.PathLike, step: int, state: dict) -> Path:
    """Completes checkpoint `target` from its staging folder (main process only, after every process wrote).

    The loop's own `state` goes into `training_state.json`, then the completion marker, and the folder is renamed
    into place. An earlier checkpoint of the same step (a resumed run saving it again) is replaced only once the new
    one is whole.
    """
    target, staging = Path(target), checkpoint_staging(target)
    apply_default_permissions(staging)
    write_file_atomic(staging / TRAINING_STATE_NAME, json.dumps(state, indent=2) + "\n")
    mark_complete(staging, step)
    if target.exists():
        # Moved aside under a staging name, so that a kill right here leaves it to be cleaned up, not resumed from.
        previous = make_staging_directory(target)
        os.replace(target, previous)
        move_into_place(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        move_into_place(staging, target)
    return target


def load_state(checkpoint: str | os.PathLike) -> dict:
    """The loop's own state saved in a checkpoint (`training_state.json`)."""
    return json.loads((Path(checkpoint) / TRAINING_STATE_NAME).read_text(encoding="utf-8"))


__all__ = [
    "CHECKPOINT_PREFIX",
    "begin_checkpoint",
    "finish_checkpoint",
    "incompleteness",
    "load_state",
    "mark_complete",
    "resolve_checkpoint",
]
