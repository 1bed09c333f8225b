"""Clear errors for checkpoints that cannot be read."""

from contextlib import contextmanager

from safetensors import SafetensorError


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
