"""Prompt sampling from binary masks, as in SAM's training: jittered boxes and positive/negative points.

All coordinates are in pixels of the given mask, `x` along columns and `y` along rows, and name pixel indices: the
box of a mask runs from its first to its last foreground pixel (both included), the convention of transformers'
SAM, whose prompt encoder adds 0.5 to reach pixel centres.
"""

import numpy as np


# transformers' SAM prompt encoder gives points with this label a zero embedding, i.e. ignores them.
PAD_POINT_LABEL = -10


def _as_generator(generator: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(generator)


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"Expected a 2-D mask of shape (height, width), got shape {mask.shape}.")
    mask = mask > 0
    if not mask.any():
        raise ValueError("Cannot sample a prompt from an empty mask.")
    return mask


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Returns the tight box of a non-empty binary mask.

    Args:
        mask (`np.ndarray` of shape `(height, width)`):
            Binary mask; any non-zero value is foreground.

    Returns:
        `np.ndarray` of shape `(4,)` and dtype float32: `(x1, y1, x2, y2)`, the column and row indices of the first and
        last foreground pixels.

    Raises:
        `ValueError`: if the mask is not 2-D or is empty.
    """
    mask = _check_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def jitter_box(
    box: np.ndarray,
    image_size: tuple[int, int],
    generator: np.random.Generator | int | None = None,
    noise_ratio: float = 0.1,
    max_noise: float | None = 20.0,
) -> np.ndarray:
    """Adds SAM's training noise to a box: each coordinate moves by a normal offset whose standard deviation is
    `noise_ratio` times the box's side along that axis, capped at `max_noise` pixels; the result is clipped to the
    image.

    Args:
        box (`np.ndarray` of shape `(4,)`):
            `(x1, y1, x2, y2)` in pixel indices.
        image_size (`tuple[int, int]`):
            `(height, width)` of the image the box lives in.
        generator (`np.random.Generator` or `int`, *optional*):
            Random generator, or a seed for one.
        noise_ratio (`float`, *optional*, defaults to 0.1):
            Standard deviation of the offsets as a fraction of the box's width (for x) or height (for y); SAM uses
            10%.
        max_noise (`float`, *optional*, defaults to 20.0):
            Largest offset in pixels (SAM uses 20 pixels at 1024 px); `None` for no cap.

    Returns:
        `np.ndarray` of shape `(4,)` and dtype float32, with `x1 <= x2` and `y1 <= y2` inside the image.
    """
    if noise_ratio < 0:
        raise ValueError(f"`noise_ratio` must be non-negative, got {noise_ratio}.")
    if max_noise is not None and max_noise < 0:
        raise ValueError(f"`max_noise` must be non-negative or None, got {max_noise}.")
    rng = _as_generator(generator)
    box = np.asarray(box, dtype=np.float64)
    height, width = image_size
    # Sides count pixels (indices are inclusive), so a one-pixel box still gets some noise.
    side_x = box[2] - box[0] + 1
    side_y = box[3] - box[1] + 1
    noise = rng.normal(0.0, 1.0, size=4) * noise_ratio * np.array([side_x, side_y, side_x, side_y])
    if max_noise is not None:
        noise = np.clip(noise, -max_noise, max_noise)
    jittered = box + noise
    jittered[[0, 2]] = np.clip(jittered[[0, 2]], 0, width - 1)
    jittered[[1, 3]] = np.clip(jittered[[1, 3]], 0, height - 1)
    x1, x2 = sorted(jittered[[0, 2]])
    y1, y2 = sorted(jittered[[1, 3]])
    return np.array([x1, y1, x2, y2], dtype=np.float32)


def sample_points(
    mask: np.ndarray,
    generator: np.random.Generator | int | None = None,
    num_positive: int = 1,
    num_negative: int = 0,
    negative_margin: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples positive points uniformly inside a mask and negative points outside it, near the object.

    Negative points come from the mask's box enlarged by `negative_margin` of its sides (clipped to the image), minus
    the mask, so that they mark the background that borders the object, where they are informative. When that region
    is empty they come from anywhere outside the mask; when the mask covers the whole image they are padding points
    (label `PAD_POINT_LABEL`, which SAM ignores).

    Args:
        mask (`np.ndarray` of shape `(height, width)`):
            Non-empty binary mask; any non-zero value is foreground.
        generator (`np.random.Generator` or `int`, *optional*):
            Random generator, or a seed for one.
        num_positive (`int`, *optional*, defaults to 1):
            Number of points inside the mask (drawn with replacement).
        num_negative (`int`, *optional*, defaults to 0):
            Number of points outside the mask (drawn with replacement).
        negative_margin (`float`, *optional*, defaults to 0.25):
            How far around the mask's box negative points may lie, as a fraction of the box's sides.

    Returns:
        `tuple(np.ndarray, np.ndarray)`: points of shape `(num_positive + num_negative, 2)` as float32 `(x, y)` pixel
        indices, positives first, and their int64 labels (1 positive, 0 negative, `PAD_POINT_LABEL` padding).
    """
    if num_positive < 0 or num_negative < 0 or num_positive + num_negative == 0:
        raise ValueError(
            "Need non-negative point counts and at least one point, got "
            f"num_positive={num_positive} and num_negative={num_negative}."
        )
    if negative_margin < 0:
        raise ValueError(f"`negative_margin` must be non-negative, got {negative_margin}.")
    mask = _check_mask(mask)
    rng = _as_generator(generator)
    height, width = mask.shape

    positive_rows, positive_cols = np.nonzero(mask)
    chosen = rng.integers(len(positive_rows), size=num_positive)
    points = [np.stack([positive_cols[chosen], positive_rows[chosen]], axis=-1)]
    labels = [np.ones(num_positive, dtype=np.int64)]

    if num_negative > 0:
        x1, y1, x2, y2 = mask_to_box(mask)
        margin_x = negative_margin * (x2 - x1 + 1)
        margin_y = negative_margin * (y2 - y1 + 1)
        near = np.zeros_like(mask)
        near[
            int(max(0, np.floor(y1 - margin_y))) : int(min(height, np.ceil(y2 + margin_y) + 1)),
            int(max(0, np.floor(x1 - margin_x))) : int(min(width, np.ceil(x2 + margin_x) + 1)),
        ] = True
        candidates = near & ~mask
        if not candidates.any():
            candidates = ~mask
        if candidates.any():
            negative_rows, negative_cols = np.nonzero(candidates)
            chosen = rng.integers(len(negative_rows), size=num_negative)
            points.append(np.stack([negative_cols[chosen], negative_rows[chosen]], axis=-1))
            labels.append(np.zeros(num_negative, dtype=np.int64))
        else:
            points.append(np.zeros((num_negative, 2)))
            labels.append(np.full(num_negative, PAD_POINT_LABEL, dtype=np.int64))
    return np.concatenate(points).astype(np.float32), np.concatenate(labels)
