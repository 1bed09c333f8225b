"""Quality against BitOPs on the embedded task: the Pareto front, and the best subnet under 5% of full precision.

Trains a supernet on the embedded SAM as `mpsupernet demo` does (or loads one with `--supernet`), searches its Pareto
front of BitOPs against mean IoU with NSGA-II on the validation split, then measures every front architecture, the
fine-tuned full-precision model (the supernet's float subnet) and the pretrained SAM again on a held-out test split.
It prints the front as a table and, for budgets of 3, 5, 10, 15 and 25% of the full-precision BitOPs, the best front
subnet under the budget (chosen on validation) beside the full-precision model (both on test): the paper's headline
is about 95% fewer BitOPs with no loss. With `--seeds N` (default 3) it trains, searches and measures N supernets
(training seeds `--seed` to `--seed + N - 1`, the same data) and reports each budget's figures as mean ± standard
deviation over them.

    python benchmarks/quality_bitops.py                                  # 3 seeds: about 25 min on 2 cores
    python benchmarks/quality_bitops.py --seeds 1 --supernet outputs/demo/supernet  # measures a trained supernet
"""

import argparse
import time


import _common
import _embedded
from mpsupernet import SamSupernetConfig
from mpsupernet.architecture import QUANTIZABLE_LAYERS
from mpsupernet.bitops import count_bitops, format_bitops
from mpsupernet.metrics import evaluate_dataset_mean_iou
from mpsupernet.search_space import SearchSpace

NAME = "quality_bitops"
BUDGET_SHARES = (0.03, 0.05, 0.10, 0.15, 0.25)
HEADLINE_SHARE = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _embedded.add_task_arguments(parser, NAME)
    _embedded.add_supernet_argument(parser)
    _embedded.add_search_arguments(parser)
    return _embedded.check_seeds(parser, parser.parse_args(argv))


def float_convolutions_w8a8_share(supernet) -> float:
    """The uniform W8A8 model's share of full precision with the patch embedding and neck left in float, as before
    they could be quantized: the reference the quantized convolutions are compared with."""
    values = supernet.config.to_dict()
    values["quantized_layers"] = [name for name in supernet.config.quantized_layers if name in QUANTIZABLE_LAYERS]
    config = SamSupernetConfig.from_dict(values)
    space = SearchSpace(config)
    w8a8 = count_bitops(config, space.largest(8, 8)).total_bitops
    return w8a8 / count_bitops(config, space.full_precision()).total_bitops


def measure_seed(args: argparse.Namespace, splits: dict) -> dict:
    """One training seed: its supernet's front (searched on validation) and the best subnets under each budget, with
    the fine-tuned full-precision model, all on the test split."""
    supernet = _embedded.supernet_from_arguments(args, splits)
    front = _embedded.front_from_arguments(args, supernet, splits)
    full_precision_bitops = front.full_precision_bitops
    print(f"Measuring the {len(front)} front architectures and the references on {args.num_test} test images")
    test_miou = [
        evaluate_dataset_mean_iou(supernet, splits["test"], seed=args.seed, subnet=entry.to_architecture())
        for entry in front.entries
    ]
    fine_tuned = evaluate_dataset_mean_iou(
        supernet, splits["test"], seed=args.seed, subnet=supernet.full_precision_subnet()
    )
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
        "full_precision_bitops": full_precision_bitops,
        "w8a8_bitops": front.w8a8_bitops,
        "w8a8_share_with_float_convolutions": float_convolutions_w8a8_share(supernet),
        "evaluated_architectures": len(front.evaluated),
        "test_mean_iou_full_precision_fine_tuned": fine_tuned,
        "front": front_rows,
        "budgets": budgets,
        "pareto_plot": str(args.output_dir / "pareto_front.png"),
    }


