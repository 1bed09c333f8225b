"""A synthetic instance-segmentation dataset that needs no download.

Each image shows a few objects of varied shape (ellipses, rotated rectangles, triangles, polygons and rings), texture
(flat colour, stripes, noise) and size over a textured background. Objects are painted one after the other, so later
ones occlude earlier ones; each object's mask is its *visible* part. The data is small and easy enough for a tiny SAM
to learn on a CPU in minutes, yet needs real shape and boundary reasoning (holes in rings, occlusions, textured
objects on textured backgrounds).
"""

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw


SHAPES = ("ellipse", "rectangle", "triangle", "polygon", "ring")
TEXTURES = ("flat", "stripes", "noise")

SYNTHETIC_FEATURES = Features(
    {
        "image": Image(),
        "masks": List(Image()),
        "image_id": Value("int64"),
        "shapes": List(Value("string")),
    }
)

SYNTHETIC_DATASET_NAME = "mpsupernet synthetic shapes"
"""The `info.dataset_name` of the synthetic dataset, which supernet configs, Pareto fronts and model cards state."""

# Streams keep the splits of `make_synthetic_segmentation_dataset_dict` disjoint for any seed.
_TRAIN_STREAM = 0
_VALIDATION_STREAM = 1
# Layouts are redrawn when occlusion leaves fewer than `min_objects` visible objects; this bounds the redraws.
_MAX_LAYOUT_TRIES = 100


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _stripes(rng: np.random.Generator, size: int, period_range: tuple[float, float]) -> np.ndarray:
    """A (size, size) map of 0/1 stripes at a random angle and period."""
    angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(*period_range)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    return (np.floor(phase) % 2).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    return np.asarray(PILImage.fromarray(coarse, mode="F").resize((size, size), PILImage.BILINEAR))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured (size, size, 3) background in [0, 1]."""
    base = _random_colour(rng) * 0.6 + 0.2
    other = _random_colour(rng) * 0.6 + 0.2
    kind = rng.integers(3)
    if kind == 0:
        weight = _smooth_noise(rng, size, cells=int(rng.integers(2, 6)))
    elif kind == 1:
        weight = _stripes(rng, size, (size / 6, size / 2)) * rng.uniform(0.2, 0.5)
    else:
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
        angle = rng.uniform(0.0, 2 * np.pi)
        weight = np.clip(xs * np.cos(angle) + ys * np.sin(angle), 0.0, 1.0)
    image = base[None, None, :] * (1 - weight[..., None]) + other[None, None, :] * weight[..., None]
    return image + rng.normal(0.0, 0.03, size=image.shape)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) fill for one object."""
    colour = _random_colour(rng)
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    if kind == "flat":
        return np.broadcast_to(colour, (size, size, 3)) + rng.normal(0.0, 0.02, size=(size, size, 3))
    if kind == "stripes":
        weight = _stripes(rng, size, (3.0, max(4.0, size / 12)))[..., None]
        return colour * (1 - weight) + _random_colour(rng) * weight
    return colour + rng.normal(0.0, 0.15, size=(size, size, 3))


def _ellipse(xs, ys, cx, cy, a, b, angle) -> np.ndarray:
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _polygon(size: int, vertices: np.ndarray) -> np.ndarray:
    canvas = PILImage.new("1", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(v) for v in vertices], fill=1)
    return np.asarray(canvas)


def _shape_mask(rng: np.random.Generator, size: int, shape: str) -> np.ndarray:
    """The full (unoccluded) boolean mask of one object of the given shape."""
    radius = rng.uniform(0.08, 0.3) * size
    # Centres may lie near the border so that objects are sometimes cut by the image edge.
    cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)
    angle = rng.uniform(0.0, np.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    if shape == "ellipse":
        return _ellipse(xs, ys, cx, cy, radius, radius * rng.uniform(0.4, 1.0), angle)
    if shape == "ring":
        aspect = rng.uniform(0.6, 1.0)
        inner = rng.uniform(0.4, 0.7)
        outer_mask = _ellipse(xs, ys, cx, cy, radius, radius * aspect, angle)
        return outer_mask & ~_ellipse(xs, ys, cx, cy, radius * inner, radius * aspect * inner, angle)
    if shape == "rectangle":
        half_w, half_h = radius, radius * rng.uniform(0.3, 1.0)
        u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
        v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
        return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
    if shape == "triangle":
        angles = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
        radii = np.full(3, radius)
    else:
        # Sorted angles with jittered radii give simple (non self-intersecting) polygons, convex or not.
        num_vertices = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0.0, 2 * np.pi, size=num_vertices))
        radii = radius * rng.uniform(0.5, 1.0, size=num_vertices)
    vertices = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=-1)
    return _polygon(size, vertices)


