"""The embedded default: a small SAM that the project pretrains itself on its synthetic data and ships in the package.

No SAM checkpoint can be downloaded where the project is built and tested, yet the method fine-tunes a *pretrained*
SAM. `scripts/pretrain_embedded_sam.py` trains a plain transformers `SamModel` on
`mpsupernet.data.make_synthetic_segmentation_dataset` and saves it here; its `training_log.json` records how. Real
checkpoints (e.g. `facebook/sam-vit-base`) load the usual way, with `SamModel.from_pretrained`.
"""

from pathlib import Path

from transformers import SamConfig, SamModel


EMBEDDED_SAM_PATH = Path(__file__).resolve().parent / "embedded-sam"


def _check_embedded_sam() -> None:
    if not (EMBEDDED_SAM_PATH / "config.json").is_file():
        raise FileNotFoundError(
            f"The embedded SAM is missing from {EMBEDDED_SAM_PATH}; rebuild it with "
            "`python scripts/pretrain_embedded_sam.py`."
        )


def embedded_sam_config() -> SamConfig:
    """Returns the configuration of the embedded SAM.

    Returns:
        `SamConfig`: read from the package folder, without network access.
    """
    _check_embedded_sam()
    return SamConfig.from_pretrained(EMBEDDED_SAM_PATH, local_files_only=True)


def load_embedded_sam(**kwargs) -> SamModel:
    """Loads the embedded SAM from the package folder, without network access.

    Args:
        **kwargs:
            Passed to `SamModel.from_pretrained` (e.g. `torch_dtype`, `attn_implementation`).

    Returns:
        `SamModel`: the pretrained model, in evaluation mode.
    """
    _check_embedded_sam()
    kwargs.setdefault("local_files_only", True)
    return SamModel.from_pretrained(EMBEDDED_SAM_PATH, **kwargs)
