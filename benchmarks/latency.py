"""CPU latency of deployable tiers against the float SamModel: PyTorch, onnxruntime and OpenVINO side by side.

    python benchmarks/latency.py [--tiers outputs/demo/tiers] [--threads 2] [--rounds 7] [--no-vit-b]

Two groups of models, each with its float SamModel:

- demo: the tiers of `--tiers` (a folder written by `mpsupernet.save_tiers`, such as the demo's `outputs/demo/tiers`)
  against the SamModel they were extracted from (`base_model` of its `tiers.json`); without `--tiers`, subnets of the
  supernet of a SAM shipped in the package (`--sam`, default the embedded SAM), calibrated on random images and
  chosen along the cost-only descent at `--budgets`, so that the script runs alone.
- vit_b: a random-weight SAM of ViT-B size at `--image-size` (512 px) against its W8A8 subnet, extracted from a
  supernet calibrated on `--calibration-images` random images (random weights cost the same time as trained ones).

Variants, all timed on the image encoder alone (batch 1; only the encoder differs between a tier and its float model):

- torch float eager / torch float SDPA: transformers' `SamModel.get_image_embeddings`, eager or SDPA attention;
- onnxruntime float: that encoder exported by `torch.onnx.export` (eager attention), default session options;
- per tier: `PyTorch (fake-quant)`, the subnet itself (dequantized weights, fake-quantized activations; context);
  `onnxruntime`, the tier's ONNX export run by `mpsupernet.runtime.OnnxSamModel` with the settings the export
  records (integer kernels); `OpenVINO`, the same file compiled with the export's OpenVINO settings (f32 precision
  hint: exact mode), where openvino is installed. The export is the file `save_tiers` shipped in the tier's folder
  (what users download) when there is one, else one made here by `export_onnx`; the table's `ONNX` column says which.

Before any timing, every variant's embeddings are checked once against its reference (float variants against torch
float eager, a tier's runtimes against its PyTorch subnet): a float variant that disagrees stops the benchmark, a
tier's runtime that disagrees is reported and left out of the timing. Then the variants of a group run in
interleaved rounds (one call of each per round, A B C ..., so that a slow spell of a shared machine hits all of them
alike) after one warm-up round, and each variant's figure is the median of its per-round ratios to torch float eager (and to onnxruntime float) of the same round. `--threads` sets
`torch.set_num_threads`, onnxruntime's `intra_op_num_threads` and OpenVINO's `INFERENCE_NUM_THREADS` alike.
"""

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import onnxruntime
import torch

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
from transformers import SamModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from mpsupernet import SamSubnetForMaskGeneration, SamSupernetForMaskGeneration  # noqa: E402
from mpsupernet.hub import read_tiers_manifest  # noqa: E402
from mpsupernet.integrity import described_files, read_config  # noqa: E402
from mpsupernet.layout import VISION_ENCODER_NAME  # noqa: E402
from mpsupernet.pretrained import SHIPPED_SAM_NAMES, load_sam  # noqa: E402
from mpsupernet.runtime import OnnxSamModel  # noqa: E402

EAGER, SDPA, ORT_FLOAT = "torch float eager", "torch float SDPA", "onnxruntime float"
RATIO_KEYS = {EAGER: "ratio_to_torch_eager", SDPA: "ratio_to_torch_sdpa", ORT_FLOAT: "ratio_to_onnxruntime_float"}
"""The float baselines every variant is divided by, and the result keys of those ratios."""
FLOAT_TOLERANCE = 1e-3
"""Largest difference allowed between two float variants, relative to the reference embeddings' largest |value|."""
RUNTIME_TOLERANCE = 0.05
"""Largest mean |difference| allowed between a tier's runtime and its PyTorch subnet, relative to the subnet's mean
|embedding|. Integer kernels sum in another order than fp32 fake quantization and so flip a few codes at rounding
boundaries (about 0.003 of the mean |embedding| on the embedded SAM's tiers); a wrong graph is off by about the
embeddings' own size."""
TARGETS = {
    "vit_b_onnxruntime_vs_torch_eager": 0.40,
    "vit_b_onnxruntime_vs_onnxruntime_float": 0.60,
    "vit_b_openvino_vs_torch_eager": 0.30,
}
"""Issue 10's acceptance targets for the ViT-B-size W8A8 encoder (ratios, at most)."""