def _generate_example(
    rng: np.random.Generator, image_size: int, min_objects: int, max_objects: int
) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    min_visible_area = max(8, int(0.002 * image_size * image_size))
    for _ in range(_MAX_LAYOUT_TRIES):
        image = _background(rng, image_size)
        num_objects = int(rng.integers(min_objects, max_objects + 1))
        shapes, full_masks = [], []
        for _ in range(num_objects):
            shape = SHAPES[rng.integers(len(SHAPES))]
            mask = _shape_mask(rng, image_size, shape)
            if mask.sum() < min_visible_area:
                continue
            image = np.where(mask[..., None], _texture(rng, image_size), image)
            shapes.append(shape)
            full_masks.append(mask)
        visible_masks, visible_shapes = [], []
        covered = np.zeros((image_size, image_size), dtype=bool)
        # Walk from the top-most object down: what later objects cover is hidden.
        for shape, mask in zip(reversed(shapes), reversed(full_masks)):
            visible = mask & ~covered
            covered |= mask
            if visible.sum() >= min_visible_area:
                visible_masks.append(visible)
                visible_shapes.append(shape)
        if len(visible_masks) >= min_objects:
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
            return image, visible_masks[::-1], visible_shapes[::-1]
    raise ValueError(
        f"Could not place {min_objects} visible objects on a {image_size}x{image_size} image in {_MAX_LAYOUT_TRIES} "
        "tries; use a larger `image_size` or a smaller `min_objects`."
    )


def _check_arguments(image_size: int, min_objects: int, max_objects: int) -> None:
    if image_size < 16:
        raise ValueError(f"`image_size` must be at least 16, got {image_size}.")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"Need 1 <= min_objects <= max_objects, got min_objects={min_objects} and max_objects={max_objects}."
        )


def _make_split(
    num_images: int, image_size: int, min_objects: int, max_objects: int, seed: int, stream: int
) -> Dataset:
    if num_images < 0:
        raise ValueError(f"`num_images` must be non-negative, got {num_images}.")
    _check_arguments(image_size, min_objects, max_objects)
    columns = {name: [] for name in SYNTHETIC_FEATURES}
    for index in range(num_images):
        # One generator per image: image i is the same whatever `num_images` is.
        rng = np.random.default_rng((seed, stream, index))
        image, masks, shapes = _generate_example(rng, image_size, min_objects, max_objects)
        columns["image"].append(PILImage.fromarray(image, mode="RGB"))
        columns["masks"].append([PILImage.fromarray(mask) for mask in masks])
        columns["image_id"].append(index)
        columns["shapes"].append(shapes)
    info = DatasetInfo(dataset_name=SYNTHETIC_DATASET_NAME, features=SYNTHETIC_FEATURES)
    return Dataset.from_dict(columns, features=SYNTHETIC_FEATURES, info=info)


def make_synthetic_segmentation_dataset(
    num_images: int, image_size: int = 128, min_objects: int = 1, max_objects: int = 4, seed: int = 0
) -> Dataset:
    """Generates a deterministic synthetic instance-segmentation dataset.

    Args:
        num_images (`int`):
            Number of images.
        image_size (`int`, *optional*, defaults to 128):
            Height and width of the square RGB images, at least 16.
        min_objects (`int`, *optional*, defaults to 1):
            Minimum number of visible objects per image (at least 1).
        max_objects (`int`, *optional*, defaults to 4):
            Maximum number of objects per image. Objects hidden (almost) entirely by later ones are left out, so an
            image may show fewer than were drawn, but never fewer than `min_objects`.
        seed (`int`, *optional*, defaults to 0):
            Seed; the same arguments always give the same dataset, and image `i` does not depend on `num_images`.

    Returns:
        `datasets.Dataset` with the columns `image` (`Image()`, RGB), `masks` (`List(Image())`, one mode-"1" binary
        mask of the image's size per object, True on the object's visible pixels), `image_id` (`int64`, the row
        index) and `shapes` (`List(string)`, the shape name of each mask, one of `SHAPES`).
    """
    return _make_split(num_images, image_size, min_objects, max_objects, seed, _TRAIN_STREAM)


def make_synthetic_segmentation_dataset_dict(
    num_train: int,
    num_validation: int,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 4,
    seed: int = 0,
) -> DatasetDict:
    """Generates train and validation splits of the synthetic dataset, disjoint for any seed.

    The train split equals `make_synthetic_segmentation_dataset(num_train, ..., seed=seed)`; the validation split is
    drawn from another random stream of the same seed.

    Args:
        num_train (`int`):
            Number of training images.
        num_validation (`int`):
            Number of validation images.
        image_size (`int`, *optional*, defaults to 128):
            Height and width of the images.
        min_objects (`int`, *optional*, defaults to 1):
            Minimum number of visible objects per image.
        max_objects (`int`, *optional*, defaults to 4):
            Maximum number of objects per image.
        seed (`int`, *optional*, defaults to 0):
            Seed of both splits.

    Returns:
        `datasets.DatasetDict` with the splits `train` and `validation`, each with the columns described in
        `make_synthetic_segmentation_dataset`.
    """
    return DatasetDict(
        train=_make_split(num_train, image_size, min_objects, max_objects, seed, _TRAIN_STREAM),
        validation=_make_split(num_validation, image_size, min_objects, max_objects, seed, _VALIDATION_STREAM),
    )
