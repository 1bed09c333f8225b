"""Quality against BitOPs on the embedded task: the Pareto front, and the best subnet under 5% of full precision.

Trains a supernet on the embedded SAM as `mpsupernet demo` does (or loads one with `--supernet`), searches its Pareto
front of BitOPs against mean IoU with NSGA-II on the validation split, then measures every front architecture, the
fine-tuned full-precision model (the supernet's float subnet) and the pretrained SAM again on a held-out test split.
It prints the front as a table and, for budgets of 5, 10, 15 and 25% of the full-precision BitOPs, the best front
subnet under the budget (chosen on validation) beside the full-precision model (both on test): the paper's headline
is about 95% fewer BitOPs with no loss.

    python benchmarks/quality_bitops.py                                  # trains first: about 8 min on 2 cores
    python benchmarks/quality_bitops.py --supernet outputs/demo/supernet # measures a trained supernet
"""

import argparse
import time

import torch

import _common
import _embedded
from mpsupernet.bitops import format_bitops
from mpsupernet.evaluation import evaluate_dataset_mean_iou
from mpsupernet.pretrained import load_embedded_sam
from mpsupernet.search import run_search

NAME = "quality_bitops"
BUDGET_SHARES = (0.05, 0.10, 0.15, 0.25)
HEADLINE_SHARE = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _embedded.add_task_arguments(parser, NAME)
    _embedded.add_supernet_argument(parser)
    parser.add_argument("--population-size", type=int, default=16, help="NSGA-II population (default: 16).")
    parser.add_argument("--generations", type=int, default=8, help="NSGA-II generations (default: 8).")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = _embedded.make_splits(args)
    supernet = _embedded.supernet_from_arguments(args, splits)
    print(f"Searching: NSGA-II, population {args.population_size}, {args.generations} generations, validation split")
    front = run_search(
        supernet,
        splits["validation"],
        output_dir=args.output_dir,
        population_size=args.population_size,
        generations=args.generations,
        seed=args.seed,
        dataset_name="mpsupernet synthetic shapes (validation)",
    )
    full_precision_bitops = front.full_precision_bitops
    print(f"Measuring the {len(front)} front architectures and the references on {args.num_test} test images")
    test_miou = [
        _embedded.subnet_mean_iou(supernet, entry.to_architecture(), splits["test"], args.seed)
        for entry in front.entries
    ]
    fine_tuned = _embedded.subnet_mean_iou(supernet, supernet.full_precision_subnet(), splits["test"], args.seed)
    pretrained = evaluate_dataset_mean_iou(load_embedded_sam(), splits["test"], seed=args.seed)

    front_rows = [
        {
            "bitops": entry.bitops,
            "share_of_full_precision": entry.bitops / full_precision_bitops,
            "validation_mean_iou": entry.mean_iou,
            "test_mean_iou": miou,
            "architecture": entry.architecture,
        }
        for entry, miou in zip(front.entries, test_miou)
    ]
    budgets = []
    for share in BUDGET_SHARES:
        best = front.best_under(share * full_precision_bitops)
        row = next(r for r in front_rows if r["architecture"] == best.architecture) if best else None
        summary = None
        if row is not None:
            summary = {key: row[key] for key in ("bitops", "share_of_full_precision", "test_mean_iou")}
            summary["ratio_to_full_precision"] = row["test_mean_iou"] / fine_tuned
        budgets.append({"budget_share": share, "best": summary})
    return {
        "benchmark": NAME,
        "machine": _common.machine_info(torch.device("cpu")),
        "settings": _common.settings_of(args),
        "full_precision_bitops": full_precision_bitops,
        "w8a8_bitops": front.w8a8_bitops,
        "evaluated_architectures": len(front.evaluated),
        "test_mean_iou_full_precision_fine_tuned": fine_tuned,
        "test_mean_iou_pretrained_sam": pretrained,
        "front": front_rows,
        "budgets": budgets,
        "pareto_plot": str(args.output_dir / "pareto_front.png"),
        "wall_seconds": time.perf_counter() - started,
    }


def print_results(results: dict) -> None:
    _common.print_header(
        "Quality against BitOPs on the embedded task (box-prompt mIoU, image encoder BitOPs per image)",
        results["machine"],
        {key: results["settings"][key] for key in ("train_steps", "num_test", "population_size", "generations")},
    )
    full_precision = results["full_precision_bitops"]
    print(
        f"full precision: {format_bitops(full_precision)}; uniform W8A8: {format_bitops(results['w8a8_bitops'])} "
        f"({100 * results['w8a8_bitops'] / full_precision:.1f}%); {results['evaluated_architectures']} architectures "
        f"evaluated; test mIoU of the fine-tuned full-precision model "
        f"{results['test_mean_iou_full_precision_fine_tuned']:.4f}, of the pretrained SAM "
        f"{results['test_mean_iou_pretrained_sam']:.4f}"
    )
    print("\nPareto front (searched on validation, measured on test):")
    _common.print_table(
        ["GBitOPs", "% of FP", "val mIoU", "test mIoU", "test / FP"],
        [
            [
                f"{row['bitops'] / 1e9:.3f}",
                100 * row["share_of_full_precision"],
                row["validation_mean_iou"],
                row["test_mean_iou"],
                row["test_mean_iou"] / results["test_mean_iou_full_precision_fine_tuned"],
            ]
            for row in results["front"]
        ],
    )
    print("\nBest front subnet under each budget vs the fine-tuned full-precision model (test mIoU):")
    _common.print_table(
        ["budget", "% of FP used", "test mIoU", "subnet / FP"],
        [
            [f"<= {100 * row['budget_share']:.0f}%", "-", "none fits", "-"]
            if row["best"] is None
            else [
                f"<= {100 * row['budget_share']:.0f}%",
                100 * row["best"]["share_of_full_precision"],
                row["best"]["test_mean_iou"],
                row["best"]["ratio_to_full_precision"],
            ]
            for row in results["budgets"]
        ],
    )
    headline = next(row["best"] for row in results["budgets"] if row["budget_share"] == HEADLINE_SHARE)
    if headline is not None:
        print(
            f"headline: {100 * (1 - headline['share_of_full_precision']):.1f}% fewer BitOPs than full precision at "
            f"{headline['ratio_to_full_precision']:.3f} of its test mIoU (paper: about 95% fewer, no loss)"
        )
    print(f"Pareto plot: {results['pareto_plot']}; {results['wall_seconds'] / 60:.1f} min")


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    print_results(results)
    _common.write_json(args.output_dir / f"{NAME}.json", results)


if __name__ == "__main__":
    main()