def summarize_budgets(per_seed: list[dict]) -> list[dict]:
    """Per budget, over the seeds where a front subnet fits: mean and standard deviation of its figures."""
    summaries = []
    for index, share in enumerate(BUDGET_SHARES):
        found = [seed["budgets"][index]["best"] for seed in per_seed if seed["budgets"][index]["best"] is not None]
        summary = {"budget_share": share, "seeds": len(found)}
        for key in ("share_of_full_precision", "test_mean_iou", "ratio_to_full_precision") if found else ():
            summary[key] = _embedded.mean_and_std([best[key] for best in found])
        summaries.append(summary)
    return summaries


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = _embedded.make_splits(args)
    per_seed = _embedded.measure_per_seed(args, splits, measure_seed)
    pretrained = evaluate_dataset_mean_iou(_embedded.pretrained_sam(args), splits["test"], seed=args.seed)
    first = next(iter(per_seed.values()))
    seeds = list(per_seed.values())
    return {
        **_embedded.result_header(NAME, args),
        "full_precision_bitops": first["full_precision_bitops"],
        "w8a8_bitops": first["w8a8_bitops"],
        "w8a8_share_with_float_convolutions": first["w8a8_share_with_float_convolutions"],
        "test_mean_iou_full_precision_fine_tuned": _embedded.mean_and_std(
            [seed["test_mean_iou_full_precision_fine_tuned"] for seed in seeds]
        ),
        "test_mean_iou_pretrained_sam": pretrained,
        "budgets": summarize_budgets(seeds),
        "per_seed": per_seed,
        "wall_seconds": time.perf_counter() - started,
    }


def print_results(results: dict) -> None:
    _common.print_header(
        "Quality against BitOPs on the embedded task (box-prompt mIoU, image encoder BitOPs per image)",
        results["machine"],
        {
            key: results["settings"][key]
            for key in ("train_steps", "seeds", "num_test", "population_size", "generations")
        },
    )
    full_precision = results["full_precision_bitops"]
    fine_tuned = results["test_mean_iou_full_precision_fine_tuned"]
    print(
        f"full precision: {format_bitops(full_precision)}; uniform W8A8: {format_bitops(results['w8a8_bitops'])} "
        f"({100 * results['w8a8_bitops'] / full_precision:.1f}%; with the patch embedding and neck in float: "
        f"{100 * results['w8a8_share_with_float_convolutions']:.1f}%); test mIoU of the fine-tuned full-precision "
        f"model {_embedded.format_mean_std(fine_tuned)}, of the pretrained SAM "
        f"{results['test_mean_iou_pretrained_sam']:.4f}"
    )
    for seed, measured in results["per_seed"].items():
        evaluated = measured["evaluated_architectures"]
        print(f"\nPareto front of seed {seed} ({evaluated} evaluated; searched on validation, measured on test):")
        _common.print_table(
            ["GBitOPs", "% of FP", "val mIoU", "test mIoU", "test / FP"],
            [
                [
                    f"{row['bitops'] / 1e9:.3f}",
                    100 * row["share_of_full_precision"],
                    row["validation_mean_iou"],
                    row["test_mean_iou"],
                    row["test_mean_iou"] / measured["test_mean_iou_full_precision_fine_tuned"],
                ]
                for row in measured["front"]
            ],
        )
    print("\nBest front subnet under each budget vs the fine-tuned full-precision model (test mIoU, mean ± std):")
    rows = []
    for row in results["budgets"]:
        label = f"<= {100 * row['budget_share']:.0f}%"
        if not row["seeds"]:
            rows.append([label, "-", "none fits", "-", "0"])
            continue
        percent = _embedded.mean_and_std([100 * value for value in row["share_of_full_precision"]["values"]])
        rows.append(
            [
                label,
                _embedded.format_mean_std(percent, 2),
                _embedded.format_mean_std(row["test_mean_iou"]),
                _embedded.format_mean_std(row["ratio_to_full_precision"], 3),
                str(row["seeds"]),
            ]
        )
    _common.print_table(["budget", "% of FP used", "test mIoU", "subnet / FP", "seeds"], rows)
    headline = next(row for row in results["budgets"] if row["budget_share"] == HEADLINE_SHARE)
    if headline["seeds"]:
        print(
            f"headline: {100 * (1 - headline['share_of_full_precision']['mean']):.1f}% fewer BitOPs than full "
            f"precision at {_embedded.format_mean_std(headline['ratio_to_full_precision'], 3)} of its test mIoU "
            "(paper: about 95% fewer, no loss)"
        )
    print(f"{results['wall_seconds'] / 60:.1f} min")


def main(argv=None) -> None:
    _embedded.run_and_report(NAME, parse_args, run, print_results, argv)


if __name__ == "__main__":
    main()
