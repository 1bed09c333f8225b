"""Publishing tiers to the Hugging Face Hub in one commit."""

import tempfile
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from ..layout import MANIFEST_NAME
from .manifest import read_tiers_manifest, top_folders
from .save import save_tiers

logger = logging.get_logger(__name__)


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
    owned = top_folders(previous)
    stale = sorted(path for path in files if "/" in path and path.split("/")[0] in owned and path not in uploaded)
    return [CommitOperationDelete(path_in_repo=path) for path in stale]
