"""The whole method end to end on the embedded default, offline, on CPUs: `mpsupernet demo`.

embedded pretrained SAM → supernet → sandwich training → evolutionary search → three extracted tiers with model
cards, ONNX exports and their measured onnxruntime latency → the Pareto plot and a summary table.
"""

import json
import time
from pathlib import Path

import torch
from transformers.utils import logging

from .bitops import format_bitops
from .data import REAL3_INSTALL, is_real3_available, load_real3_dataset, make_synthetic_segmentation_dataset_dict
from .metrics.evaluation import evaluate_dataset_mean_iou, evaluate_real3_mean_iou
from .export.notices import quiet_exporter_notices
from .hub import describe_latency_measurement, save_tiers
from .modeling_sam_supernet import SamSupernetForMaskGeneration
from .pretrained import load_sam, shipped_sam_path
from .search import run_search
from .search.run import _check_search_settings
from .training.arguments import SupernetTrainingArguments
from .training.loop import _check_positive_int, train_supernet

logger = logging.get_logger(__name__)

TIER_NAMES = ("xs", "s", "m")
LEARNING_RATE = 2e-3
BATCH_SIZE = 4
"""Supernet training settings of the demo, which the quality benchmarks (`benchmarks/`) train with too."""
TRAIN_STEPS = 400
"""Sandwich steps of the demo's supernet training. The embedded SAM's decoder is LiteMedSAM's, trained on real
images; the demo fine-tunes on synthetic shapes only, and longer training trades real-image quality for synthetic:
with 600 steps its best tier under 10% kept 0.93 of the pretrained SAM's real-3 mIoU (synthetic validation 0.76), with
400 steps 1.01 (0.75), in two runs of 2026-11-30. 400 steps also keep `make demo` within its 15 minutes."""
MAX_TIER_SHARE = 0.10
"""Tiers are drawn from the Pareto front below this share of the full-precision BitOPs (the issue's deployment
budget; the smallest subnets of the embedded SAM cost about 0.1%)."""


def training_arguments(output_dir, max_steps: int = TRAIN_STEPS, seed: int = 0, **options) -> SupernetTrainingArguments:
    """The demo's supernet training settings, which the quality benchmarks train with too.

    `LEARNING_RATE` with a 5% linear warm-up, `BATCH_SIZE` images per step (training and evaluation), a log line every
    10 steps, no checkpoints and no experiment tracker.

    Args:
        output_dir (`str` or `Path`): where `train_supernet` saves the supernet.
        max_steps (`int`, *optional*, defaults to `TRAIN_STEPS`): optimizer steps.
        seed (`int`, *optional*, defaults to 0): the run's seed.
        options: other `SupernetTrainingArguments` fields, overriding these (`logging_steps`, `fixed_architecture`).
    """
    settings = {
        "learning_rate": LEARNING_RATE,
        "per_device_train_batch_size": BATCH_SIZE,
        "per_device_eval_batch_size": BATCH_SIZE,
        "warmup_steps": 0.05,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
    }
    return SupernetTrainingArguments(output_dir=str(output_dir), max_steps=max_steps, seed=seed, **{**settings, **options})


def pick_tier_budgets(front) -> dict[str, int]:
    """Three front points spread from the cheapest to the best under `MAX_TIER_SHARE`, as tier name → BitOPs budget."""
    cap = MAX_TIER_SHARE * front.full_precision_bitops
    candidates = [entry for entry in front.entries if entry.bitops <= cap] or front.entries[:1]
    last = len(candidates) - 1
    picks = sorted({round(index * last / (len(TIER_NAMES) - 1)) for index in range(len(TIER_NAMES))})
    return {name: candidates[index].bitops for name, index in zip(TIER_NAMES, picks)}


def summary_rows(
    full_precision_bitops: int, sam_mean_iou: float, manifest: dict, real3_mean_ious: dict | None = None
) -> list[dict]:
    """The demo's result table: the pretrained SAM, then each tier of the manifest (BitOPs, share, mean IoU and the
    measured onnxruntime latency of its encoder, `latency_ms`; None for the PyTorch SAM and unexported tiers).

    `real3_mean_ious` maps `"pretrained"` and tier names to `evaluate_real3_mean_iou` results; each row's
    `real3_mean_iou` is its entry, or None without real-3.
    """
    real3_mean_ious = real3_mean_ious or {}
    rows = [
        {
            "model": "pretrained SAM (float)",
            "gbitops": full_precision_bitops / 1e9,
            "share_of_full_precision": 1.0,
            "mean_iou": sam_mean_iou,
            "latency_ms": None,
            "real3_mean_iou": real3_mean_ious.get("pretrained"),
        }
    ]
    for name, tier in manifest["tiers"].items():
        rows.append(
            {
                "model": f"tier {name}",
                "gbitops": tier["bitops"] / 1e9,
                "share_of_full_precision": tier["share_of_full_precision"],
                "mean_iou": tier["mean_iou"],
                "latency_ms": tier.get("latency_ms"),
                "real3_mean_iou": real3_mean_ious.get(name),
            }
        )
    return rows


def print_summary(rows: list[dict], machine: str | None = None) -> None:
    """mIoU: the synthetic validation split; real-3: over its 152 real instances (per domain in `summary.json`);
    ORT ms: the tier's image encoder on onnxruntime, CPU, batch 1, as `tiers.json` publishes it (`machine` says
    where it was measured)."""
    print(f"{'model':<28} {'GBitOPs':>9} {'% of FP':>8} {'mIoU':>7} {'real-3':>7} {'ORT ms':>8}")
    for row in rows:
        real3 = row.get("real3_mean_iou")
        real3_column = "n/a" if real3 is None else f"{real3['instances']:.4f}"
        latency = row.get("latency_ms")
        latency_column = "n/a" if latency is None else f"{latency:.1f}"
        print(
            f"{row['model']:<28} {row['gbitops']:>9.3f} {100 * row['share_of_full_precision']:>7.2f}% "
            f"{row['mean_iou']:>7.4f} {real3_column:>7} {latency_column:>8}"
        )
    if machine:
        print(f"ORT ms: image encoder on onnxruntime, measured on {machine}")


