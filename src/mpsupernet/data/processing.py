"""Turns standard-schema examples (image + per-object masks) into `SamModel` inputs and low-resolution targets."""

import zlib
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage
from transformers import SamConfig, SamVisionConfig
from transformers.utils import logging

from ..image_processing import low_res_mask_size, sam_image_processor
from .prompts import jitter_box, mask_to_box, sample_points


logger = logging.get_logger(__name__)

MODEL_INPUT_NAMES = ("pixel_values", "input_boxes", "input_points", "input_labels")
PROMPT_MODES = ("box", "points", "box_and_points")


def _example_key(value: Any) -> int:
    """A non-negative integer that identifies an example, to seed its prompts."""
    if isinstance(value, (int, np.integer)) and value >= 0:
        return int(value)
    return zlib.crc32(repr(value).encode("utf-8"))


def _to_binary_mask(mask: Any) -> np.ndarray:
    return np.asarray(mask) > 0


def _low_res_target(
    mask: np.ndarray, reshaped_size: tuple[int, int], image_size: int, low_res_size: int
) -> np.ndarray:
    """Brings a mask into the frame of `pred_masks`.

    The mask goes through the image's own geometry (resized to `reshaped_size`, padded bottom-right to `image_size`)
    and is then area-averaged down to `low_res_size` and thresholded at one half. Resizing straight to the low
    resolution would misplace the padding border whenever the resized side is not a multiple of the downscale factor.
    """
    height, width = reshaped_size
    resized = PILImage.fromarray(mask.astype(np.float32), mode="F").resize((width, height), PILImage.BILINEAR)
    padded = np.zeros((image_size, image_size), dtype=np.float32)
    padded[:height, :width] = np.asarray(resized)
    # PIL's BOX filter is an exact area average, also for non-integer factors.
    low_res = PILImage.fromarray(padded, mode="F").resize((low_res_size, low_res_size), PILImage.BOX)
    return np.asarray(low_res) >= 0.5


