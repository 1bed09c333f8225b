"""Helpers shared by the quality benchmarks on the embedded task: the data splits, a trained supernet, scoring.

The embedded task is the one `mpsupernet demo` runs: a SAM shipped with the package (the default `embedded-sam`, or
`--sam shapes-sam`, on which the figures of 2026-11-30 in `docs/results.md` were measured), fine-tuned into a supernet
on the synthetic shapes dataset. Every quality benchmark trains the way the demo does
(`mpsupernet.demo.training_arguments`), searches on the validation split, and reports on a test split drawn
from another seed, which neither training nor the search has seen.
"""

import argparse
import copy
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import SamModel, set_seed

import _common
from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.data import make_synthetic_segmentation_dataset, make_synthetic_segmentation_dataset_dict
from mpsupernet.demo import training_arguments
from mpsupernet.metrics import evaluate_dataset_mean_iou
from mpsupernet.pretrained import SHIPPED_SAM_NAMES, load_sam
from mpsupernet.search import ParetoFront, run_search
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
        "--seeds",
        type=int,
        default=3,
        help="Training seeds, from --seed on: each trains its own supernet on the same data splits; figures are "
        "reported as mean and standard deviation over them (default: 3).",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Trainings run at once, each in its own process with an equal share of the CPU threads; seeds and data do "
        "not depend on it. Meant for many-core CPUs: processes sharing one GPU time-slice it (default: 1).",
    )
    parser.set_defaults(train_seed=None)  # set per run by `seed_runs`; training uses --seed without it
    parser.add_argument(
        "--hidden-size-choices",
        type=int,
        nargs="+",
        help="Feature sizes of the supernets trained here (SamSupernetConfig.hidden_size_choices; default: full only).",
    )
    parser.add_argument(
        "--sam",
        help=f"The SAM to fine-tune: one shipped in the package ({', '.join(SHIPPED_SAM_NAMES)}) or a transformers "
        "SamModel folder (default: embedded-sam).",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("outputs/benchmarks") / name, help="Where results and models go."
    )


def make_splits(args: argparse.Namespace) -> dict:
    """`train`, `validation` (the demo's streams of `args.seed`) and `test` (another seed) synthetic splits."""
    splits = make_synthetic_segmentation_dataset_dict(args.num_train, args.num_validation, seed=args.seed)
    test = make_synthetic_segmentation_dataset(args.num_test, seed=args.seed + TEST_SEED_OFFSET)
    return {"train": splits["train"], "validation": splits["validation"], "test": test}


def check_seeds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuses `--seeds` below 1, or above 1 with `--supernet` (one trained supernet is one seed)."""
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}.")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}.")
    if getattr(args, "supernet", None) is not None and args.seeds != 1:
        parser.error("--supernet measures one trained supernet, which is one seed: give --seeds 1 with it.")
    return args


def seed_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One copy of `args` per training seed (`train_seed` = `seed`, `seed + 1`, ...), each writing into its own
    `seed_<n>` folder when there are several. Data splits, prompts and the search keep `seed`: the spread is that of
    training alone."""
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        run = copy.copy(args)
        run.train_seed = seed
        if args.seeds > 1:
            run.output_dir = args.output_dir / f"seed_{seed}"
        runs.append(run)
    return runs


def training_seed(args: argparse.Namespace) -> int:
    """The seed training runs with: the run's `train_seed` (see `seed_runs`), else `--seed`."""
    return args.seed if args.train_seed is None else args.train_seed


def run_jobs(function, calls: list[tuple], jobs: int) -> list:
    """`[function(*call) for call in calls]`, run by `jobs` processes at once when `jobs` > 1.

    Each worker is a fresh (spawned) interpreter with `os.cpu_count() // jobs` torch threads, so that parallel
    trainings do not oversubscribe the cores; `function` must be importable (a module-level function of a benchmark
    script) and `calls` picklable. The results come back in the order of `calls`, and each is what the call computes
    alone: training and evaluation are seeded per call, never by process state.
    """
    if jobs <= 1 or len(calls) <= 1:
        return [function(*call) for call in calls]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(calls)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=torch.set_num_threads,
        initargs=(threads,),
    ) as pool:
        futures = [pool.submit(function, *call) for call in calls]
        return [future.result() for future in futures]