@dataclass
class Variant:
    """One way of computing a group's image embeddings.

    Attributes:
        name: the row name. run: pixel values `(1, 3, size, size)` float32 -> embeddings (numpy).
        reference: the variant whose embeddings this one must reproduce (None: itself a reference).
        tier: the tier it runs (None for the float model). subnet: that tier's PyTorch subnet.
        onnx: for a tier's ONNX runtimes, `"shipped"` (the export in the tier's folder) or `"exported here"`.
    """

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    reference: str | None = None
    tier: str | None = None
    subnet: SamSubnetForMaskGeneration | None = field(default=None, repr=False)
    onnx: str | None = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", type=Path, help="A tiers folder (tiers.json), e.g. outputs/demo/tiers.")
    parser.add_argument(
        "--budgets", nargs="+", default=["5%", "10%", "25%", "50%"], help="Without --tiers: BitOPs budgets to extract."
    )
    parser.add_argument(
        "--sam", choices=SHIPPED_SAM_NAMES, default=SHIPPED_SAM_NAMES[0], help="Without --tiers: the shipped SAM."
    )
    parser.add_argument("--vit-b", action=argparse.BooleanOptionalAction, default=True, help="Also the ViT-B group.")
    parser.add_argument("--image-size", type=int, default=512, help="ViT-B input resolution (default: 512).")
    parser.add_argument("--calibration-images", type=int, default=2, help="Random images calibrating ViT-B (2).")
    # `--repeats`: the name of this flag before the rewrite, kept for one release.
    parser.add_argument("--rounds", "--repeats", type=int, default=7, help="Timed interleaved rounds (default: 7).")
    parser.add_argument("--threads", type=int, default=2, help="Threads of every runtime (default: 2).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and images.")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/latency.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/latency_vs_bitops.png"))
    # A test-size SAM instead of ViT-B, so that the ViT-B code path runs in seconds.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "threads", "image_size", "calibration_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    return args


# --- the models --------------------------------------------------------------------------------------------------
def random_images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def with_attention(sam: SamModel, implementation: str) -> SamModel:
    """A copy of `sam` with another attention implementation (transformers picks SAM's attention class at build)."""
    config = sam.config.__class__.from_dict(sam.config.to_dict())
    config._attn_implementation = implementation
    model = SamModel(config)
    model.load_state_dict(sam.state_dict())
    return model.eval()


Tiers = dict[str, SamSubnetForMaskGeneration]
"""Tier name -> subnet."""


def embedded_tiers(name: str, budgets: list[str], seed: int) -> tuple[SamModel, Tiers, dict[str, Path]]:
    """A SAM shipped in the package (`name`) and its supernet's cost-only subnets at `budgets` (calibrated on 4
    random images); no shipped exports."""
    sam = load_sam(name).eval()
    supernet = SamSupernetForMaskGeneration.from_sam(sam).eval()
    supernet.calibrate_quantizers(random_images(4, sam.config.vision_config.image_size, seed))
    return sam, {budget: supernet.extract_subnet(budget) for budget in budgets}, {}


def saved_tiers(folder: Path) -> tuple[SamModel, Tiers, dict[str, Path]]:
    """The tiers of a tiers folder, the float SamModel named as their `base_model`, and the folders of the tiers
    that ship their ONNX export (their `config.json` lists `vision_encoder.onnx`)."""
    manifest = read_tiers_manifest(folder)
    base = manifest["base_model"]
    # `from_sam` records a shipped SAM by its folder's name, which `mpsupernet demo` writes into `tiers.json`.
    sam = load_sam(base)
    folders = {name: folder / tier["subfolder"] for name, tier in manifest["tiers"].items()}
    tiers = {name: SamSubnetForMaskGeneration.from_pretrained(path).eval() for name, path in folders.items()}
    shipped = {name: path for name, path in folders.items() if VISION_ENCODER_NAME in described_files(read_config(path))}
    return sam.eval(), tiers, shipped


def vit_b_tier(args: argparse.Namespace) -> tuple[SamModel, Tiers, dict[str, Path]]:
    """A random-weight SAM of ViT-B size (test size with `--tiny`) and its W8A8 subnet; no shipped export."""
    sam = _common.build_sam(args.image_size, args.tiny, args.seed).eval()
    supernet = SamSupernetForMaskGeneration.from_sam(sam).eval()
    calibration = random_images(args.calibration_images, args.image_size, args.seed + 1)
    supernet.calibrate_quantizers(calibration, activation_bits=(8,), weight_bits=8)
    return sam, {"W8A8": supernet.extract_subnet(supernet.search_space.largest(weight_bits=8, activation_bits=8))}, {}


