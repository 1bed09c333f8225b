"""Running an exported SAM subnet without PyTorch: onnxruntime (or OpenVINO), numpy and Pillow only.

`OnnxSamModel` loads a folder written by `SamSubnetForMaskGeneration.export_onnx` (locally or from the Hub) and
answers as `SamModel` does: `get_image_embeddings(pixel_values)` and `model(pixel_values=..., input_points=...,
input_labels=..., input_boxes=...)`, on the numpy arrays `SamProcessor(..., return_tensors="np")` gives.
`preprocess` and `post_process_masks` do that processor's work without torch, so that an image goes in and masks at
its original size come out:

    >>> from PIL import Image
    >>> from mpsupernet.runtime import OnnxSamModel
    >>> model = OnnxSamModel.from_pretrained("exported-subnet")
    >>> image = Image.open("photo.jpg")
    >>> inputs = model.preprocess(image, input_boxes=[[[40, 30, 200, 180]]])
    >>> outputs = model(**inputs)
    >>> masks = model.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])

This module must not import torch (nor anything that does): `mpsupernet`'s package `__init__` loads its PyTorch
parts only when torch is importable.
"""

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .choices import EXPORT_TARGETS
from .integrity import check_digests, read_config
from .layout import (
    CONFIG_NAME,
    EXPORT_DIGEST_KEY,
    EXPORT_KEY,
    PREPROCESSOR_NAME,
    PROMPT_DECODER_NAME,
    VISION_ENCODER_NAME,
)

RUNTIMES = EXPORT_TARGETS
"""The runtimes `OnnxSamModel` runs an export on: those it is exported for."""


@dataclass
class OnnxSamOutput:
    """Output of `OnnxSamModel.__call__`, as `SamImageSegmentationOutput` but in numpy.

    Attributes:
        iou_scores (`np.ndarray` of shape `(batch, point_batch, num_masks)`): predicted mask quality.
        pred_masks (`np.ndarray` of shape `(batch, point_batch, num_masks, 4 * grid, 4 * grid)`): low-resolution mask
            logits in the padded input frame (`post_process_masks` brings them to the image size).
        image_embeddings (`np.ndarray`): the image embeddings used.
    """

    iou_scores: np.ndarray
    pred_masks: np.ndarray
    image_embeddings: np.ndarray

    def __getitem__(self, key: str) -> np.ndarray:
        return getattr(self, key)


class _OnnxRuntimeGraph:
    def __init__(self, path: Path, settings: dict, provider: str, session_options=None, num_threads: int | None = None):
        import onnxruntime as ort

        options = session_options or ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        for key, value in settings.get("session_config_entries", {}).items():
            options.add_session_config_entry(key, str(value))
        self.session = ort.InferenceSession(
            str(path), options, providers=[provider], disabled_optimizers=settings.get("disabled_optimizers", [])
        )

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class _OpenVinoGraph:
    def __init__(self, path: Path, settings: dict, device: str, num_threads: int | None = None):
        try:
            import openvino as ov
        except ImportError as error:
            raise ImportError(
                "runtime='openvino' needs OpenVINO: `pip install mpsupernet[openvino]` (or `pip install openvino`)."
            ) from error
        core = ov.Core()
        properties = dict(settings) if num_threads is None else {**settings, "INFERENCE_NUM_THREADS": num_threads}
        self.model = core.compile_model(core.read_model(str(path)), device, properties)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.model(feeds)
        return [results[output] for output in self.model.outputs]


def _prompts_per_image(name: str, prompts, num_images: int, nesting: int, layout: str) -> list[np.ndarray]:
    """One float32 array per image from a processor-style prompt list, refusing another layout by name: zipped with
    the images, a list one level too flat would otherwise be read as other coordinates, without an error.

    `nesting` is the number of list levels between an image's entry and a coordinate pair or box (1 for boxes: per
    box; 2 for points: per point batch, per point); the last axis holds 4 (boxes) or 2 (points) numbers.
    """
    width = 2 if nesting == 2 else 4
    problem = None
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        problem = f"got {type(prompts).__name__} {prompts!r}"
    elif len(prompts) != num_images:
        entries = "entry" if len(prompts) == 1 else "entries"
        problem = f"got {len(prompts)} {entries} for {num_images} image{'s' if num_images != 1 else ''}"
    else:
        arrays = []
        for entry in prompts:
            try:
                array = np.asarray(entry, np.float32)
            except (TypeError, ValueError):
                array = None
            if array is None or array.ndim != nesting + 1 or array.shape[-1] != width:
                shape = "not numbers of equal lengths" if array is None else f"of shape {array.shape}"
                problem = f"an image's entry is {shape}"
                break
            arrays.append(array)
        else:
            return arrays
    raise ValueError(
        f"`{name}` must hold one entry per image, laid out {layout} (as for SamProcessor), in image pixels; {problem}."
    )


