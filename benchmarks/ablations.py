"""Ablations on the embedded task: LoRA modes and progressive bit-widths, judged on the lowest-bit subnets.

Trains one supernet per variant from the embedded SAM, all with the same data, steps, seeds and sampling, and
measures on the held-out test split the subnets that suffer most from quantization: the full-size model at W2A4,
W3A4 and W4A4 and the smallest subnet (lowest resolution, depth and width at W2A4), with the largest (W8A8) and the
full-precision subnet for context.

- `shared`, `multiplex`, `multipath` (progressive bit-widths, the default schedule): one adapter for every
  bit-width; one per weight bit-width; a shared one plus one per bit-width (`SamSupernetConfig.lora_mode`).
- `multiplex, all bits at once`: multiplex adapters with every bit-width sampled from the first step, against the
  progressive schedule that enables 8/6/4 bits first, then 3, then 2.

Every figure is the mean ± standard deviation over `--seeds` training seeds (default 3), on the same data.

    python benchmarks/ablations.py                               # 4 variants x 3 seeds: about 60 min on 2 cores
    python benchmarks/ablations.py --variants shared multiplex   # a subset
    python benchmarks/ablations.py --jobs 12                     # all 12 trainings at once (16 cores, or a GPU)
"""

import argparse
import time


import _common
import _embedded
from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.metrics import evaluate_dataset_mean_iou

NAME = "ablations"
VARIANTS = {
    "shared": {"lora_mode": "shared"},
    "multiplex": {"lora_mode": "multiplex"},
    "multipath": {"lora_mode": "multipath"},
    "multiplex-all-bits": {"lora_mode": "multiplex", "progressive_bits": False},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _embedded.add_task_arguments(parser, NAME)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="Variants to train (default: all).",
    )
    return _embedded.check_seeds(parser, parser.parse_args(argv))


def build_variant(variant: str, args: argparse.Namespace) -> SamSupernetForMaskGeneration:
    """The embedded SAM's supernet in the configuration of `variant`."""
    settings = VARIANTS[variant]
    supernet = _embedded.embedded_supernet(args, lora_mode=settings["lora_mode"])
    if not settings.get("progressive_bits", True):
        config = supernet.config
        every_bit_width = sorted(set(config.weight_bit_choices) | set(config.activation_bit_choices), reverse=True)
        config.progressive_bits_schedule = [[0.0, every_bit_width]]
    return supernet


def probe_subnets(supernet) -> dict:
    """The subnets every variant is judged on, by name."""
    space = supernet.search_space
    low_activation = min(space.activation_bit_choices)
    return {
        "full precision": space.full_precision(),
        "largest W8A8": space.largest(),
        **{f"full size W{w}A{low_activation}": space.largest(w, low_activation) for w in (4, 3, 2)},
        f"smallest W2A{low_activation}": space.smallest(),
    }


def measure_variant(variant: str, run_args: argparse.Namespace, splits: dict) -> dict:
    """Trains `variant` with one training seed and measures its probe subnets on the test split."""
    supernet = build_variant(variant, run_args)
    schedule = supernet.config.progressive_bits_schedule
    print(f"{variant}, seed {run_args.train_seed}: bit-width schedule {schedule}, {run_args.train_steps} steps")
    output_dir = run_args.output_dir / variant
    supernet, training_seconds = _embedded.train_embedded_supernet(run_args, splits, output_dir, supernet)
    return {
        "lora_mode": supernet.config.lora_mode,
        "progressive_bits_schedule": schedule,
        "training_seconds": training_seconds,
        "trainable_parameters": sum(p.numel() for p in supernet.parameters() if p.requires_grad),
        "test_mean_iou": {
            name: evaluate_dataset_mean_iou(supernet, splits["test"], seed=run_args.seed, subnet=arch)
            for name, arch in probe_subnets(supernet).items()
        },
    }


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = _embedded.make_splits(args)
    runs = _embedded.seed_runs(args)
    calls = [(variant, run_args, splits) for variant in args.variants for run_args in runs]
    print(f"{len(args.variants)} variants x {len(runs)} seeds, {args.jobs} trainings at a time")
    measured = _embedded.run_jobs(measure_variant, calls, args.jobs)
    results = {}
    for number, variant in enumerate(args.variants):
        seeds = measured[number * len(runs) : (number + 1) * len(runs)]
        results[variant] = {
            "lora_mode": seeds[0]["lora_mode"],
            "progressive_bits_schedule": seeds[0]["progressive_bits_schedule"],
            "training_seconds": _embedded.mean_and_std([seed["training_seconds"] for seed in seeds]),
            "trainable_parameters": seeds[0]["trainable_parameters"],
            "test_mean_iou": {
                name: _embedded.mean_and_std([seed["test_mean_iou"][name] for seed in seeds])
                for name in seeds[0]["test_mean_iou"]
            },
        }
    return {
        **_embedded.result_header(NAME, args),
        "variants": results,
        "wall_seconds": time.perf_counter() - started,
    }


def print_results(results: dict) -> None:
    _common.print_header(
        "Ablations: LoRA modes and progressive bit-widths (embedded SAM, box-prompt mIoU on the test split)",
        results["machine"],
        {key: results["settings"][key] for key in ("train_steps", "num_train", "num_test", "seed", "seeds")},
    )
    variants = results["variants"]
    subnets = list(next(iter(variants.values()))["test_mean_iou"])
    _common.print_table(
        ["variant", "trainable", "train min", *subnets],
        [
            [
                name,
                f"{v['trainable_parameters'] / 1e3:.0f}k",
                v["training_seconds"]["mean"] / 60,
                *(_embedded.format_mean_std(v["test_mean_iou"][subnet]) for subnet in subnets),
            ]
            for name, v in variants.items()
        ],
    )
    print(f"mIoU: mean ± standard deviation over training seeds; {results['wall_seconds'] / 60:.1f} min")


def main(argv=None) -> None:
    _embedded.run_and_report(NAME, parse_args, run, print_results, argv)


if __name__ == "__main__":
    main()
