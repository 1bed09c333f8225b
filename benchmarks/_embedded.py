"""Helpers shared by the quality benchmarks on the embedded task: the data splits, a trained supernet, scoring.

The embedded task is the one `mpsupernet demo` runs: the 0.95M-parameter SAM shipped with the package, fine-tuned
into a supernet on the synthetic shapes dataset. Every quality benchmark trains the way the demo does
(`mpsupernet.demo.LEARNING_RATE`, `BATCH_SIZE`), searches on the validation split, and reports on a test split drawn
from another seed, which neither training nor the search has seen.
"""

import argparse
import time
from pathlib import Path

from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.data import make_synthetic_segmentation_dataset, make_synthetic_segmentation_dataset_dict
from mpsupernet.demo import BATCH_SIZE, LEARNING_RATE
from mpsupernet.evaluation import evaluate_dataset_mean_iou
from mpsupernet.pretrained import load_embedded_sam
from mpsupernet.training import train_supernet

TEST_SEED_OFFSET = 1000
"""The test split is drawn with `seed + TEST_SEED_OFFSET`: other images than training's and validation's."""


def add_task_arguments(parser: argparse.ArgumentParser, name: str, train_steps: int = 600) -> None:
    """The flags every quality benchmark shares: data sizes, training length, seed, output folder."""
    parser.add_argument(
        "--train-steps", type=int, default=train_steps, help=f"Sandwich steps (default: {train_steps})."
    )
    parser.add_argument("--num-train", type=int, default=256, help="Synthetic training images (default: 256).")
    parser.add_argument("--num-validation", type=int, default=64, help="Validation images (default: 64).")
    parser.add_argument("--num-test", type=int, default=128, help="Held-out test images (default: 128).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data, prompts, sampling and search.")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("outputs/benchmarks") / name, help="Where results and models go."
    )


def make_splits(args: argparse.Namespace) -> dict:
    """`train`, `validation` (the demo's streams of `args.seed`) and `test` (another seed) synthetic splits."""
    splits = make_synthetic_segmentation_dataset_dict(args.num_train, args.num_validation, seed=args.seed)
    test = make_synthetic_segmentation_dataset(args.num_test, seed=args.seed + TEST_SEED_OFFSET)
    return {"train": splits["train"], "validation": splits["validation"], "test": test}


def train_embedded_supernet(
    args: argparse.Namespace, splits: dict, output_dir: Path, supernet: SamSupernetForMaskGeneration | None = None
) -> tuple[SamSupernetForMaskGeneration, float]:
    """Trains `supernet` (by default one built from the embedded SAM) on the training split as the demo does.

    Returns the trained supernet (in eval mode, saved in `output_dir`) and the training time in seconds.
    """
    if supernet is None:
        supernet = SamSupernetForMaskGeneration.from_sam(load_embedded_sam())
    started = time.perf_counter()
    train_supernet(
        supernet,
        splits["train"],
        output_dir=output_dir,
        max_steps=args.train_steps,
        learning_rate=LEARNING_RATE,
        batch_size=BATCH_SIZE,
        seed=args.seed,
        log_steps=max(args.train_steps // 10, 1),
    )
    return supernet.eval(), time.perf_counter() - started


def supernet_from_arguments(args: argparse.Namespace, splits: dict) -> SamSupernetForMaskGeneration:
    """`--supernet` loaded, or a supernet trained now into `<output-dir>/supernet` (the default configuration)."""
    if args.supernet is not None:
        print(f"Loading the trained supernet from {args.supernet}")
        return SamSupernetForMaskGeneration.from_pretrained(args.supernet).eval()
    print(f"Training a supernet on the embedded SAM: {args.train_steps} sandwich steps, {args.num_train} images")
    supernet, seconds = train_embedded_supernet(args, splits, args.output_dir / "supernet")
    print(f"Trained in {seconds / 60:.1f} min; saved in {args.output_dir / 'supernet'}")
    return supernet


def add_supernet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--supernet",
        type=Path,
        help="A trained supernet folder to measure (e.g. outputs/demo/supernet); by default one is trained first.",
    )


def subnet_mean_iou(supernet: SamSupernetForMaskGeneration, arch, dataset, seed: int) -> float:
    """Box-prompt mean IoU of one architecture of `supernet` on `dataset`."""
    supernet.set_subnet(arch)
    return evaluate_dataset_mean_iou(supernet, dataset, seed=seed)