class OnnxSamModel:
    """An exported promptable SAM subnet run by onnxruntime or OpenVINO, without PyTorch.

    Make one with [`OnnxSamModel.from_pretrained`]. The encoder runs with the session settings the export recorded
    (`config.json`'s `export.runtime`), which keep its Linears on integer kernels.

    Attributes:
        config (`dict`): the exported `config.json`.
        image_size (`int`): the side of the square input (`pixel_values` are `(batch, 3, image_size, image_size)`).
        processor_config (`dict`): the exported `preprocessor_config.json` (mean, std, sizes).
    """

    decoder_file = PROMPT_DECODER_NAME
    """The decoder graph this class runs beside the encoder."""
    model_types = ("sam_subnet",)
    """The `model_type`s of the exports this class runs (a semantic export has its own class)."""

    def __init__(
        self,
        directory: Path,
        runtime: str = "onnxruntime",
        provider: str = "CPUExecutionProvider",
        session_options=None,
        num_threads: int | None = None,
    ):
        if runtime not in RUNTIMES:
            raise ValueError(f"Unknown runtime {runtime!r}; allowed: {list(RUNTIMES)}.")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(
                f"`num_threads` must be a positive integer (or None for the runtime's default); got {num_threads!r}."
            )
        self.directory = Path(directory)
        self.config = json.loads((self.directory / CONFIG_NAME).read_text(encoding="utf-8"))
        if EXPORT_KEY not in self.config:
            raise ValueError(
                f"{str(self.directory)!r} holds no ONNX export (its config.json has no `export` section); write one "
                "with `SamSubnetForMaskGeneration.export_onnx`."
            )
        model_type = self.config.get("model_type")
        if model_type not in self.model_types:
            raise ValueError(
                f"{str(self.directory)!r} holds an export of a `{model_type}`, which {type(self).__name__} does not run "
                f"(it runs {list(self.model_types)}): a semantic segmentation subnet segments every class without "
                "prompts; run it with `mpsupernet.runtime_semantic.OnnxSamForSemanticSegmentation`, and a promptable "
                "one with `mpsupernet.runtime.OnnxSamModel`."
            )
        self.processor_config = json.loads((self.directory / PREPROCESSOR_NAME).read_text(encoding="utf-8"))
        self.image_size = int(self.config[EXPORT_KEY]["image_size"])
        self.runtime = runtime
        settings = self.config[EXPORT_KEY]["runtime"][runtime]
        if runtime == "onnxruntime":
            options = (provider, session_options, num_threads)
            self.vision_encoder = _OnnxRuntimeGraph(self.directory / VISION_ENCODER_NAME, settings, *options)
            self.prompt_decoder = _OnnxRuntimeGraph(self.directory / self.decoder_file, {}, *options)
        else:
            device = "CPU" if provider == "CPUExecutionProvider" else provider
            self.vision_encoder = _OpenVinoGraph(self.directory / VISION_ENCODER_NAME, settings, device, num_threads)
            self.prompt_decoder = _OpenVinoGraph(self.directory / self.decoder_file, settings, device, num_threads)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        provider: str = "CPUExecutionProvider",
        revision: str | None = None,
        runtime: str = "onnxruntime",
        session_options=None,
        num_threads: int | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> "OnnxSamModel":
        """Loads an export from a local folder or a Hub repository.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder written by `export_onnx`, or a Hub repo
                id holding one (in `subfolder`, e.g. a tier's folder).
            subfolder (`str`, *optional*): the export's folder inside the repository or local folder.
            provider (`str`, *optional*, defaults to `"CPUExecutionProvider"`): the onnxruntime execution provider
                (for `runtime="openvino"`: the OpenVINO device; the CPU provider means `"CPU"`).
            revision, token, cache_dir, local_files_only: as for `huggingface_hub.snapshot_download`.
            runtime (`str`, *optional*, defaults to `"onnxruntime"`): `"onnxruntime"` or `"openvino"` (exact mode,
                f32 precision hint; needs the `openvino` extra).
            session_options (`onnxruntime.SessionOptions`, *optional*): base session options (threads...); the
                export's settings are added to them.
            num_threads (`int`, *optional*): CPU threads of each graph, on either runtime: onnxruntime's
                `intra_op_num_threads` (set on `session_options` when given) or OpenVINO's `INFERENCE_NUM_THREADS`.
                Defaults to the runtime's own choice (all cores for both).

        Raises:
            `ValueError`: if the folder holds no export, `runtime` is unknown or `num_threads` is not a positive
            integer.
            `OSError`: if a file the export's `config.json` records a digest for is missing or is not that file (a
            file of another export, or an export interrupted part-way), naming it.
            `FileNotFoundError`: naming `pretrained_model_name_or_path` if it is neither a local folder nor a Hub
            repository that can be read (an invalid id, no such repository, the Hub unreachable and nothing cached).
        """
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            directory = path / subfolder if subfolder else path
        else:
            from huggingface_hub import snapshot_download

            from ._hub_ids import check_hub_id, finding_on_the_hub

            expected = "the folder written by `export_onnx` or a Hub repository holding one"
            check_hub_id(pretrained_model_name_or_path, expected)
            pattern = f"{subfolder}/*" if subfolder else "*"
            with finding_on_the_hub(str(pretrained_model_name_or_path), expected):
                root = snapshot_download(
                    str(pretrained_model_name_or_path),
                    revision=revision,
                    allow_patterns=[pattern],
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            directory = Path(root) / subfolder if subfolder else Path(root)
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"No {CONFIG_NAME} in {str(directory)!r}: not an ONNX export of mpsupernet.")
        export = (read_config(directory) or {}).get(EXPORT_KEY)
        if isinstance(export, dict) and EXPORT_DIGEST_KEY in export:
            # Exports before digests were recorded load as before.
            source = f"{pretrained_model_name_or_path}/{subfolder}" if subfolder else pretrained_model_name_or_path
            check_digests(directory, export[EXPORT_DIGEST_KEY], EXPORT_KEY, source)
        return cls(directory, runtime=runtime, provider=provider, session_options=session_options, num_threads=num_threads)

    # --- model --------------------------------------------------------------------------------------------------------
    def get_image_embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        """Image embeddings `(batch, channels, grid, grid)` of `pixel_values` `(batch, 3, image_size, image_size)`.

        Raises:
            `ValueError`: if `pixel_values` have another shape or hold a NaN or an infinity.
        """
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise ValueError(
                f"pixel_values must have shape (batch, {', '.join(map(str, expected))}); got {pixel_values.shape}."
            )
        if not np.isfinite(pixel_values).all():
            bad = int(np.size(pixel_values) - np.isfinite(pixel_values).sum())
            raise ValueError(
                f"pixel_values hold {bad} non-finite values (NaN or inf); the quantized encoder would clip them into "
                "finite but meaningless masks. Check the image (a NaN pixel?) and its preprocessing."
            )
        return self.vision_encoder({"pixel_values": pixel_values})[0]

    def __call__(
        self,
        pixel_values: np.ndarray | None = None,
        input_points: np.ndarray | None = None,
        input_labels: np.ndarray | None = None,
        input_boxes: np.ndarray | None = None,
        image_embeddings: np.ndarray | None = None,
        multimask_output: bool = True,
        **kwargs,
    ) -> OnnxSamOutput:
        """Masks for the prompts, as `SamModel.forward` computes them (extra processor keys are ignored).

        Args:
            pixel_values (`np.ndarray`, *optional*): `(batch, 3, image_size, image_size)`; or give `image_embeddings`.
            input_points (`np.ndarray`, *optional*): `(batch, point_batch, num_points, 2)` in the input frame.
            input_labels (`np.ndarray`, *optional*): `(batch, point_batch, num_points)`; all 1 if not given.
            input_boxes (`np.ndarray`, *optional*): `(batch, num_boxes, 4)`; with points, `num_boxes == point_batch`.
            multimask_output (`bool`): three masks per prompt (`True`), or the first, single-mask output (`False`).
        """
        if not multimask_output:
            raise ValueError(
                "multimask_output=False is not available in this export: its decoder returns the three-mask output."
            )
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("Give exactly one of pixel_values and image_embeddings.")
        if input_points is None and input_boxes is None:
            raise ValueError("Give input_points or input_boxes: the exported decoder needs a prompt.")
        if image_embeddings is None:
            image_embeddings = self.get_image_embeddings(pixel_values)
        batch_size = image_embeddings.shape[0]
        if input_boxes is not None:
            input_boxes = np.asarray(input_boxes, dtype=np.float32)
            if input_boxes.ndim != 3 or input_boxes.shape[-1] != 4:
                raise ValueError(f"input_boxes must have shape (batch, num_boxes, 4); got {input_boxes.shape}.")
        if input_points is not None:
            input_points = np.asarray(input_points, dtype=np.float32)
            if input_points.ndim != 4 or input_points.shape[-1] != 2:
                raise ValueError(
                    f"input_points must have shape (batch, point_batch, num_points, 2); got {input_points.shape}."
                )
            labels = np.ones(input_points.shape[:3], np.int64) if input_labels is None else np.asarray(input_labels, np.int64)
            if input_boxes is None:
                # transformers appends a "not a point" (label -1) when no box is given.
                input_points = np.concatenate([input_points, np.zeros((*input_points.shape[:2], 1, 2), np.float32)], 2)
                labels = np.concatenate([labels, -np.ones((*labels.shape[:2], 1), np.int64)], axis=2)
            elif input_boxes.shape[1] != input_points.shape[1]:
                raise ValueError(
                    f"Give as many boxes as point batches: got {input_boxes.shape[1]} boxes and "
                    f"{input_points.shape[1]} point batches."
                )
            point_batch = input_points.shape[1]
        else:
            point_batch = input_boxes.shape[1]
            input_points = np.zeros((batch_size, point_batch, 0, 2), np.float32)
            labels = np.zeros((batch_size, point_batch, 0), np.int64)
        boxes = (
            np.zeros((batch_size, point_batch, 0, 4), np.float32) if input_boxes is None else input_boxes[:, :, None, :]
        )
        image_embeddings = np.asarray(image_embeddings, dtype=np.float32)
        # The exported decoder takes one image at a time.
        outputs = [
            self.prompt_decoder(
                {
                    "image_embeddings": image_embeddings[i : i + 1],
                    "input_points": input_points[i : i + 1],
                    "input_labels": labels[i : i + 1],
                    "input_boxes": np.ascontiguousarray(boxes[i : i + 1]),
                }
            )
            for i in range(batch_size)
        ]
        iou_scores = np.concatenate([output[0] for output in outputs])
        pred_masks = np.concatenate([output[1] for output in outputs])
        return OnnxSamOutput(iou_scores=iou_scores, pred_masks=pred_masks, image_embeddings=image_embeddings)

    # --- processing without torch --------------------------------------------------------------------------------------
    def preprocess(self, images, input_points=None, input_labels=None, input_boxes=None) -> dict[str, np.ndarray]:
        """What `SamProcessor(images, ..., return_tensors="np")` gives, with Pillow and numpy only.

        An image with transparency (RGBA, LA, a palette with a transparent colour) is composited onto white first,
        as `SamProcessor` does. Each image's longest side is resized to `image_size` (bilinear), values are rescaled to [0, 1], normalised
        with the processor's mean and std and zero-padded to a square; prompt coordinates (in original pixels) are
        scaled to the resized frame.

        Args:
            images (`PIL.Image.Image`, `np.ndarray` `(height, width, 3)` uint8, or a list of them): as for
                `SamProcessor`, not file paths (open those with `PIL.Image.open`).
            input_points (`list`, *optional*): per image, per point batch, per point `[x, y]` (same layout as
                `SamProcessor`); `input_labels` per point; `input_boxes` per image, per box `[x1, y1, x2, y2]`.

        Returns:
            `dict` with `pixel_values`, `original_sizes`, `reshaped_input_sizes` and the scaled prompts.

        Raises:
            `TypeError`: for an image that is neither a PIL image nor a uint8 array of shape `(height, width)` or
                `(height, width, 3 or 4)` (a path, a float array...), naming what it got.
            `ValueError`: for prompts in another layout than `SamProcessor`'s.
        """
        from PIL import Image

        images = images if isinstance(images, (list, tuple)) else [images]
        longest = int(self.processor_config["size"]["longest_edge"])
        pad_height, pad_width = self.processor_config["pad_size"]["height"], self.processor_config["pad_size"]["width"]
        mean = np.asarray(self.processor_config["image_mean"], np.float32)
        std = np.asarray(self.processor_config["image_std"], np.float32)
        batch, original_sizes, reshaped_sizes = [], [], []
        for image in images:
            image = _as_rgb(_as_pil_image(image))
            width, height = image.size
            scale = longest / max(height, width)
            new_height, new_width = int(height * scale + 0.5), int(width * scale + 0.5)
            resized = np.asarray(image.resize((new_width, new_height), Image.BILINEAR), dtype=np.float32)
            normalized = (resized * float(self.processor_config["rescale_factor"]) - mean) / std
            padded = np.zeros((pad_height, pad_width, 3), np.float32)
            padded[:new_height, :new_width] = normalized
            batch.append(padded.transpose(2, 0, 1))
            original_sizes.append((height, width))
            reshaped_sizes.append((new_height, new_width))
        inputs = {
            "pixel_values": np.stack(batch),
            "original_sizes": np.asarray(original_sizes, np.int64),
            "reshaped_input_sizes": np.asarray(reshaped_sizes, np.int64),
        }
        ratios = [
            np.asarray([new[1] / old[1], new[0] / old[0]], np.float32) for old, new in zip(original_sizes, reshaped_sizes)
        ]
        if input_points is not None:
            points = _prompts_per_image("input_points", input_points, len(images), 2, "[[[[x, y], ...], ...], ...]")
            inputs["input_points"] = np.stack([p * r for p, r in zip(points, ratios)])
            if input_labels is not None:
                inputs["input_labels"] = np.asarray(input_labels, np.int64)
        if input_boxes is not None:
            boxes = _prompts_per_image("input_boxes", input_boxes, len(images), 1, "[[[x1, y1, x2, y2], ...], ...]")
            inputs["input_boxes"] = np.stack([b * np.tile(r, 2) for b, r in zip(boxes, ratios)])
        return inputs

    def post_process_masks(
        self, masks: np.ndarray, original_sizes, reshaped_input_sizes, mask_threshold: float = 0.0, binarize: bool = True
    ) -> list[np.ndarray]:
        """Brings low-resolution mask logits to each image's original size, as `SamProcessor.post_process_masks`.

        The masks are upscaled (bilinear, `align_corners=False`) to the padded input size, cropped to the resized
        image, resized to the original size and, if `binarize`, thresholded at `mask_threshold`.

        Returns:
            `list[np.ndarray]`: per image, `(point_batch, num_masks, height, width)` booleans (or logits).
        """
        pad = (self.processor_config["pad_size"]["height"], self.processor_config["pad_size"]["width"])
        results = []
        for image_masks, original, reshaped in zip(masks, original_sizes, reshaped_input_sizes):
            upscaled = resize_bilinear(np.asarray(image_masks, np.float32), pad)
            cropped = upscaled[..., : int(reshaped[0]), : int(reshaped[1])]
            restored = resize_bilinear(cropped, (int(original[0]), int(original[1])))
            results.append(restored > mask_threshold if binarize else restored)
        return results


