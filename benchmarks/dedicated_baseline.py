"""The once-for-all promise on the embedded task: is a tier extracted from the supernet as good as a model trained
for its budget alone?

For each training seed: trains a supernet on the embedded SAM as `mpsupernet demo` does (or loads `--supernet`),
searches its Pareto front on the validation split (or reads `--front`), and takes from the front the best
architecture under about 5% and 10% of the full-precision BitOPs. Each of these tier architectures is then trained
alone as a fixed quantized model: a fresh supernet of the embedded SAM with the same configuration (the same LoRA
adapters and quantizers), trained by the same loop on the same data with `fixed_architecture` (no distillation: there
is no larger subnet beside it) for as many optimizer steps as the supernet took (`--dedicated-steps`, default
`--train-steps`: the supernet trained four subnets per step, the dedicated model only its own). Both the tier
extracted from the supernet and the dedicated model, extracted the same way, are measured on the held-out test split;
the difference is reported in mIoU points with its spread over the seeds.

    python benchmarks/dedicated_baseline.py                     # 3 seeds: 3 supernets and 6 dedicated models
    python benchmarks/dedicated_baseline.py --seeds 1 --supernet outputs/benchmarks/quality_bitops/supernet \\
        --front outputs/benchmarks/quality_bitops/pareto_front.json
"""

import argparse
import time
from pathlib import Path


import _common
import _embedded
from mpsupernet import extract_subnet
from mpsupernet.demo import training_arguments
from mpsupernet.metrics import evaluate_dataset_mean_iou
from mpsupernet.training import train_supernet

NAME = "dedicated_baseline"
TIER_SHARES = (0.05, 0.10)
WITHIN_POINTS = 1.0
"""The once-for-all claim checked: a tier within this many mIoU points (of 100) of its dedicated model."""
CONFIG_FIELDS = (
    "resolution_choices",
    "skippable_blocks",
    "mlp_dim_choices",
    "num_heads_choices",
    "hidden_size_choices",
    "weight_bit_choices",
    "activation_bit_choices",
    "bit_granularity",
    "quantized_layers",
    "quantize_attention_products",
    "activation_offset",
    "lora_rank",
    "lora_alpha",
    "lora_mode",
    "mask_decoder_training",
    "progressive_bits_schedule",
)
"""The supernet settings a dedicated model copies, so that it has the same adapters and quantizers."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _embedded.add_task_arguments(parser, NAME)
    _embedded.add_supernet_argument(parser)
    parser.add_argument(
        "--dedicated-steps", type=int, help="Optimizer steps of each dedicated model (default: --train-steps)."
    )
    _embedded.add_search_arguments(parser, front=True)
    args = _embedded.check_seeds(parser, parser.parse_args(argv))
    if args.front is not None and args.supernet is None:
        parser.error("--front belongs to a trained supernet: give --supernet with it.")
    return args


def train_dedicated(supernet, arch, args: argparse.Namespace, splits: dict, output_dir: Path):
    """A fresh supernet of the embedded SAM, configured as `supernet`, trained on `arch` alone."""
    settings = {name: getattr(supernet.config, name) for name in CONFIG_FIELDS}
    dedicated = _embedded.embedded_supernet(args, **settings)
    steps = args.dedicated_steps or args.train_steps
    settings = training_arguments(
        output_dir,
        steps,
        _embedded.training_seed(args),
        fixed_architecture=arch.to_dict(),
        distillation=None,
        logging_steps=max(steps // 10, 1),
    )
    train_supernet(dedicated, splits["train"], args=settings)
    return dedicated.eval()


def measure_seed(args: argparse.Namespace, splits: dict) -> list[dict]:
    """The tiers of one training seed: each tier's and its dedicated model's test mIoU."""
    supernet = _embedded.supernet_from_arguments(args, splits)
    front = _embedded.front_from_arguments(args, supernet, splits)
    full_precision = supernet.bitops_report(supernet.full_precision_subnet()).total_bitops
    rows = []
    for share in TIER_SHARES:
        entry = front.best_under(share * full_precision)
        if entry is None:
            rows.append({"budget_share": share, "architecture": None})
            continue
        arch = entry.to_architecture()
        print(f"  tier <= {100 * share:.0f}%: {entry.bitops / full_precision:.2%} of FP; training it alone")
        tier = extract_subnet(supernet, arch)
        dedicated_supernet = train_dedicated(supernet, arch, args, splits, args.output_dir / f"dedicated_{share}")
        dedicated = extract_subnet(dedicated_supernet, arch)
        tier_miou = evaluate_dataset_mean_iou(tier, splits["test"], seed=args.seed)
        dedicated_miou = evaluate_dataset_mean_iou(dedicated, splits["test"], seed=args.seed)
        rows.append(
            {
                "budget_share": share,
                "architecture": arch.to_dict(),
                "bitops": entry.bitops,
                "share_of_full_precision": entry.bitops / full_precision,
                "tier_test_mean_iou": tier_miou,
                "dedicated_test_mean_iou": dedicated_miou,
                "difference_points": 100 * (tier_miou - dedicated_miou),
            }
        )
    return rows


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = _embedded.make_splits(args)
    per_seed = _embedded.measure_per_seed(args, splits, measure_seed)
    tiers = []
    for index, share in enumerate(TIER_SHARES):
        rows = [rows[index] for rows in per_seed.values() if rows[index]["architecture"] is not None]
        summary = {"budget_share": share, "seeds": len(rows)}
        if rows:
            for key in ("tier_test_mean_iou", "dedicated_test_mean_iou", "difference_points"):
                summary[key] = _embedded.mean_and_std([row[key] for row in rows])
            summary["percent_of_full_precision"] = _embedded.mean_and_std(
                [100 * row["share_of_full_precision"] for row in rows]
            )
            difference = summary["difference_points"]
            summary["within_1_point"] = abs(difference["mean"]) + difference["std"] <= WITHIN_POINTS
        tiers.append(summary)
    return {
        **_embedded.result_header(NAME, args),
        "per_seed": per_seed,
        "tiers": tiers,
        "wall_seconds": time.perf_counter() - started,
    }


def print_results(results: dict) -> None:
    _common.print_header(
        "Dedicated models vs tiers extracted from the supernet (embedded SAM, box-prompt mIoU on the test split)",
        results["machine"],
        {key: results["settings"][key] for key in ("train_steps", "dedicated_steps", "seeds", "num_test")},
    )
    rows = []
    for tier in results["tiers"]:
        if not tier["seeds"]:
            rows.append([f"<= {100 * tier['budget_share']:.0f}%", "no front entry fits", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                f"<= {100 * tier['budget_share']:.0f}%",
                _embedded.format_mean_std(tier["percent_of_full_precision"], 2),
                _embedded.format_mean_std(tier["tier_test_mean_iou"]),
                _embedded.format_mean_std(tier["dedicated_test_mean_iou"]),
                _embedded.format_mean_std(tier["difference_points"], 2),
                "yes" if tier["within_1_point"] else "no",
            ]
        )
    _common.print_table(
        ["tier", "% of FP", "extracted tier mIoU", "dedicated mIoU", "tier - dedicated (points)", "within 1 point"],
        rows,
    )
    print(
        f"'within 1 point' holds where |mean difference| + its standard deviation <= {WITHIN_POINTS}; "
        f"{results['wall_seconds'] / 60:.1f} min"
    )


def main(argv=None) -> None:
    _embedded.run_and_report(NAME, parse_args, run, print_results, argv)


if __name__ == "__main__":
    main()
