"""Saving model folders crash-safely, and clear errors for checkpoints that cannot be read or do not belong together.

A model folder pairs a `config.json` with weights. Written file by file, a kill in between could pair a new config
with old weights of the same shapes (W4A4 weights under a W4A6 config), which loads silently as neither model. So
every save records the sha256 of each weights file in `config.json` (`weights_sha256`, see `mpsupernet.integrity`),
`save_pretrained` writes the folder through the one staging helper (`mpsupernet.atomic.replace_folder`), and every
load checks the digests: a folder whose config and weights come from different saves is refused. Folders without
digests (older saves, SAM checkpoints) load as before.
"""

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from .atomic import replace_folder
from .integrity import check_digests, is_weights_file, read_config, weights_digests, write_config
from .layout import CONFIG_NAME, EXPORT_KEY, WEIGHTS_DIGEST_KEY


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
    config = read_config(folder)
    if config is None or config.get(WEIGHTS_DIGEST_KEY) is None:
        return
    recorded = config[WEIGHTS_DIGEST_KEY]
    check_digests(folder, recorded, WEIGHTS_DIGEST_KEY, source)
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


@contextmanager
def _config_text_taken(config):
    """Takes the text transformers' `save_pretrained` would write to `config.json` instead of writing it.

    transformers writes `config.json` before the weights; the folder's `config.json` must record the weights'
    digests (and an export's), so mpsupernet writes it once, after them, from this text.
    """
    taken = {}

    def take(path, use_diff=True):
        del config.to_json_file  # gone again before the config is serialised
        taken["text"] = config.to_json_string(use_diff=use_diff)

    config.to_json_file = take
    try:
        yield taken
    finally:
        config.__dict__.pop("to_json_file", None)


class CrashSafeSaveMixin:
    """`save_pretrained` that writes the folder through the one staging helper, and `from_pretrained` that checks it.

    Put it before `PreTrainedModel` among the bases.
    """

    checkpoint_kind = "model"

    def _save_companion_files(self, folder: Path) -> None:
        """Files that belong in the saved folder beside config and weights (none here); written inside the save."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        """As `PreTrainedModel.save_pretrained`, but crash-safe (see `mpsupernet.atomic.replace_folder`): after a kill
        at any moment the folder loads as the old model or the new one, or is refused; a second writer of the same
        folder is refused (`mpsupernet.atomic.ConcurrentWriteError`)."""
        if not is_main_process:
            # Other processes of a distributed save write nothing; transformers only creates the folder.
            return super().save_pretrained(save_directory, is_main_process=False, **kwargs)
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision", "tags")
            if key in kwargs
        }
        if Path(save_directory).is_file():
            raise ValueError(f"Cannot save a model to {str(save_directory)!r}: it is a file, not a folder.")
        replace_folder(save_directory, lambda folder: self.write_model_folder(folder, **kwargs))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            return self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)

    def write_model_folder(self, folder: Path, export: Callable[[Path], dict] | None = None, **kwargs) -> dict:
        """Writes this model into `folder`, which the caller owns (a staging folder, or a folder no reader sees yet).

        The weights (transformers' `save_pretrained` with `kwargs`), the companion files, then the files of
        `export(folder)`, which returns the `export` section of the config; `config.json` last, once, recording
        the weights' digests. Outermost writers ([`save_pretrained`], `mpsupernet.hub.save_tiers`) call this
        inside their one staging folder.

        Returns:
            `dict`: the `config.json` written.
        """
        with _config_text_taken(self.config) as taken:
            super().save_pretrained(folder, **kwargs)
        self._save_companion_files(folder)
        if "text" not in taken:  # transformers' PEFT integration saves the adapter alone, without a config
            return {}
        config = json.loads(taken["text"])
        config[WEIGHTS_DIGEST_KEY] = weights_digests(folder)
        if export is not None:
            config[EXPORT_KEY] = export(folder)
        write_config(folder, config)
        return config

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
        # save records its own (and an export a fresh export section), never a stale copy of these.
        model.config.__dict__.pop(WEIGHTS_DIGEST_KEY, None)
        model.config.__dict__.pop(EXPORT_KEY, None)
        return loaded
