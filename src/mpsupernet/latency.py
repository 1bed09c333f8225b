"""Latency models: what a subnet's image encoder costs on one machine and runtime, predicted from its architecture.

BitOPs price the arithmetic of an ideal integer accelerator; CPU runtimes do not run that arithmetic. onnxruntime and
OpenVINO multiply 2- to 8-bit codes in int8 containers at int8 speed, keep some operations in float whatever their
bits, and pay per-operation overheads that do not shrink with bits. A [`LatencyModel`] prices an architecture in
milliseconds on the machine and runtime it was fitted on, as a pure function of the architecture, so that the
search and the extraction can ask it as they ask the BitOPs counter.

The model (our design, after the efficiency predictors of once-for-all's look-up tables, but calibrated on whole
exported subnets rather than per-block micro-benchmarks, so that fusions across blocks and the shared parts are in
the measurements): the encoder's time is a non-negative combination of counts that the architecture fixes,

    ms = c0 + c1·kept blocks + c2·integer Linear GMACs + c3·float GMACs + c4·attention scores (millions)
            + c5·token elements (millions) + c6·resized elements (millions)

where the MACs come from the BitOPs counter's rows (`mpsupernet.bitops.count_operations`); a Linear counts as integer
when its activations are quantized (any bit-width of 2 to 8 runs in an int8 container: the bits themselves cost
nothing), float MACs are those of float Linears and of the convolutions (which onnxruntime runs in float); each kept
block pays a fixed cost for its few dozen operator launches; the attention scores are the softmax inputs (windows ×
heads × window tokens²), which the attention products and relative-position terms scale with; and the token elements the layer norms', GELUs' and residual
additions' inputs (tokens × (feature size + MLP width) per kept block), and the resized elements the input image and
output embeddings that a subnet below the base resolution resizes in its graph. The coefficients are fitted by non-negative
least squares on relative error to the median latencies of `num_subnets` exported subnets (anchors at the corners of
the space and random ones), measured in interleaved rounds with the runtime and thread count that will run the tiers.
Non-negative coefficients make the prediction monotone in depth and width: dropping a block, a head or MLP width
never costs more (a resolution below the base size saves compute but pays the resizing).
"""

import datetime
import json
import math
import os
import random
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .architecture import is_float_bits, SubnetArchitecture
from .bitops import count_operations
from .choices import EXPORT_TARGETS
from .configuration_sam_supernet import SamSupernetConfig
from .layout import LATENCY_MODEL_NAME
from .search_space import SPACE_FIELDS, SearchSpace

LATENCY_MODEL_FORMAT_VERSION = 1
FEATURES = (
    "constant",
    "kept_blocks",
    "integer_linear_gmacs",
    "float_gmacs",
    "attention_scores_millions",
    "token_elements_millions",
    "resize_millions",
)
"""The counts a [`LatencyModel`] prices, each at a fitted number of milliseconds per unit."""
ENCODER_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_dim",
    "patch_size",
    "window_size",
    "global_attn_indexes",
    "output_channels",
    "image_size",
    "use_rel_pos",
)
DEFAULT_MAX_SPREAD = 0.25
"""The largest interquartile range of one subnet's timed runs, relative to their median, that a measurement accepts
by default: an idle machine stays well under it, one that other processes load does not."""