def _as_pil_image(image):
    """`image` as a PIL image; what `preprocess` cannot read as one (a path, a float array...) is named."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    allowed = "a PIL.Image.Image or a uint8 numpy array of shape (height, width) or (height, width, 3 or 4)"
    if isinstance(image, (str, os.PathLike)):
        raise TypeError(f"Each image must be {allowed}; got the path {str(image)!r} (open it with PIL.Image.open).")
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        kind = f"{type(image).__module__}.{type(image).__qualname__}"
        got = kind if array.dtype == object else f"{kind} of shape {array.shape} and dtype {array.dtype}"
        raise TypeError(f"Each image must be {allowed}; got a {got}.")
    return Image.fromarray(array)


def _as_rgb(image):
    """`image` in RGB; transparent pixels are blended onto white, as transformers' `convert_to_rgb` does."""
    from PIL import Image

    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def resize_bilinear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes to `size`, as `torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)` without antialiasing."""

    def weights(source: int, target: int):
        position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, None)
        low = np.minimum(np.floor(position).astype(np.int64), source - 1)
        high = np.minimum(low + 1, source - 1)
        fraction = (position - low).astype(np.float32)
        return low, high, fraction

    low, high, fraction = weights(values.shape[-2], size[0])
    rows = values[..., low, :] * (1 - fraction)[:, None] + values[..., high, :] * fraction[:, None]
    low, high, fraction = weights(values.shape[-1], size[1])
    return rows[..., low] * (1 - fraction) + rows[..., high] * fraction


@dataclass
class LatencyMeasurement:
    """The image encoder's latency as [`measure_latency`] measured it, and the machine it was measured on.

    Attributes:
        ms_per_image (`float`): median milliseconds of one encoder call on one image (batch 1).
        runs_ms (`list[float]`): every timed call, in milliseconds, in order.
        warmup_runs (`int`): untimed calls before them.
        batch_size (`int`): images per call (1).
        threads (`int`): intra-op threads of the session (onnxruntime's default, 0, is recorded as the CPU count).
        cpu (`str`): the CPU model (`/proc/cpuinfo`'s `model name`, else `platform.processor()`).
        runtime (`str`), runtime_version (`str`), provider (`str`): what ran the encoder.
        date (`str`): UTC date and time of the measurement, ISO 8601.
    """

    ms_per_image: float
    runs_ms: list[float]
    warmup_runs: int
    batch_size: int
    threads: int
    cpu: str
    runtime: str
    runtime_version: str
    provider: str
    date: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.ms_per_image:.1f} ms per image (batch {self.batch_size}, median of {len(self.runs_ms)} runs) on "
            f"{self.cpu}, {self.threads} threads, {self.runtime} {self.runtime_version}, {self.date}"
        )


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux; elsewhere `platform.processor()` or the architecture)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    return cpu


def measure_latency(
    model: OnnxSamModel,
    *,
    runs: int = 5,
    warmup: int = 2,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyMeasurement:
    """Measures the image encoder of `model` on one image: the median of `runs` timed calls after `warmup` calls.

    The input is a random `(1, 3, image_size, image_size)` image (the encoder's cost does not depend on the
    values). Only the encoder is timed: the prompt encoder and mask decoder run once per prompt and are small.
    Threads are those of the model's session: build the model with `num_threads` (or `session_options` whose
    `intra_op_num_threads` is set) to measure at a given count.

    Args:
        model (`OnnxSamModel`): an onnxruntime model (`runtime="onnxruntime"`).
        runs (`int`, *optional*, defaults to 5): timed calls (at least 1).
        warmup (`int`, *optional*, defaults to 2): untimed calls before them (at least 0; the first call of a session
            allocates its buffers).
        seed (`int`, *optional*): seeds the random image.
        clock (`Callable[[], float]`, *optional*, defaults to `time.perf_counter`): seconds, monotonic.

    Returns:
        `LatencyMeasurement`: the median in milliseconds, every run, and the machine.

    Raises:
        `ValueError`: for a model on another runtime, or `runs < 1` or `warmup < 0`.
    """
    if getattr(model, "runtime", None) != "onnxruntime":
        raise ValueError(
            f"measure_latency measures onnxruntime models; got runtime {getattr(model, 'runtime', None)!r}."
        )
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer of at least {low}; got {value!r}.")
    import onnxruntime as ort

    size = model.image_size
    pixel_values = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    for _ in range(warmup):
        model.get_image_embeddings(pixel_values)
    runs_ms = []
    for _ in range(runs):
        start = clock()
        model.get_image_embeddings(pixel_values)
        runs_ms.append(1000.0 * (clock() - start))
    session = model.vision_encoder.session
    threads = session.get_session_options().intra_op_num_threads or os.cpu_count() or 1
    return LatencyMeasurement(
        ms_per_image=statistics.median(runs_ms),
        runs_ms=runs_ms,
        warmup_runs=warmup,
        batch_size=1,
        threads=threads,
        cpu=cpu_model(),
        runtime="onnxruntime",
        runtime_version=ort.__version__,
        provider=session.get_providers()[0],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


__all__ = ["LatencyMeasurement", "OnnxSamModel", "OnnxSamOutput", "cpu_model", "measure_latency", "resize_bilinear"]
