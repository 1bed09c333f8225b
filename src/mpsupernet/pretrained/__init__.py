"""The SAMs that ship inside the package, for work without network access: the embedded default and a tiny one.

The method fine-tunes a *pretrained* SAM, and no SAM checkpoint can be downloaded where the project is built and
tested. Two plain transformers `SamModel` folders ship here, each with its model card (`README.md`) and the
`training_log.json` of the script that made it:

- `"embedded-sam"`, the default (5.9M parameters, 128 px): LiteMedSAM's prompt encoder and mask decoder (Apache-2.0)
  with a ViT image encoder distilled from LiteMedSAM's TinyViT by `scripts/distill_embedded_sam.py`. It segments real
  images as well as its 16 × 16 embedding grid allows; `mpsupernet demo` and the CLI use it by default.
- `"shapes-sam"` (0.95M parameters, 128 px): trained from scratch on the package's synthetic shapes by
  `scripts/pretrain_shapes_sam.py`; the embedded default until 2026-11-30 (the quality figures of that time in
  `docs/results.md` were measured on it). It is several times cheaper to run, and the tests use it where any pretrained
  SAM will do.

`load_sam` loads them by name, and real checkpoints (e.g. `facebook/sam-vit-base`) or folders as
`SamModel.from_pretrained` does, as the CLI's `--sam` and the benchmarks' do.
"""

import os
from pathlib import Path

from transformers import SamConfig, SamModel

from ..layout import CONFIG_NAME


SHIPPED_SAM_NAMES = ("embedded-sam", "shapes-sam")
"""The names of the SAMs shipped in the package; the first is the default."""
PRETRAINED_DIR = Path(__file__).resolve().parent

_SCRIPTS = {"embedded-sam": "scripts/distill_embedded_sam.py", "shapes-sam": "scripts/pretrain_shapes_sam.py"}


def shipped_sam_path(name: str = "embedded-sam") -> Path:
    """The folder of a SAM shipped in the package.

    Args:
        name (`str`, *optional*, defaults to `"embedded-sam"`): one of `SHIPPED_SAM_NAMES`.

    Returns:
        `Path`: the folder, which `SamModel.from_pretrained` reads.

    Raises:
        `ValueError`: for another name. `FileNotFoundError`: when the folder lacks its config (a damaged install).
    """
    if name not in SHIPPED_SAM_NAMES:
        raise ValueError(f"No shipped SAM is called {name!r}; the package ships {list(SHIPPED_SAM_NAMES)}.")
    path = PRETRAINED_DIR / name
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"The shipped SAM {name!r} is missing from {path}; rebuild it with `python {_SCRIPTS[name]}`."
        )
    return path


def shipped_sam_config(name: str = "embedded-sam") -> SamConfig:
    """Returns the configuration of a SAM shipped in the package (see `shipped_sam_path`), without network access."""
    return SamConfig.from_pretrained(shipped_sam_path(name), local_files_only=True)


def shipped_sam_name(name_or_path: str | os.PathLike) -> str | None:
    """The name of the shipped SAM that `name_or_path` stands for, or None for a folder or a Hub id.

    A path that exists is never read as a shipped SAM's name: a folder `shapes-sam` in the working directory (say, a
    supernet saved there with `mpsupernet convert --output-dir shapes-sam`) is that folder, as transformers'
    `from_pretrained` prefers a local folder to a Hub repository of the same name.

    Args:
        name_or_path (`str` or `os.PathLike`): one of `SHIPPED_SAM_NAMES`, a folder, or a Hub id.

    Returns:
        `str` or `None`: the shipped SAM's name, or None.
    """
    if isinstance(name_or_path, str) and name_or_path in SHIPPED_SAM_NAMES and not Path(name_or_path).exists():
        return name_or_path
    return None


def load_sam(name_or_path: str | os.PathLike = "embedded-sam", **kwargs) -> SamModel:
    """Loads a SAM shipped in the package by name (see `shipped_sam_name`; no network access), else a `SamModel`
    folder or Hub id.

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*, defaults to `"embedded-sam"`): one of `SHIPPED_SAM_NAMES`
            (the default distilled from LiteMedSAM, or `"shapes-sam"`, the tiny one pretrained on synthetic shapes),
            a `SamModel` folder, or a Hub id like `facebook/sam-vit-base`.
        **kwargs: passed to `SamModel.from_pretrained` (e.g. `torch_dtype`, `attn_implementation`).

    Returns:
        `SamModel`: the pretrained model (float32 unless `torch_dtype` says otherwise), in evaluation mode.

    Raises:
        `OSError`: from `SamModel.from_pretrained`, for a folder or Hub id that cannot be found or read.
    """
    name = shipped_sam_name(name_or_path)
    if name is None:
        return SamModel.from_pretrained(name_or_path, **kwargs)
    kwargs.setdefault("local_files_only", True)
    return SamModel.from_pretrained(shipped_sam_path(name), **kwargs)