def write_summary(output: Path, rows: list[dict], training: dict, started: float) -> dict:
    """Writes `summary.json` (the table, the training result without its log, where the outputs are, the duration)."""
    summary = {
        "rows": rows,
        "training": {k: v for k, v in training.items() if k != "log_history"},
        "pareto_front": str(output / "pareto_front.json"),
        "pareto_plot": str(output / "pareto_front.png"),
        "tiers": str(output / "tiers"),
        "seconds": time.perf_counter() - started,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"Done in {summary['seconds'] / 60:.1f} min; outputs in {output}")
    return summary


def check_demo_settings(train_steps, num_train, num_validation, population_size, generations, seed) -> None:
    """Refuses bad demo settings before anything is loaded or written (see `run_demo`'s Raises)."""
    for name, value in (("train_steps", train_steps), ("num_train", num_train), ("num_validation", num_validation)):
        _check_positive_int(name, value)
    _check_search_settings("nsga2", population_size, generations)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")


def train_and_search(supernet, splits, output: Path, train_steps: int, population_size: int, generations: int, seed: int):
    """Steps 2 and 3 of a demo: sandwich training on the train split (saved under `output/supernet`), then the
    evolutionary search on the validation split (front written into `output`); returns `(training, front)`."""
    print(f"[2/5] Supernet training: {train_steps} sandwich steps on {len(splits['train'])} synthetic images")
    args = training_arguments(output / "supernet", train_steps, seed)
    training = train_supernet(supernet, splits["train"], splits["validation"], args=args)
    print(f"[3/5] Evolutionary search: population {population_size}, {generations} generations")
    front = run_search(
        supernet.eval(),
        splits["validation"],
        output_dir=output,
        population_size=population_size,
        generations=generations,
        seed=seed,
    )
    return training, front


def finish_demo(output: Path, rows: list[dict], manifest: dict, training: dict, started: float) -> dict:
    """Step 5 of a demo: prints the table (with the machine the tiers' latency was measured on) and writes
    `summary.json`."""
    measured = [tier for tier in manifest["tiers"].values() if tier.get("latency_ms") is not None]
    print_summary(rows, machine=describe_latency_measurement(measured[0]) if measured else None)
    return write_summary(output, rows, training, started)


def run_demo(
    output_dir: str = "outputs/demo",
    train_steps: int = TRAIN_STEPS,
    num_train: int = 256,
    num_validation: int = 32,
    population_size: int = 16,
    generations: int = 6,
    seed: int = 0,
) -> dict:
    """Runs the demo and writes everything under `output_dir`.

    Args:
        output_dir (`str`): where the supernet, the Pareto front (JSON and PNG), the tiers with their model cards and
            `summary.json` go.
        train_steps (`int`): optimizer steps of supernet training (each trains 4 subnets).
        num_train, num_validation (`int`): sizes of the synthetic splits.
        population_size, generations (`int`): the evolutionary search's settings.
        seed (`int`): seeds data, prompts, sampling and search.

    Returns:
        `dict`: the summary also written to `summary.json`.

    Raises:
        `ValueError`: for a `train_steps`, `num_train` or `num_validation` below 1, a `population_size` below 2, a
            negative `generations` or `seed`, or a value that is not an integer; raised before anything is loaded or
            written, not minutes later by the training or the search.
    """
    check_demo_settings(train_steps, num_train, num_validation, population_size, generations, seed)
    started = time.perf_counter()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    print(f"[1/5] Shipped pretrained SAM from {shipped_sam_path()} → supernet")
    sam = load_sam()
    supernet = SamSupernetForMaskGeneration.from_sam(sam)
    splits = make_synthetic_segmentation_dataset_dict(num_train, num_validation, seed=seed)
    sam_miou = evaluate_dataset_mean_iou(sam, splits["validation"], seed=seed)
    # The real images are held out: only measured, never trained or searched on.
    real3 = load_real3_dataset() if is_real3_available() else None
    real3_mious = {}
    if real3 is None:
        print(f"      real-3 images not installed, no real-3 column (install: {REAL3_INSTALL})")
    else:
        real3_mious["pretrained"] = evaluate_real3_mean_iou(sam, real3, seed=seed)

    training, front = train_and_search(supernet, splits, output, train_steps, population_size, generations, seed)

    budgets = pick_tier_budgets(front)
    print(f"[4/5] Extracting tiers under {', '.join(f'{n}: {format_bitops(b)}' for n, b in budgets.items())}")
    tiers = {name: supernet.extract_subnet(budget, pareto_front=front) for name, budget in budgets.items()}
    mean_ious = {name: evaluate_dataset_mean_iou(tier, splits["validation"], seed=seed) for name, tier in tiers.items()}
    if real3 is not None:
        real3_mious.update({name: evaluate_real3_mean_iou(tier, real3, seed=seed) for name, tier in tiers.items()})
    # The cards name the base model and data that the supernet's config records ("embedded-sam", the synthetic set).
    with quiet_exporter_notices():  # the table, not the exporter's notices about torch itself
        manifest = save_tiers(tiers, output / "tiers", mean_ious=mean_ious)

    print("[5/5] Summary")
    rows = summary_rows(front.full_precision_bitops, sam_miou, manifest, real3_mious)
    return finish_demo(output, rows, manifest, training, started)
