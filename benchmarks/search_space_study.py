"""The search-space study of the paper on the embedded task: each elastic operator varied alone, mIoU vs BitOPs.

Starting from the fine-tuned full-precision model (the supernet's float subnet), one operator at a time takes each
of its values while everything else stays full size and float: input resolution, depth (blocks dropped in the
config's order), MLP width, attention heads, feature size (the embedding width, when the supernet has several),
weight bits (activations float) and activation bits (weights float), the bit-widths uniform over the quantized
layers (the patch embedding and neck included). Each point is the BitOPs reduction against full precision and the
box-prompt mean IoU on the held-out test split, as mean ± standard deviation over `--seeds` training seeds (default
3; the supernets it trains itself have feature sizes 96/72/48). It prints the table and draws one curve per operator.

    python benchmarks/search_space_study.py                                  # trains 3 supernets: about 15 min
    python benchmarks/search_space_study.py --seeds 1 --supernet outputs/demo/supernet  # studies a trained supernet
"""

import argparse
import dataclasses
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

import _common  # noqa: E402
import _embedded  # noqa: E402
from mpsupernet.metrics import evaluate_dataset_mean_iou  # noqa: E402

NAME = "search_space_study"
FEATURE_SIZES = [96, 72, 48]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _embedded.add_task_arguments(parser, NAME)
    _embedded.add_supernet_argument(parser)
    # The study compares every operator, the feature size included: 100%, 75% and 50% of the embedded SAM's 96.
    parser.set_defaults(hidden_size_choices=FEATURE_SIZES)
    return _embedded.check_seeds(parser, parser.parse_args(argv))


def operator_variations(supernet) -> dict[str, list[tuple[str, object]]]:
    """Operator name → `(value label, architecture)` for each of its values, the rest of the model full precision.

    The feature size is an operator when the supernet was built with several (`hidden_size_choices`).
    """
    space = supernet.search_space
    reference = space.full_precision()
    blocks, layers = reference.num_blocks, len(reference.layer_names)

    def vary(**changes):
        return space.canonical(dataclasses.replace(reference, **changes))

    variations = {
        "resolution": [(f"{r} px", vary(resolution=r)) for r in space.resolution_choices],
        "depth": [(f"{d} blocks", vary(skipped_blocks=space.skipped_blocks(d))) for d in space.depth_choices],
        "MLP width": [(f"{m} units", vary(mlp_dims=(m,) * blocks)) for m in space.mlp_dim_choices],
        "heads": [(f"{h} heads", vary(num_heads=(h,) * blocks)) for h in space.num_heads_choices],
        "feature size": [(f"{h} channels", vary(hidden_size=h)) for h in space.hidden_size_choices],
        "weight bits": [(f"W{b}", vary(weight_bits=(b,) * layers)) for b in space.weight_bit_choices],
        "activation bits": [(f"A{b}", vary(activation_bits=(b,) * layers)) for b in space.activation_bit_choices],
    }
    if len(space.hidden_size_choices) == 1:
        del variations["feature size"]
    return variations


def measure_seed(args: argparse.Namespace, splits: dict) -> tuple[float, int, list[dict]]:
    """One training seed: the full-precision model's test mIoU and BitOPs, and every single-operator subnet's."""
    supernet = _embedded.supernet_from_arguments(args, splits)
    reference = supernet.search_space.full_precision()
    full_precision_bitops = supernet.bitops_report(reference).total_bitops
    full_precision_miou = evaluate_dataset_mean_iou(supernet, splits["test"], seed=args.seed, subnet=reference)
    rows = []
    variations = operator_variations(supernet)
    print(f"Measuring {sum(map(len, variations.values()))} single-operator subnets on {args.num_test} test images")
    for operator, values in variations.items():
        for label, arch in values:
            bitops = supernet.bitops_report(arch).total_bitops
            miou = evaluate_dataset_mean_iou(supernet, splits["test"], seed=args.seed, subnet=arch)
            rows.append(
                {
                    "operator": operator,
                    "value": label,
                    "bitops": bitops,
                    "bitops_reduction": 1 - bitops / full_precision_bitops,
                    "test_mean_iou": miou,
                    "mean_iou_change": miou - full_precision_miou,
                }
            )
    return full_precision_miou, full_precision_bitops, rows


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = _embedded.make_splits(args)
    per_seed = list(_embedded.measure_per_seed(args, splits, measure_seed).values())
    full_precision_bitops = per_seed[0][1]
    rows = []
    for position, row in enumerate(per_seed[0][2]):
        measured = [seed_rows[position] for _, _, seed_rows in per_seed]
        rows.append(
            {
                **{key: row[key] for key in ("operator", "value", "bitops", "bitops_reduction")},
                "test_mean_iou": _embedded.mean_and_std([m["test_mean_iou"] for m in measured]),
                "mean_iou_change": _embedded.mean_and_std([m["mean_iou_change"] for m in measured]),
            }
        )
    full_precision_miou = _embedded.mean_and_std([miou for miou, _, _ in per_seed])
    return {
        **_embedded.result_header(NAME, args),
        "full_precision_bitops": full_precision_bitops,
        "test_mean_iou_full_precision": full_precision_miou,
        "rows": rows,
        "plot": str(plot(rows, full_precision_miou["mean"], args.output_dir / f"{NAME}.png")),
        "wall_seconds": time.perf_counter() - started,
    }


def plot(rows: list[dict], full_precision_miou: float, path: Path) -> Path:
    """One curve per operator: mean IoU (mean over seeds, bars one standard deviation) against the share of BitOPs
    removed, the full-precision model dashed."""
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for operator in dict.fromkeys(row["operator"] for row in rows):
        points = sorted(
            (100 * r["bitops_reduction"], r["test_mean_iou"]["mean"], r["test_mean_iou"]["std"], r["value"])
            for r in rows
            if r["operator"] == operator
        )
        line = axes.errorbar(
            [p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=2,
            label=operator,
        )[0]  # fmt: skip
        for x, y, _, label in points:
            if x > 0:  # the full-size value of a dimension is the full-precision model itself, labelled by the line
                axes.annotate(
                    label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=line.get_color()
                )
    axes.axhline(full_precision_miou, color="grey", linestyle="--", linewidth=1, label="full precision")
    axes.set_xlabel("BitOPs reduction vs full precision (%)")
    axes.set_ylabel("mean IoU (box prompts, test split)")
    axes.set_title("Each operator varied alone (embedded SAM)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def print_results(results: dict) -> None:
    _common.print_header(
        "Search-space study: each operator alone (embedded SAM, box-prompt mIoU on the test split)",
        results["machine"],
        {key: results["settings"][key] for key in ("train_steps", "seeds", "num_test", "supernet")},
    )
    print(
        f"full precision: {results['full_precision_bitops'] / 1e9:.3f} GBitOPs, "
        f"mIoU {_embedded.format_mean_std(results['test_mean_iou_full_precision'])}"
    )
    _common.print_table(
        ["operator", "value", "GBitOPs", "BitOPs reduction %", "mIoU", "mIoU change"],
        [
            [
                r["operator"],
                r["value"],
                r["bitops"] / 1e9,
                100 * r["bitops_reduction"],
                _embedded.format_mean_std(r["test_mean_iou"]),
                _embedded.format_mean_std(r["mean_iou_change"]),
            ]
            for r in results["rows"]
        ],
    )
    print(f"plot: {results['plot']}; {results['wall_seconds'] / 60:.1f} min")


def main(argv=None) -> None:
    _embedded.run_and_report(NAME, parse_args, run, print_results, argv)


if __name__ == "__main__":
    main()
