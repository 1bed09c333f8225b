"""Does the supernet rank subnets right? Kendall's tau of inherited against stand-alone fine-tuned mIoU.

Takes architectures from the Pareto front of a trained supernet on the embedded task (searched here, or read with
`--front`), spread evenly over its BitOPs range; measures each one's mIoU with the supernet's weights ("inherited"),
then fine-tunes each alone for `--fine-tune-steps` steps from the supernet's weights (the same adapters, quantizers,
loss and data; `train_supernet` with `fixed_architecture`) and measures it again. Both on the held-out test split.
Kendall's tau of the two orders (`_ranking.ranking_correlation`, scipy's tau-b) says whether the
one-shot search ranks architectures as stand-alone training would (1: the same order).

    python benchmarks/ranking.py --supernet outputs/benchmarks/quality_bitops/supernet \\
        --front outputs/benchmarks/quality_bitops/pareto_front.json       # 8 fine-tunes of 100 steps
    python benchmarks/ranking.py                                          # trains and searches first
"""

import argparse
import time

import numpy as np

import _common
import _embedded
from _ranking import ranking_correlation
from mpsupernet.demo import BATCH_SIZE, LEARNING_RATE
from mpsupernet.search import ParetoFront

NAME = "ranking"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _embedded.add_task_arguments(parser, NAME)
    _embedded.add_supernet_argument(parser)
    parser.add_argument("--num-architectures", type=int, default=8, help="Architectures ranked (default: 8).")
    parser.add_argument("--fine-tune-steps", type=int, default=100, help="Steps of each fine-tune (default: 100).")
    _embedded.add_search_arguments(parser, front=True)
    parser.set_defaults(seeds=1)  # the architectures of one trained supernet are ranked
    args = _embedded.check_seeds(parser, parser.parse_args(argv))
    if args.num_architectures < 2:
        parser.error("--num-architectures must be at least 2: a ranking needs two architectures.")
    return args


def spread_architectures(front: ParetoFront, count: int) -> list:
    """`count` architectures spread evenly over the front's BitOPs range, topped up from the other evaluated
    architectures (also spread by BitOPs) when the front has fewer."""
    entries = list(front.entries)
    if len(entries) < count:
        on_front = {entry.to_architecture() for entry in entries}
        others = sorted(
            (entry for entry in front.evaluated if entry.to_architecture() not in on_front), key=lambda e: e.bitops
        )
        picks = np.linspace(0, len(others) - 1, num=min(count - len(entries), len(others))).round().astype(int)
        entries += [others[index] for index in dict.fromkeys(picks.tolist())]
    else:
        picks = np.linspace(0, len(entries) - 1, num=count).round().astype(int)
        entries = [entries[index] for index in dict.fromkeys(picks.tolist())]
    return [entry.to_architecture() for entry in sorted(entries, key=lambda entry: entry.bitops)]


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = _embedded.make_splits(args)
    supernet = _embedded.supernet_from_arguments(args, splits)
    front = _embedded.front_from_arguments(args, supernet, splits)
    archs = spread_architectures(front, args.num_architectures)
    print(f"Ranking {len(archs)} architectures: {args.fine_tune_steps} fine-tuning steps each, test split")
    result = ranking_correlation(
        supernet,
        archs,
        splits["train"],
        splits["test"],
        fine_tune_steps=args.fine_tune_steps,
        learning_rate=LEARNING_RATE,
        batch_size=BATCH_SIZE,
        seed=args.seed,
        output_dir=args.output_dir / "fine_tuned",
    )
    return {
        **_embedded.result_header(NAME, args),
        "full_precision_bitops": supernet.bitops_report(supernet.full_precision_subnet()).total_bitops,
        **result.to_dict(),
        "wall_seconds": time.perf_counter() - started,
    }


def print_results(results: dict) -> None:
    _common.print_header(
        "Ranking: inherited vs stand-alone fine-tuned mIoU (embedded SAM, test split)",
        results["machine"],
        {key: results["settings"][key] for key in ("train_steps", "fine_tune_steps", "num_test", "supernet")},
    )
    rows = [
        [f"{bitops / 1e9:.3f}", 100 * bitops / results["full_precision_bitops"], inherited, standalone]
        for bitops, inherited, standalone in zip(
            results["bitops"], results["inherited_mean_iou"], results["standalone_mean_iou"]
        )
    ]
    _common.print_table(["GBitOPs", "% of FP", "inherited mIoU", "stand-alone mIoU"], rows)
    print(
        f"Kendall's tau over {len(rows)} architectures: {results['kendall_tau']:.3f} (p = {results['p_value']:.3g}); "
        f"{results['wall_seconds'] / 60:.1f} min"
    )


def main(argv=None) -> None:
    _embedded.run_and_report(NAME, parse_args, run, print_results, argv)


if __name__ == "__main__":
    main()