def latency_features(config: SamSupernetConfig, arch: SubnetArchitecture) -> dict[str, float]:
    """The counts of `arch`'s image encoder (for one image) that a [`LatencyModel`] prices, by name of `FEATURES`.

    A pure function of the configuration and the architecture: nothing runs.
    """
    vision = config.vision_config
    hidden = vision.hidden_size if arch.hidden_size is None else arch.hidden_size
    head_dim = vision.hidden_size // vision.num_attention_heads
    tokens = (arch.resolution // vision.patch_size) ** 2
    values = dict.fromkeys(FEATURES, 0.0)
    values["constant"] = 1.0
    values["kept_blocks"] = float(arch.depth)
    for row in count_operations(config, arch):
        if row.kind == "linear" and not is_float_bits(arch.bits_of(row.name)[1]):
            values["integer_linear_gmacs"] += row.macs / 1e9
        elif row.kind in ("linear", "conv"):
            # onnxruntime keeps the exported convolutions in float whatever their bits.
            values["float_gmacs"] += row.macs / 1e9
        elif row.name.endswith("query_key"):
            # Scores, products with values and relative positions all scale with the scores' count.
            values["attention_scores_millions"] += row.macs / head_dim / 1e6
    for block in arch.kept_blocks:
        values["token_elements_millions"] += tokens * (hidden + arch.mlp_dims[block]) / 1e6
    if arch.resolution != vision.image_size:
        # The graph resizes base-size images to the resolution and the embeddings back to the base grid.
        base_grid = vision.image_size // vision.patch_size
        values["resize_millions"] = (vision.num_channels * vision.image_size**2 + vision.output_channels * base_grid**2) / 1e6
    return values


def space_signature(config: SamSupernetConfig) -> dict:
    """What fixes the latency of every architecture of a supernet: the encoder's shape and the search space's
    choices (not the weights). Two supernets with equal signatures share a latency model."""
    vision = config.vision_config
    return {
        "encoder": {key: getattr(vision, key) for key in ENCODER_KEYS},
        "space": {key: getattr(config, key) for key in SPACE_FIELDS},
    }


@dataclass
class LatencyModel:
    """Milliseconds of a subnet's image encoder (batch 1) on the machine and runtime it was fitted on.

    Made by [`fit_latency_model`]; `predict(arch)` is a pure function of the architecture.

    Attributes:
        coefficients (`dict[str, float]`): milliseconds per unit of each of `FEATURES` (all non-negative).
        config (`dict`): the supernet configuration it was fitted for (`SamSupernetConfig.to_dict()`).
        runtime (`str`), runtime_version (`str`): what ran the exported encoders (`"onnxruntime"`, `"openvino"`).
        num_threads (`int`): intra-op threads of the runtime.
        cpu (`str`): the CPU model; date (`str`): UTC date and time of the fit, ISO 8601.
        calibration (`list[dict]`): each measured subnet: `architecture`, `measured_ms` (median), `spread`
            (interquartile range over median), `runs_ms` and `predicted_ms` after the fit.
        fit_error (`dict`): median and worst relative error of the fit on its calibration subnets.
        max_spread (`float` or `None`): the spread the measurement accepted; `busy` is `True` when a subnet's spread
            exceeded `DEFAULT_MAX_SPREAD` (a loaded machine: treat the figures as measured under load).
    """

    coefficients: dict[str, float]
    config: dict
    runtime: str
    runtime_version: str
    num_threads: int
    cpu: str
    date: str
    calibration: list[dict] = field(default_factory=list)
    fit_error: dict = field(default_factory=dict)
    max_spread: float | None = DEFAULT_MAX_SPREAD
    busy: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.coefficients) - set(FEATURES))
        missing = sorted(set(FEATURES) - set(self.coefficients))
        if unknown or missing:
            raise ValueError(f"Latency coefficients must name exactly {list(FEATURES)}; missing {missing}, unknown {unknown}.")
        negative = {key: value for key, value in self.coefficients.items() if not value >= 0}
        if negative:
            raise ValueError(f"Latency coefficients must be non-negative numbers, got {negative}.")
        self.config = json.loads(json.dumps(self.config))  # as the JSON file holds it: lists, not tuples
        self._config = SamSupernetConfig.from_dict(self.config)
        self._space = SearchSpace(self._config)

    @property
    def search_space(self) -> SearchSpace:
        """The architectures this model prices."""
        return self._space

    def predict(self, arch: SubnetArchitecture | dict | str) -> float:
        """Predicted milliseconds of `arch`'s image encoder for one image.

        Raises:
            `ValueError`: if `arch` is not an architecture of the space this model was fitted on (named).
        """
        arch = self._in_space_order(SubnetArchitecture.coerce(arch))
        self._space.validate(arch)
        features = latency_features(self._config, arch)
        return float(sum(self.coefficients[name] * value for name, value in features.items()))

    __call__ = predict

    def _in_space_order(self, arch: SubnetArchitecture) -> SubnetArchitecture:
        """`arch` with its layers in the space's order (a saved subnet's config lists them sorted by name)."""
        names = self._space.layer_names
        if arch.layer_names == names or sorted(arch.layer_names) != sorted(names):
            return arch
        bits = [arch.bits_of(name) for name in names]
        return replace(arch, layer_names=names, weight_bits=tuple(w for w, _ in bits), activation_bits=tuple(a for _, a in bits))

    def fastest(self) -> tuple[SubnetArchitecture, float]:
        """The fastest architecture of the space and its predicted milliseconds.

        Every count but the resizing grows with depth, width and resolution and the coefficients are non-negative, so
        the fastest is the smallest subnet at one of the resolutions (below the base size the graph resizes)."""
        candidates = [self._space.canonical(replace(self._space.smallest(), resolution=resolution))
                      for resolution in self._space.resolution_choices]
        return min(((arch, self.predict(arch)) for arch in candidates), key=lambda pair: pair[1])

    def check_compatible(self, config_or_model) -> None:
        """Refuses a supernet (or its config) whose encoder shape or search space differ from the fitted one's.

        Raises:
            `ValueError`: naming every differing setting with both values.
        """
        config = getattr(config_or_model, "config", config_or_model)
        theirs, ours = space_signature(config), space_signature(self._config)
        differences = [
            f"{part}.{key}: {theirs[part][key]!r} (latency model: {ours[part][key]!r})"
            for part in ours
            for key in ours[part]
            if theirs[part][key] != ours[part][key]
        ]
        if differences:
            raise ValueError(
                "The latency model was fitted on another architecture space than this supernet's: "
                + "; ".join(differences)
                + ". Fit one for this supernet with `mpsupernet.fit_latency_model(supernet)`."
            )

    def parse_budget(self, max_latency_ms, name: str = "max_latency_ms") -> float:
        """`max_latency_ms` as a float, refused when it is not a positive finite number or when no subnet meets it.

        Raises:
            `ValueError`: naming the value, and for a budget below every prediction, the fastest predicted subnet.
        """
        if isinstance(max_latency_ms, bool) or not isinstance(max_latency_ms, (int, float)):
            value = getattr(max_latency_ms, "item", lambda: None)()
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"`{name}` must be a positive number of milliseconds, got {max_latency_ms!r}.")
            max_latency_ms = value
        if not math.isfinite(max_latency_ms) or max_latency_ms <= 0:
            raise ValueError(f"`{name}` must be a positive number of milliseconds, got {max_latency_ms!r}.")
        arch, fastest_ms = self.fastest()
        if max_latency_ms < fastest_ms:
            raise ValueError(
                f"`{name}` is {max_latency_ms!r} ms but no subnet meets it on {self.describe_machine()}: the fastest "
                f"predicted subnet takes {fastest_ms:.3f} ms ({arch.to_json()})."
            )
        return float(max_latency_ms)

    def machine(self) -> dict:
        """Where and how the model was measured (for a front's or a tier's metadata)."""
        return {
            "runtime": self.runtime, "runtime_version": self.runtime_version, "num_threads": self.num_threads,
            "cpu": self.cpu, "date": self.date, "busy": self.busy, "fit_error": self.fit_error,
        }

    def describe_machine(self) -> str:
        return f"{self.cpu}, {self.num_threads} threads, {self.runtime} {self.runtime_version}"

    # --- persistence ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        return {"format_version": LATENCY_MODEL_FORMAT_VERSION, "features": list(FEATURES), **data}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Writes `latency_model.json` into `save_directory` (created if needed), crash-safely; returns its path."""
        from .atomic import write_json_atomic

        return write_json_atomic(Path(save_directory) / LATENCY_MODEL_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LatencyModel":
        """Reads a latency model written by `save_pretrained`: its folder or the JSON file itself.

        Raises:
            `FileNotFoundError`: naming the path when it holds no latency model.
            `ValueError`: naming the file when it is not a latency model of a version this mpsupernet reads.
        """
        path = Path(path)
        if path.is_dir():
            path = path / LATENCY_MODEL_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No latency model at {str(path)!r} (save_pretrained writes {LATENCY_MODEL_NAME}).")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(path)!r} is not a latency model's JSON: {error}.") from None
        version = data.pop("format_version", None) if isinstance(data, dict) else None
        if version != LATENCY_MODEL_FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has format_version {version!r}; this mpsupernet reads latency models of version "
                f"{LATENCY_MODEL_FORMAT_VERSION}."
            )
        data.pop("features", None)
        return cls(**data)


