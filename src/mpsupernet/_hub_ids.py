"""Telling a local folder from a Hub repository id, and naming what is neither, with huggingface_hub alone.

`mpsupernet.hub` (tiers) and `mpsupernet.runtime` (ONNX exports, which must not import torch nor transformers) both
take "a folder or a Hub repository id"; a mistyped folder otherwise fails deep inside huggingface_hub.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id


def check_hub_id(repo_id: str | os.PathLike, expected: str) -> None:
    """Refuses what is neither a local folder nor a Hub repository id before huggingface_hub sees it.

    Args:
        repo_id (`str` or `os.PathLike`): the value given; a `PathLike` that is no folder is refused.
        expected (`str`): what to give instead, ending the message ("the folder written by `save_tiers` ...").

    Raises:
        `FileNotFoundError`: naming `repo_id`, why it is neither, and `expected`.
    """
    if Path(repo_id).exists():
        problem = "is a file, not a folder"
    elif isinstance(repo_id, os.PathLike):
        problem = "is no folder here"
    else:
        try:
            validate_repo_id(repo_id)
            return
        except HFValidationError:
            problem = "is no folder here, nor a Hub repository id ('namespace/name')"
    raise FileNotFoundError(f"{str(repo_id)!r} {problem}; give {expected}.")


@contextmanager
def finding_on_the_hub(repo_id: str, expected: str) -> Iterator[None]:
    """Turns huggingface_hub's "no such repository" and "Hub unreachable, not cached" into one line naming `repo_id`.

    A gated repository's error is left as it is: it says how to get access.

    Raises:
        `FileNotFoundError`: naming `repo_id`, the Hub's reason (its first line) and `expected`; chained to the
            original error.
    """
    try:
        yield
    except GatedRepoError:
        raise
    except (RepositoryNotFoundError, LocalEntryNotFoundError) as error:
        if isinstance(error, RepositoryNotFoundError):
            problem = "nor a Hub repository that exists or that your token can read"
        else:
            problem = (
                "and the local cache does not hold it as a Hub repository, which was not looked up (offline, "
                "unreachable or `local_files_only`)"
            )
        first_line = next(iter(str(error).strip().splitlines()), "")
        raise FileNotFoundError(f"{repo_id!r} is no folder here, {problem} ({first_line}); give {expected}.") from error