# --- the variants ------------------------------------------------------------------------------------------------
def torch_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    def run(pixel_values: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.get_image_embeddings(torch.from_numpy(pixel_values)).numpy()

    return run


class _ImageEncoder(torch.nn.Module):
    """`SamModel.get_image_embeddings` as a module's forward, for `torch.onnx.export`."""

    def __init__(self, sam: SamModel):
        super().__init__()
        self.sam = sam

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.sam.get_image_embeddings(pixel_values)


def session_options(threads: int) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def float_variants(sam: SamModel, pixel_values: np.ndarray, folder: Path, threads: int) -> list[Variant]:
    """torch float eager, torch float SDPA and onnxruntime float (the eager encoder exported by torch.onnx.export)."""
    eager, sdpa = with_attention(sam, "eager"), with_attention(sam, "sdpa")
    path = folder / "float_vision_encoder.onnx"
    with torch.no_grad():
        torch.onnx.export(
            _ImageEncoder(eager).eval(),
            (torch.from_numpy(pixel_values),),
            path,
            dynamo=True,
            input_names=["pixel_values"],
            output_names=["image_embeddings"],
            verbose=False,
        )
    session = onnxruntime.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    return [
        Variant(EAGER, torch_runner(eager)),
        Variant(SDPA, torch_runner(sdpa), reference=EAGER),
        Variant(ORT_FLOAT, lambda x: session.run(None, {"pixel_values": x})[0], reference=EAGER),
    ]


def tier_variants(
    name: str, subnet: SamSubnetForMaskGeneration, export_directory: Path, threads: int, shipped: Path | None = None
) -> list[Variant]:
    """The tier in PyTorch, and its ONNX export run by `OnnxSamModel` on onnxruntime and, where installed, OpenVINO.

    The export is the one in `shipped` (the tier's folder) when given, else one written into `export_directory`.
    """
    if shipped is None:
        subnet.export_onnx(export_directory, verify=False)
    directory, source = (export_directory, "exported here") if shipped is None else (shipped, "shipped")
    model = OnnxSamModel.from_pretrained(directory, session_options=session_options(threads))
    in_torch = f"{name}: PyTorch (fake-quant)"
    variants = [
        Variant(in_torch, torch_runner(subnet), tier=name, subnet=subnet),
        Variant(f"{name}: onnxruntime", model.get_image_embeddings, in_torch, name, subnet, source),
    ]
    with contextlib.suppress(ImportError):  # OpenVINO is optional
        openvino = OnnxSamModel.from_pretrained(directory, runtime="openvino", num_threads=threads)
        variants.append(Variant(f"{name}: OpenVINO", openvino.get_image_embeddings, in_torch, name, subnet, source))
    return variants


# --- checking and timing ------------------------------------------------------------------------------------------
def check_outputs(variants: list[Variant], pixel_values: np.ndarray) -> dict[str, dict]:
    """Runs every variant once and checks it against its reference; returns the errors per variant.

    A float variant must match torch float eager within `FLOAT_TOLERANCE` of the largest |embedding|: the float
    variants are the baselines of every ratio, so one that disagrees stops the run. A tier's runtime must match its
    PyTorch subnet within `RUNTIME_TOLERANCE` of the mean |embedding|; one that does not is marked
    (`"agrees": False`), reported, and left out of the timing (a wrong graph's speed means nothing).

    Raises:
        `SystemExit`: naming the float variant that disagrees with torch float eager.
    """
    outputs = {variant.name: variant.run(pixel_values) for variant in variants}
    float_embeddings = outputs[EAGER]
    errors = {}
    for variant in variants:
        output = outputs[variant.name]
        if variant.reference is None:
            if variant.tier is not None:
                quantization_error = np.abs(output - float_embeddings).mean() / np.abs(float_embeddings).mean()
                errors[variant.name] = {"relative_quantization_error": float(quantization_error), "agrees": True}
            continue
        reference = outputs[variant.reference]
        difference = np.abs(output - reference)
        error = {"mean_abs_error": float(difference.mean()), "max_abs_error": float(difference.max())}
        if variant.tier is None:
            error["relative_max_error"] = error["max_abs_error"] / float(np.abs(reference).max())
            error["agrees"] = bool(error["relative_max_error"] <= FLOAT_TOLERANCE)
            if not error["agrees"]:
                raise SystemExit(
                    f"{variant.name} disagrees with {variant.reference}: max error {error['relative_max_error']:.3g} "
                    f"of the largest |embedding|, allowed {FLOAT_TOLERANCE}. Nothing timed."
                )
        else:
            error["relative_mean_error"] = error["mean_abs_error"] / float(np.abs(reference).mean())
            error["agrees"] = bool(error["relative_mean_error"] <= RUNTIME_TOLERANCE)
            if not error["agrees"]:
                print(
                    f"warning: {variant.name} disagrees with {variant.reference}: mean error "
                    f"{error['relative_mean_error']:.3g} of the mean |embedding|, allowed {RUNTIME_TOLERANCE}; "
                    "not timed."
                )
        errors[variant.name] = error
    return errors


def median_ratio(seconds: dict[str, list[float]], name: str, baseline: str) -> float:
    """The median over rounds of `name`'s time divided by `baseline`'s time in the same round."""
    return _common.median([mine / theirs for mine, theirs in zip(seconds[name], seconds[baseline])])


def measure_group(
    sam: SamModel, tiers: Tiers, args: argparse.Namespace, folder: Path, shipped: dict[str, Path] | None = None
) -> list[dict]:
    """Builds, checks and times every variant of one group (the tiers in `shipped` on their own ONNX files); returns
    one result per variant."""
    pixel_values = random_images(1, sam.config.vision_config.image_size, args.seed + 2).numpy()
    variants = float_variants(sam, pixel_values, folder, args.threads)
    for index, (name, subnet) in enumerate(tiers.items()):
        variants += tier_variants(name, subnet, folder / f"tier-{index}", args.threads, (shipped or {}).get(name))
    errors = check_outputs(variants, pixel_values)
    timed = [variant for variant in variants if errors.get(variant.name, {}).get("agrees", True)]
    seconds = _common.interleaved_rounds(
        {variant.name: (lambda run=variant.run: run(pixel_values)) for variant in timed},
        rounds=args.rounds,
        device=torch.device("cpu"),
    )
    results = []
    for variant in variants:
        measured = variant.name in seconds
        result = {
            "variant": variant.name,
            "tier": variant.tier,
            "onnx": variant.onnx,
            "median_ms": 1000 * _common.median(seconds[variant.name]) if measured else None,
            **{
                key: median_ratio(seconds, variant.name, baseline) if measured else None
                for baseline, key in RATIO_KEYS.items()
            },
            "macs_ratio": 1.0,
            "bitops_share": 1.0,
            "check": errors.get(variant.name, {}),
        }
        if variant.subnet is not None:
            report = variant.subnet.bitops_report()
            # Every operation of the full-precision model counts float_bits x float_bits BitOPs per MAC.
            full_precision_macs = report.full_precision_bitops // variant.subnet.config.float_bits**2
            result.update(
                macs_ratio=report.total_macs / full_precision_macs,
                bitops_share=report.summary()["share_of_full_precision"],
                architecture=variant.subnet.config.architecture,
            )
        results.append(result)
    return results


# --- reporting ---------------------------------------------------------------------------------------------------
def print_group(title: str, results: list[dict]) -> None:
    print(f"\n-- {title}")
    header = ["variant", "ONNX", "median ms", f"x {EAGER}", f"x {ORT_FLOAT}", "MACs ratio", "BitOPs share", "check"]
    rows = []
    for result in results:
        check = result["check"]
        if "relative_max_error" in check:
            note = f"max err {check['relative_max_error']:.1e} of max |x|"
        elif "relative_mean_error" in check:
            note = f"mean err {check['relative_mean_error']:.1e} of mean |x|"
        elif "relative_quantization_error" in check:
            note = f"vs float {check['relative_quantization_error']:.3f} of mean |x|"
        else:
            note = "reference"
        if not check.get("agrees", True):
            note += ": DISAGREES, not timed"
        measured = result["median_ms"] is not None
        rows.append(
            [
                result["variant"],
                result["onnx"] or "-",
                round(result["median_ms"], 2) if measured else "-",
                result[RATIO_KEYS[EAGER]] if measured else "-",
                result[RATIO_KEYS[ORT_FLOAT]] if measured else "-",
                result["macs_ratio"],
                f"{100 * result['bitops_share']:.2f}%",
                note,
            ]
        )
    _common.print_table(header, rows)


def verdicts(groups: dict[str, list[dict]]) -> dict:
    """Prints whether issue 10's latency targets hold; returns them."""
    print()
    outcome = {}
    vit_b = {result["variant"]: result for result in groups.get("vit_b", [])}
    checks = [
        ("vit_b_onnxruntime_vs_torch_eager", "W8A8: onnxruntime", EAGER),
        ("vit_b_onnxruntime_vs_onnxruntime_float", "W8A8: onnxruntime", ORT_FLOAT),
        ("vit_b_openvino_vs_torch_eager", "W8A8: OpenVINO", EAGER),
    ]
    for key, variant, baseline in checks:
        if vit_b.get(variant, {}).get("median_ms") is None:
            print(f"ViT-B {variant} vs {baseline}: not measured")
            continue
        ratio = vit_b[variant][RATIO_KEYS[baseline]]
        _common.verdict(f"ViT-B {variant} vs {baseline}", ratio, TARGETS[key])
        outcome[key] = {"ratio": ratio, "target": TARGETS[key], "met": ratio <= TARGETS[key]}
    demo = [result for result in groups.get("demo", []) if result["variant"].endswith(": onnxruntime")]
    if demo:
        unmeasured = [result["tier"] for result in demo if result["median_ms"] is None]
        measured = [result for result in demo if result["median_ms"] is not None]
        slowest = max((max(r[RATIO_KEYS[EAGER]], r[RATIO_KEYS[SDPA]]) for r in measured), default=None)
        met = not unmeasured and slowest < 1.0
        print(
            "every demo tier on onnxruntime faster than the float SamModel in PyTorch (eager and SDPA): "
            + (f"slowest at {slowest:.3f}x" if slowest is not None else "none measured")
            + (f", not measured: {unmeasured}" if unmeasured else "")
            + f": {'MET' if met else 'NOT MET'}"
        )
        outcome["demo_tiers_faster_than_torch_float"] = {
            "slowest_ratio": slowest,
            "not_measured": unmeasured,
            "met": met,
        }
    return outcome


def plot(groups: dict[str, list[dict]], path: Path) -> None:
    """BitOPs share (x, log) against the measured latency ratio to torch float eager (y), one point per tier
    and runtime."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    markers = {"onnxruntime": "o", "OpenVINO": "s", "PyTorch (fake-quant)": "x"}
    colors = {"demo": "tab:blue", "vit_b": "tab:orange"}
    labels = {"demo": "demo tiers", "vit_b": "ViT-B"}
    for group, results in groups.items():
        for runtime, marker in markers.items():
            points = [
                r
                for r in results
                if r["tier"] is not None and r["median_ms"] is not None and r["variant"].endswith(f": {runtime}")
            ]
            if points:
                axes.scatter(
                    [100 * r["bitops_share"] for r in points],
                    [r[RATIO_KEYS[EAGER]] for r in points],
                    marker=marker,
                    color=colors[group],
                    label=f"{labels[group]}: {runtime}",
                )
            for r in points:
                axes.annotate(r["tier"], (100 * r["bitops_share"], r[RATIO_KEYS[EAGER]]), fontsize=7)
    axes.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=EAGER)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}%"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("BitOPs, share of the full-precision model")
    axes.set_ylabel(f"latency / {EAGER} (median of rounds)")
    axes.set_title("Image encoder latency on CPU vs BitOPs")
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot written to {path}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = _common.machine_info(torch.device("cpu"))
    machine["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(ImportError):
        import openvino

        machine["openvino"] = openvino.__version__
    settings = _common.settings_of(args)
    _common.print_header("Image encoder latency of tiers vs the float SamModel (CPU, batch 1)", machine, settings)
    if args.tiers:
        sources = {"demo": lambda: saved_tiers(args.tiers)}
    else:
        sources = {"demo": lambda: embedded_tiers(args.sam, args.budgets, args.seed)}
    if args.vit_b:
        sources["vit_b"] = lambda: vit_b_tier(args)
    groups = {}
    for group, load in sources.items():
        sam, tiers, shipped = load()
        with tempfile.TemporaryDirectory(prefix=f"latency-{group}-") as folder:
            groups[group] = measure_group(sam, tiers, args, Path(folder), shipped)
        print_group(f"{group}: {_common.describe_model(sam.config)}", groups[group])
    outcome = verdicts(groups)
    plot(groups, args.plot)
    payload = {"machine": machine, "settings": settings, "groups": groups, "targets": outcome, "plot": str(args.plot)}
    _common.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