class BusyMachineError(RuntimeError):
    """Timed runs spread too much to be this machine's latency: other work is loading it."""


# --- measuring --------------------------------------------------------------------------------------------------
@dataclass
class EncoderTiming:
    """One exported encoder's timed runs, from interleaved rounds.

    Attributes:
        median_ms (`float`): median of `runs_ms`.
        spread (`float`): interquartile range of `runs_ms` over their median; a loaded machine shows large spreads.
        runs_ms (`list[float]`): one run per round, in order.
    """

    median_ms: float
    spread: float
    runs_ms: list[float]


def _session(path: Path, runtime: str, num_threads: int):
    from .export.writer import ONNXRUNTIME_SETTINGS, OPENVINO_SETTINGS
    from .runtime import _OnnxRuntimeGraph, _OpenVinoGraph

    if runtime == "onnxruntime":
        return _OnnxRuntimeGraph(path, ONNXRUNTIME_SETTINGS, "CPUExecutionProvider", num_threads=num_threads)
    return _OpenVinoGraph(path, OPENVINO_SETTINGS, "CPU", num_threads=num_threads)


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    import openvino

    return openvino.__version__


def time_encoders(
    paths: list[Path],
    image_sizes: list[int],
    *,
    runtime: str = "onnxruntime",
    num_threads: int = 1,
    rounds: int = 10,
    warmup: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> list[EncoderTiming]:
    """Times exported image encoders (batch 1) in interleaved rounds: each round runs every encoder once, in a
    shuffled order, so that a change of load touches all of them alike.

    Args:
        paths (`list[Path]`): `vision_encoder.onnx` files; image_sizes (`list[int]`): each one's input size.
        runtime (`str`): `"onnxruntime"` or `"openvino"` (f32 precision hint: the exact mode).
        num_threads (`int`): intra-op threads; rounds (`int`): timed runs of each; warmup (`int`): untimed runs
            first.
    """
    import time

    sessions = [_session(path, runtime, num_threads) for path in paths]
    rng = np.random.default_rng(seed)
    inputs = [{"pixel_values": rng.standard_normal((1, 3, size, size)).astype(np.float32)} for size in image_sizes]
    for session, feeds in zip(sessions, inputs):
        for _ in range(warmup):
            session(feeds)
    runs = [[] for _ in paths]
    order = list(range(len(paths)))
    shuffle = random.Random(seed)
    for _ in tqdm(range(rounds), desc="Timing encoders", unit="round", disable=not progress):
        shuffle.shuffle(order)
        for index in order:
            start = time.perf_counter()
            sessions[index](inputs[index])
            runs[index].append(1000.0 * (time.perf_counter() - start))
    timings = []
    for values in runs:
        median = statistics.median(values)
        quartiles = np.percentile(values, [25, 75])
        timings.append(EncoderTiming(median, float((quartiles[1] - quartiles[0]) / median), values))
    return timings


def calibration_architectures(space: SearchSpace, num_subnets: int, seed: int = 0) -> list[SubnetArchitecture]:
    """The subnets a latency model is fitted on: the corners of the space (the largest at its highest bits and in
    float, the smallest, the largest and smallest at every resolution), then distinct random samples."""
    anchors = [space.largest(), space.full_precision(), space.smallest()]
    top_bits = (space.weight_bit_choices[0], space.activation_bit_choices[0])
    for resolution in space.resolution_choices:
        anchors.append(replace(space.largest(*top_bits), resolution=resolution))
        anchors.append(replace(space.smallest(), resolution=resolution))
    chosen = list(dict.fromkeys(space.canonical(arch) for arch in anchors))[:num_subnets]
    rng = random.Random(seed)
    for _ in range(100 * num_subnets):
        if len(chosen) >= num_subnets:
            break
        arch = space.sample(rng)
        if arch not in chosen:
            chosen.append(arch)
    return chosen


def export_encoders(supernet, archs: list[SubnetArchitecture], folder: Path, progress: bool = True) -> list[Path]:
    """Extracts each architecture and exports its QDQ image encoder (as `export_onnx` writes it) into `folder`."""
    from .export.writer import export_vision_encoder
    from .extraction import extract_subnet

    paths = []
    for index, arch in enumerate(tqdm(archs, desc="Exporting subnets", unit="subnet", disable=not progress)):
        subnet = extract_subnet(supernet, arch)
        paths.append(export_vision_encoder(subnet, folder / f"subnet_{index}.onnx"))
    return paths


def _with_every_step(supernet, seed: int):
    """A copy of `supernet` whose activation steps are set at every bit-width (those missing from one random image):
    latency does not depend on the values, and extraction needs every step of the bits it extracts."""
    import copy

    import torch

    size = supernet.config.vision_config.image_size
    calibrated = copy.deepcopy(supernet).eval()
    calibrated.calibrate_quantizers(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    return calibrated


def check_spread(timings: list[EncoderTiming], max_spread: float | None) -> bool:
    """Whether the machine looked busy (a spread above `DEFAULT_MAX_SPREAD`); refuses spreads above `max_spread`.

    Raises:
        `BusyMachineError`: naming the worst spread, when it exceeds `max_spread`.
    """
    worst = max(timing.spread for timing in timings)
    if max_spread is not None and worst > max_spread:
        raise BusyMachineError(
            f"The timed runs spread by up to {worst:.0%} of their median (interquartile range), above `max_spread` "
            f"({max_spread:.0%}): the machine is busy, and latencies measured now would not be this machine's. "
            "Measure again on an idle machine, or pass `max_spread=None` to accept (and flag) them."
        )
    return worst > DEFAULT_MAX_SPREAD


def fit_coefficients(features: list[dict[str, float]], measured_ms: list[float]) -> dict[str, float]:
    """Non-negative least squares on relative error: each row is divided by its measured latency."""
    from scipy.optimize import nnls

    matrix = np.array([[row[name] for name in FEATURES] for row in features], dtype=float)
    target = np.asarray(measured_ms, dtype=float)
    scale = matrix.max(axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(matrix / scale / target[:, None], np.ones_like(target))
    return {name: float(value) for name, value in zip(FEATURES, solution / scale)}


def relative_errors(predicted: list[float], measured: list[float]) -> dict:
    """Median and worst |predicted − measured| / measured."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    return {"median_relative_error": statistics.median(errors), "max_relative_error": max(errors), "count": len(errors)}


def fit_latency_model(
    supernet,
    runtime: str = "onnxruntime",
    num_threads: int = 1,
    *,
    num_subnets: int = 12,
    rounds: int = 10,
    warmup: int = 2,
    max_spread: float | None = DEFAULT_MAX_SPREAD,
    seed: int = 0,
    progress: bool = True,
) -> LatencyModel:
    """Fits a [`LatencyModel`] of `supernet`'s subnets on this machine, with the runtime that will run them.

    Extracts `num_subnets` subnets (the corners of the space, then random ones; see `calibration_architectures`),
    exports each one's QDQ image encoder as `export_onnx` does, times them all in `rounds` interleaved rounds
    (batch 1, after `warmup` runs each), and fits the model's coefficients to the medians (see the module
    docstring). About 20–40 s per subnet on 2 busy cores for the embedded SAM, most of it in the exporter.

    Args:
        supernet (`SamSupernetForMaskGeneration`): the supernet (left unchanged: the subnets are extracted from a
            copy whose activation steps missing at some bit-width are set from one random image, since latency does
            not depend on the values).
        runtime (`str`, *optional*, defaults to `"onnxruntime"`): `"onnxruntime"` or `"openvino"`.
        num_threads (`int`, *optional*, defaults to 1): the runtime's intra-op threads.
        num_subnets (`int`, *optional*, defaults to 12): calibration subnets, at least `len(FEATURES)`.
        rounds (`int`, *optional*, defaults to 10): timed runs per subnet, at least 3.
        warmup (`int`, *optional*, defaults to 2): untimed runs per subnet first.
        max_spread (`float`, *optional*): refuse the fit when a subnet's runs spread more than this (interquartile
            range over median); `None` accepts any spread and flags a busy machine in `LatencyModel.busy`.
        seed (`int`, *optional*, defaults to 0): seeds the random subnets, the input and the round order.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    Raises:
        `ValueError`: for a runtime other than `"onnxruntime"`/`"openvino"`, or settings out of range (named).
        `BusyMachineError`: when the timed runs spread more than `max_spread` (a busy machine); nothing is returned.
    """
    if runtime not in EXPORT_TARGETS:
        raise ValueError(f"`runtime` must be one of {list(EXPORT_TARGETS)}, got {runtime!r}.")
    for name, value, low in (
        ("num_threads", num_threads, 1), ("num_subnets", num_subnets, len(FEATURES)), ("rounds", rounds, 3),
        ("warmup", warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer of at least {low}, got {value!r}.")
    if max_spread is not None and not (isinstance(max_spread, (int, float)) and max_spread > 0):
        raise ValueError(f"`max_spread` must be a positive number or None, got {max_spread!r}.")
    config = supernet.config
    archs = calibration_architectures(supernet.search_space, num_subnets, seed)
    supernet = _with_every_step(supernet, seed)
    with tempfile.TemporaryDirectory(prefix="mpsupernet-latency-") as folder:
        paths = export_encoders(supernet, archs, Path(folder), progress)
        timings = time_encoders(
            paths, [config.vision_config.image_size] * len(paths), runtime=runtime, num_threads=num_threads,
            rounds=rounds, warmup=warmup, seed=seed, progress=progress,
        )
    busy = check_spread(timings, max_spread)
    features = [latency_features(config, arch) for arch in archs]
    measured = [timing.median_ms for timing in timings]
    coefficients = fit_coefficients(features, measured)
    predicted = [sum(coefficients[name] * row[name] for name in FEATURES) for row in features]
    from .runtime import cpu_model

    return LatencyModel(
        coefficients=coefficients,
        config=config.to_dict(),
        runtime=runtime,
        runtime_version=runtime_version(runtime),
        num_threads=num_threads,
        cpu=cpu_model(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        calibration=[
            {"architecture": arch.to_dict(), "measured_ms": timing.median_ms, "spread": timing.spread,
             "runs_ms": timing.runs_ms, "predicted_ms": prediction}
            for arch, timing, prediction in zip(archs, timings, predicted)
        ],
        fit_error=relative_errors(predicted, measured),
        max_spread=max_spread,
        busy=busy,
    )


__all__ = [
    "BusyMachineError",
    "DEFAULT_MAX_SPREAD",
    "FEATURES",
    "EncoderTiming",
    "LatencyModel",
    "calibration_architectures",
    "fit_latency_model",
    "latency_features",
    "space_signature",
    "time_encoders",
]