def measure_per_seed(args: argparse.Namespace, splits: dict, measure) -> dict:
    """`measure(run_args, splits)` for each training seed of `seed_runs(args)` (`--jobs` of them at once), keyed by
    the seed as a string (a JSON key)."""
    runs = seed_runs(args)
    print(f"Training seeds {[run.train_seed for run in runs]}, {args.jobs} at a time")
    measured = run_jobs(measure, [(run, splits) for run in runs], args.jobs)
    return {str(run.train_seed): result for run, result in zip(runs, measured)}


def mean_and_std(values: list[float]) -> dict:
    """`{"mean", "std", "values"}`: the sample standard deviation (n - 1), 0 for a single value."""
    values = [float(value) for value in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def format_mean_std(summary: dict, digits: int = 4) -> str:
    """`0.8123 ± 0.0040` (the ± part only with several seeds)."""
    if len(summary["values"]) == 1:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def pretrained_sam(args: argparse.Namespace) -> SamModel:
    """The SAM the benchmark fine-tunes: `--sam` (a shipped SAM's name or a folder), else the embedded SAM."""
    return load_sam(getattr(args, "sam", None) or SHIPPED_SAM_NAMES[0])


def embedded_supernet(args: argparse.Namespace, **overrides) -> SamSupernetForMaskGeneration:
    """A supernet of the benchmark's SAM (`pretrained_sam`) with its search-space options (`--hidden-size-choices`)."""
    if getattr(args, "hidden_size_choices", None):
        overrides.setdefault("hidden_size_choices", args.hidden_size_choices)
    sam = pretrained_sam(args)
    # The adapters start from torch's global generator, which torch seeds at random in every process: seeding it
    # makes a training seed one supernet, whichever benchmark and process trains it.
    set_seed(training_seed(args))
    return SamSupernetForMaskGeneration.from_sam(sam, **overrides)


def train_embedded_supernet(
    args: argparse.Namespace, splits: dict, output_dir: Path, supernet: SamSupernetForMaskGeneration | None = None
) -> tuple[SamSupernetForMaskGeneration, float]:
    """Trains `supernet` (by default one built from the embedded SAM) on the training split as the demo does.

    Returns the trained supernet (in eval mode, saved in `output_dir`) and the training time in seconds.
    """
    if supernet is None:
        supernet = embedded_supernet(args)
    started = time.perf_counter()
    settings = training_arguments(
        output_dir, args.train_steps, training_seed(args), logging_steps=max(args.train_steps // 10, 1)
    )
    train_supernet(supernet, splits["train"], args=settings)
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


def result_header(name: str, args: argparse.Namespace) -> dict:
    """The first keys of every quality benchmark's results: its name, the machine and the command-line settings."""
    return {
        "benchmark": name,
        "machine": _common.machine_info(torch.device("cpu")),
        "settings": _common.settings_of(args),
    }


def run_and_report(name: str, parse_args, run, print_results, argv=None) -> None:
    """A quality benchmark's `main`: parses `argv`, runs, prints the results and writes `<output-dir>/<name>.json`."""
    args = parse_args(argv)
    results = run(args)
    print_results(results)
    _common.write_json(args.output_dir / f"{name}.json", results)


def add_search_arguments(parser: argparse.ArgumentParser, front: bool = False) -> None:
    """The NSGA-II flags (and, with `front`, `--front`: a saved front of `--supernet` instead of searching)."""
    parser.add_argument("--population-size", type=int, default=16, help="NSGA-II population (default: 16).")
    parser.add_argument("--generations", type=int, default=8, help="NSGA-II generations (default: 8).")
    if front:
        parser.add_argument("--front", type=Path, help="A saved pareto_front.json of --supernet; searched if absent.")


def front_from_arguments(args: argparse.Namespace, supernet, splits: dict) -> ParetoFront:
    """`--front` loaded, or the front of `supernet` searched now on the validation split (written to `output_dir`)."""
    if getattr(args, "front", None) is not None:
        return ParetoFront.load(args.front)
    print(f"Searching: NSGA-II, population {args.population_size}, {args.generations} generations, validation split")
    return run_search(
        supernet,
        splits["validation"],
        output_dir=args.output_dir,
        population_size=args.population_size,
        generations=args.generations,
        seed=args.seed,
        dataset_name="mpsupernet synthetic shapes (validation)",
        progress=False,
    )