class SamSegmentationPreprocessor:
    """Builds `SamModel` inputs and targets from examples of the standard schema, for `Dataset.set_transform`.

    For each example it picks `prompts_per_image` objects (each object once before any repeats, repeats drawn with
    replacement when the image has fewer objects), samples a prompt from each object's mask (a jittered box and/or
    points, see `mpsupernet.data.prompts`), resizes and pads the image with transformers' SAM image processor (its
    Pillow backend, no torchvision), and brings the chosen masks into the frame of `pred_masks`.

    Empty masks are dropped, and examples left without masks are skipped; both are counted
    (`num_dropped_masks`, `num_skipped_examples`, per process) and logged. A skipped example keeps its row with
    `None` values, which `collate_fn` leaves out.

    Sampling is deterministic: the random generator of an example is seeded with `(seed, epoch, key)`, where `key`
    is the example's `id_column` value (the row's content hash when that column is absent). A resumed run that sets
    the same epoch sees the same prompts; call `set_epoch` at every epoch for fresh prompts.

    Args:
        config (`SamConfig` or `SamVisionConfig`, *optional*):
            Model configuration that gives `image_size` and `patch_size`. Give either it or both sizes.
        image_size (`int`, *optional*):
            Side of the model's square input.
        patch_size (`int`, *optional*):
            Patch side of the vision encoder.
        prompts_per_image (`int`, *optional*, defaults to 4):
            Number of prompts (and target masks) per image.
        prompt_mode (`str`, *optional*, defaults to `"box"`):
            `"box"`, `"points"` or `"box_and_points"` (every prompt has both).
        num_positive_points (`int`, *optional*, defaults to 1):
            Points inside the object, per prompt, in the point modes.
        num_negative_points (`int`, *optional*, defaults to 0):
            Points outside the object (near it), per prompt, in the point modes.
        box_noise_ratio (`float`, *optional*, defaults to 0.1):
            Standard deviation of the box jitter as a fraction of the box's sides (SAM's 10%); 0 gives tight boxes.
        box_noise_max (`float`, *optional*):
            Largest jitter in pixels of the model's input; defaults to SAM's 20 pixels at 1024 scaled to
            `image_size`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the prompt sampling.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of the images.
        masks_column (`str`, *optional*, defaults to `"masks"`):
            Column of the per-object masks (images or arrays of the image's size; non-zero is foreground).
        id_column (`str`, *optional*, defaults to `"image_id"`):
            Column that identifies an example, to seed its prompts.
        image_processor (`SamImageProcessor`, *optional*):
            A SAM image processor to use instead of the default one; it must resize the longest edge to
            `image_size` and pad to `image_size` x `image_size`.
    """

    def __init__(
        self,
        config: SamConfig | SamVisionConfig | None = None,
        *,
        image_size: int | None = None,
        patch_size: int | None = None,
        prompts_per_image: int = 4,
        prompt_mode: str = "box",
        num_positive_points: int = 1,
        num_negative_points: int = 0,
        box_noise_ratio: float = 0.1,
        box_noise_max: float | None = None,
        seed: int = 0,
        image_column: str = "image",
        masks_column: str = "masks",
        id_column: str = "image_id",
        image_processor: Any = None,
    ):
        if config is not None:
            if image_size is not None or patch_size is not None:
                raise ValueError(
                    f"Give either `config` or `image_size` and `patch_size`, not both (got image_size={image_size}, "
                    f"patch_size={patch_size} and a config)."
                )
            vision_config = getattr(config, "vision_config", config)
            image_size, patch_size = vision_config.image_size, vision_config.patch_size
        elif image_size is None or patch_size is None:
            raise ValueError(
                f"Give `config`, or both `image_size` and `patch_size` (got image_size={image_size}, "
                f"patch_size={patch_size})."
            )
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"Unknown prompt_mode {prompt_mode!r}; choose one of {PROMPT_MODES}.")
        if prompts_per_image < 1:
            raise ValueError(f"`prompts_per_image` must be at least 1, got {prompts_per_image}.")
        if prompt_mode != "box" and num_positive_points + num_negative_points < 1:
            raise ValueError(
                f"prompt_mode={prompt_mode!r} needs at least one point, got num_positive_points="
                f"{num_positive_points} and num_negative_points={num_negative_points}."
            )
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.low_res_size = low_res_mask_size(self.image_size, self.patch_size)
        self.prompts_per_image = prompts_per_image
        self.prompt_mode = prompt_mode
        self.num_positive_points = num_positive_points
        self.num_negative_points = num_negative_points
        self.box_noise_ratio = box_noise_ratio
        self.box_noise_max = 20.0 * self.image_size / 1024 if box_noise_max is None else box_noise_max
        self.seed = seed
        self.epoch = 0
        self.image_column = image_column
        self.masks_column = masks_column
        self.id_column = id_column
        if image_processor is None:
            image_processor = sam_image_processor(self.image_size, self.patch_size)
        else:
            self._check_image_processor(image_processor)
        self.image_processor = image_processor
        self.num_skipped_examples = 0
        self.num_dropped_masks = 0

    def _check_image_processor(self, image_processor: Any) -> None:
        longest_edge = image_processor.size["longest_edge"]
        pad = (image_processor.pad_size["height"], image_processor.pad_size["width"])
        if longest_edge != self.image_size or pad != (self.image_size, self.image_size) or not image_processor.do_pad:
            raise ValueError(
                f"The image processor resizes the longest edge to {longest_edge} and pads to {pad[0]}x{pad[1]} "
                f"(do_pad={image_processor.do_pad}), but the model's input is {self.image_size}x{self.image_size}."
            )

    @property
    def required_columns(self) -> list[str]:
        """The dataset columns this preprocessor reads."""
        return [self.image_column, self.masks_column]

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the prompts, so that every epoch samples new ones.

        Args:
            epoch (`int`):
                The epoch number.
        """
        self.epoch = int(epoch)

    def _generator(self, examples: dict[str, list], index: int, image: Any) -> np.random.Generator:
        if self.id_column in examples:
            key = _example_key(examples[self.id_column][index])
        else:
            key = zlib.crc32(np.ascontiguousarray(np.asarray(image)).tobytes())
        return np.random.default_rng((self.seed, self.epoch, key))

    def _choose_objects(self, rng: np.random.Generator, num_objects: int) -> np.ndarray:
        order = rng.permutation(num_objects)
        if num_objects >= self.prompts_per_image:
            return order[: self.prompts_per_image]
        return np.concatenate([order, rng.integers(num_objects, size=self.prompts_per_image - num_objects)])

    def _nonempty_masks(self, images: list, masks_per_image: list) -> tuple[list[int], list[list[np.ndarray]]]:
        """The examples that keep a non-empty mask and those masks; empty masks and examples are counted and logged."""
        kept, kept_masks = [], []
        dropped_masks, skipped_examples = 0, 0
        for index, (image, masks) in enumerate(zip(images, masks_per_image)):
            width, height = image.size if isinstance(image, PILImage.Image) else np.asarray(image).shape[1::-1]
            binary_masks = []
            for k, mask in enumerate(masks):
                mask = _to_binary_mask(mask)
                if mask.shape != (height, width):
                    raise ValueError(
                        f"Mask {k} of example {index} has size {mask.shape[0]}x{mask.shape[1]} (height x width) but "
                        f"its image is {height}x{width}; masks must have the size of their image."
                    )
                if mask.any():
                    binary_masks.append(mask)
                else:
                    dropped_masks += 1
            if binary_masks:
                kept.append(index)
                kept_masks.append(binary_masks)
            else:
                skipped_examples += 1
        if dropped_masks or skipped_examples:
            self.num_dropped_masks += dropped_masks
            self.num_skipped_examples += skipped_examples
            logger.warning(
                f"Dropped {dropped_masks} empty mask(s) and skipped {skipped_examples} example(s) without a "
                f"non-empty mask in this batch ({self.num_dropped_masks} masks dropped and "
                f"{self.num_skipped_examples} examples skipped so far)."
            )
        return kept, kept_masks

    def __call__(self, examples: dict[str, list]) -> dict[str, list]:
        """Processes a batch of examples (a dict of columns, as `set_transform` passes it).

        Args:
            examples (`dict[str, list]`):
                Columns of the batch; needs the image and masks columns.

        Returns:
            `dict[str, list]` with one entry per example (`None` for a skipped one) under:
            `pixel_values` (float `(3, image_size, image_size)`), `ground_truth_masks` (float 0/1
            `(prompts_per_image, low_res_size, low_res_size)`), `original_sizes` and `reshaped_input_sizes` (int64
            `(2,)`, height and width), `input_boxes` (float `(prompts_per_image, 4)`, box modes) and `input_points`
            (float `(prompts_per_image, num_points, 2)`) with `input_labels` (int64 `(prompts_per_image,
            num_points)`) in the point modes. Coordinates are in the frame of the model's input.
        """
        missing = [name for name in (self.image_column, self.masks_column) if name not in examples]
        if missing:
            raise ValueError(f"The examples lack the column(s) {missing}; they have the columns {list(examples)}.")
        images = examples[self.image_column]
        kept, kept_masks = self._nonempty_masks(images, examples[self.masks_column])

        output_names = ["pixel_values", "ground_truth_masks", "original_sizes", "reshaped_input_sizes"]
        if self.prompt_mode != "points":
            output_names.append("input_boxes")
        if self.prompt_mode != "box":
            output_names += ["input_points", "input_labels"]
        outputs = {name: [None] * len(images) for name in output_names}
        if not kept:
            return outputs

        processed = self.image_processor(images=[images[i] for i in kept], return_tensors="pt")
        for row, (index, masks) in enumerate(zip(kept, kept_masks)):
            rng = self._generator(examples, index, images[index])
            reshaped_size = tuple(int(v) for v in processed["reshaped_input_sizes"][row])
            original_size = masks[0].shape
            # transformers' SAM scales coordinates per axis from the original to the resized frame.
            scale = np.array(
                [reshaped_size[1] / original_size[1], reshaped_size[0] / original_size[0]], dtype=np.float32
            )
            boxes, points, labels, targets = [], [], [], []
            for object_index in self._choose_objects(rng, len(masks)):
                mask = masks[object_index]
                if self.prompt_mode != "points":
                    box = mask_to_box(mask) * np.tile(scale, 2)
                    boxes.append(
                        jitter_box(
                            box, reshaped_size, rng, noise_ratio=self.box_noise_ratio, max_noise=self.box_noise_max
                        )
                    )
                if self.prompt_mode != "box":
                    object_points, object_labels = sample_points(
                        mask, rng, num_positive=self.num_positive_points, num_negative=self.num_negative_points
                    )
                    points.append(object_points * scale)
                    labels.append(object_labels)
                targets.append(_low_res_target(mask, reshaped_size, self.image_size, self.low_res_size))
            outputs["pixel_values"][index] = processed["pixel_values"][row]
            outputs["ground_truth_masks"][index] = torch.from_numpy(np.stack(targets).astype(np.float32))
            outputs["original_sizes"][index] = torch.tensor(original_size, dtype=torch.int64)
            outputs["reshaped_input_sizes"][index] = torch.tensor(reshaped_size, dtype=torch.int64)
            if boxes:
                outputs["input_boxes"][index] = torch.from_numpy(np.stack(boxes))
            if points:
                outputs["input_points"][index] = torch.from_numpy(np.stack(points).astype(np.float32))
                outputs["input_labels"][index] = torch.from_numpy(np.stack(labels))
        return outputs


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks preprocessed examples into a batch, leaving out those the preprocessor skipped.

    Args:
        examples (`list[dict]`):
            Rows produced by `SamSegmentationPreprocessor` (through `Dataset.set_transform`).

    Returns:
        `dict[str, torch.Tensor]` with the stacked tensors; empty when every example of the batch was skipped, which
        training and evaluation loops should pass over (`mpsupernet.metrics.evaluate_mean_iou` does).
    """
    examples = [example for example in examples if example.get("pixel_values") is not None]
    if not examples:
        return {}
    return {name: torch.stack([example[name] for example in examples]) for name in examples[0]}


def remove_examples_without_masks(
    dataset: Dataset, masks_column: str = "masks", num_proc: int | None = None
) -> Dataset:
    """Removes the examples that have no non-empty mask, so that no batch loses rows during training.

    Args:
        dataset (`Dataset`):
            Dataset with a masks column.
        masks_column (`str`, *optional*, defaults to `"masks"`):
            Column of the per-object masks.
        num_proc (`int`, *optional*):
            Processes for `Dataset.filter`.

    Returns:
        `Dataset` without those examples; how many were removed is logged.
    """
    if masks_column not in dataset.column_names:
        raise ValueError(
            f"The dataset lacks the column ['{masks_column}']; it has the columns {dataset.column_names}."
        )
    filtered = dataset.filter(
        lambda masks: any(_to_binary_mask(mask).any() for mask in masks),
        input_columns=masks_column,
        num_proc=num_proc,
        desc="Removing examples without masks",
    )
    num_removed = len(dataset) - len(filtered)
    if num_removed:
        logger.warning(f"Removed {num_removed} of {len(dataset)} examples that have no non-empty mask.")
    return filtered
