"""Configurations of the semantic-segmentation supernet and of the subnets extracted from it.

They are the promptable configurations ([`SamSupernetConfig`], [`SamSubnetConfig`]) plus the class labels
(`id2label`, `label2id`, both filled) and `semantic_loss_ignore_index`, under model types of their own, so that a
semantic checkpoint is never loaded as a promptable one (or the other way round). The class head is SAM's mask
decoder with one mask token per class (SAMed, arXiv 2304.13785): `mask_decoder_config.num_multimask_outputs` is
always `num_labels`.
"""

from huggingface_hub.dataclasses import strict

from .configuration_sam_supernet import SamSubnetConfig, SamSupernetConfig

IGNORE_INDEX = 255
"""The label of pixels that no loss and no metric counts (transformers' `semantic_loss_ignore_index` default; ADE20K's
"other objects" after label reduction)."""


def _check_num_labels_argument(id2label, kwargs: dict) -> None:
    """Refuses `num_labels` that disagrees with `id2label` (transformers only logs a warning and keeps `id2label`)."""
    num_labels = kwargs.get("num_labels")
    if id2label is not None and num_labels is not None and len(id2label) != num_labels:
        raise ValueError(
            f"`num_labels` is {num_labels} but `id2label` names {len(id2label)} classes ({dict(id2label)!r}); give "
            "one of them, or make them agree."
        )


def fill_label_maps(config) -> None:
    """Fills `label2id` from `id2label` and gives the class head one mask token per class."""
    if config.label2id is None:
        config.label2id = {name: index for index, name in config.id2label.items()}
    config.mask_decoder_config.num_multimask_outputs = config.num_labels


def check_label_maps(config) -> None:
    """Raises a `ValueError` naming the offending value if the labels or the ignore index are inconsistent."""
    ids = sorted(int(index) for index in config.id2label)
    if ids != list(range(len(ids))):
        raise ValueError(f"`id2label` must number its classes 0 to {len(ids) - 1} without gaps, got ids {ids}.")
    if config.num_labels < 1:
        raise ValueError(f"A semantic segmentation model needs at least one class, got `num_labels={config.num_labels}`.")
    label2id = {name: int(index) for name, index in config.label2id.items()}
    expected = {name: index for index, name in config.id2label.items()}
    if label2id != expected:
        raise ValueError(
            f"`label2id` {label2id!r} is not the inverse of `id2label` {dict(config.id2label)!r} (class names must be "
            "distinct, and each must map back to its id)."
        )
    ignore = config.semantic_loss_ignore_index
    if not isinstance(ignore, int) or not config.num_labels <= ignore <= IGNORE_INDEX:
        raise ValueError(
            f"`semantic_loss_ignore_index` is {ignore!r}; it must be an integer from `num_labels` "
            f"({config.num_labels}) to {IGNORE_INDEX}, so that it is no class id and fits a uint8 label map."
        )


class _ClassLabelsMixin:
    """The label handling both semantic configs add to their promptable base: refuse `num_labels` that disagrees
    with `id2label`, fill `label2id` and the class head's size, check the labels and the ignore index."""

    def __post_init__(self, **kwargs):
        _check_num_labels_argument(self.id2label, kwargs)
        super().__post_init__(**kwargs)

    def _fill_defaults(self) -> None:
        super()._fill_defaults()
        fill_label_maps(self)

    def check_settings(self) -> None:
        """Raises a `ValueError` naming the offending value if a class setting or a base setting is invalid."""
        check_label_maps(self)
        super().check_settings()


@strict
class SamSemanticSupernetConfig(_ClassLabelsMixin, SamSupernetConfig):
    r"""
    Configuration of a [`SamSupernetForSemanticSegmentation`]: a [`SamSupernetConfig`] (base SAM, search space,
    quantizers, LoRA) plus the classes.

    Classes:
        id2label (`dict[int, str]`, *optional*):
            Class names by id, `0` to `num_labels - 1`. `num_labels=N` alone names them `LABEL_0` ...; both given
            must agree.
        label2id (`dict[str, int]`, *optional*):
            The inverse map; filled from `id2label` when not given.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            The label of pixels that the loss and the metrics skip (padding, unlabelled pixels).

    The class head is SAM's mask decoder with `num_multimask_outputs = num_labels` (set here, whatever the base SAM's
    value): mask token `c + 1` predicts class `c`.

    Raises:
        `ValueError`: if `num_labels` and `id2label` disagree (naming both), if `label2id` is not the inverse of
        `id2label`, or if the ignore index is a class id.
    """

    model_type = "sam_semantic_supernet"

    semantic_loss_ignore_index: int = IGNORE_INDEX


@strict
class SamSemanticSubnetConfig(_ClassLabelsMixin, SamSubnetConfig):
    r"""
    Configuration of a [`SamSubnetForSemanticSegmentation`]: a [`SamSubnetConfig`] (base SAM, architecture, BitOPs)
    plus the classes (`id2label`, `label2id`, `semantic_loss_ignore_index`), as in [`SamSemanticSupernetConfig`].
    """

    model_type = "sam_semantic_subnet"

    semantic_loss_ignore_index: int = IGNORE_INDEX


__all__ = ["IGNORE_INDEX", "SamSemanticSubnetConfig", "SamSemanticSupernetConfig"]
