"""The supernet against the plain route a user would otherwise take: a float fine-tune quantized after training.

Per training seed, on the embedded task (the demo's data, learning rate, batch and steps):
- the plain route: the same SAM, adapters and mask decoder trained in float alone (the full-precision architecture
  at every step, no distillation) for as many optimizer steps as the supernet, its image encoder exported to ONNX and
  quantized with onnxruntime's `quantize_static` at W8A8 and W4A8 (QDQ, per-channel weights; MinMax, entropy and
  percentile calibration on 64 training images, the best chosen on the validation split), its BitOPs priced by the
  package's counter from what each graph quantizes (`_ptq.ptq_architecture`);
- the supernet (trained as `mpsupernet demo` does, or `--supernet`): its full-precision subnet, its uniform subnets
  W8..W2 × A8/A4 (the diagnosis: the same bits as the plain route's PTQ where onnxruntime offers them), and the best
  subnet of its searched front (`--front`, or searched now on validation) under each PTQ model's BitOPs and under 2%
  and 1% of full precision.
Everything is measured on the held-out test split; the float fine-tune is the honest full-precision reference (issue
19): the supernet's float subnet is never trained in float by the sandwich (its largest subnet is W8A8).

    python benchmarks/ptq_baseline.py --seeds 3                       # about 25 min per seed on 2 idle cores
    python benchmarks/ptq_baseline.py --seeds 1 --supernet outputs/demo/supernet --front outputs/demo/pareto_front.json
"""

import argparse
import tempfile
import time
from pathlib import Path

import _common
import _embedded
import _ptq
from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.bitops import BitOpsCounter
from mpsupernet.demo import training_arguments
from mpsupernet.metrics import evaluate_dataset_mean_iou
from mpsupernet.training import train_supernet

NAME = "ptq_baseline"
UNIFORM_BITS = ((8, 8), (6, 8), (4, 8), (3, 8), (2, 8), (8, 4), (4, 4), (2, 4))
LOW_SHARES = (0.02, 0.01)
CALIBRATION_IMAGES = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _embedded.add_task_arguments(parser, NAME, train_steps=400)
    _embedded.add_supernet_argument(parser)
    _embedded.add_search_arguments(parser, front=True)
    return _embedded.check_seeds(parser, parser.parse_args(argv))


def train_float(args: argparse.Namespace, splits: dict, output_dir: Path) -> tuple[SamSupernetForMaskGeneration, float]:
    """The plain route's float fine-tune: a supernet of the same SAM trained on its full-precision architecture alone."""
    model = _embedded.embedded_supernet(args)
    started = time.perf_counter()
    settings = training_arguments(
        output_dir,
        max_steps=args.train_steps,
        seed=_embedded.training_seed(args),
        fixed_architecture=model.search_space.full_precision().to_dict(),
        distillation=None,
        logging_steps=max(args.train_steps // 10, 1),
    )
    train_supernet(model, splits["train"], args=settings)
    return model.eval(), time.perf_counter() - started


def plain_route(args: argparse.Namespace, splits: dict, counter: BitOpsCounter) -> dict:
    """The float fine-tune and its best `quantize_static` model at each weight bit-width, on test."""
    model, seconds = train_float(args, splits, args.output_dir / "float_fine_tune")
    float_subnet = model.extract_subnet(model.search_space.full_precision())
    full = counter.bitops(model.search_space.full_precision())
    directory = Path(tempfile.mkdtemp(prefix="ptq-", dir=args.output_dir))
    float_path = _ptq.export_float_encoder(float_subnet, directory)
    nodes = _ptq.layer_nodes(float_path, float_subnet, model.config)
    reader = _ptq.PixelValuesReader(
        splits["train"], model.config, _ptq.session(float_path).get_inputs()[0].name, CALIBRATION_IMAGES
    )
    routes = {}
    for bits in _ptq.WEIGHT_TYPES:
        tried = []
        for method in _ptq.CALIBRATION_METHODS:
            path = _ptq.quantize_encoder(float_path, directory / f"w{bits}a8_{method}.onnx", reader, bits, method)
            runner = _ptq.OnnxEncoderSam(float_subnet, path)
            validation = evaluate_dataset_mean_iou(runner, splits["validation"], seed=args.seed)
            tried.append((validation, method, path, runner))
        validation, method, path, runner = max(tried, key=lambda entry: entry[0])
        arch = _ptq.ptq_architecture(path, model.config, nodes)
        routes[f"W{bits}A8"] = {
            "calibration": method,
            "validation_mean_iou": {entry[1]: entry[0] for entry in tried},
            "share_of_full_precision": counter.bitops(arch) / full,
            "test_mean_iou": evaluate_dataset_mean_iou(runner, splits["test"], seed=args.seed),
        }
    return {
        "training_seconds": seconds,
        "optimizer_steps": args.train_steps,
        "test_mean_iou_float": evaluate_dataset_mean_iou(float_subnet, splits["test"], seed=args.seed),
        "ptq": routes,
    }


def measure_seed(args: argparse.Namespace, splits: dict) -> dict:
    supernet = _embedded.supernet_from_arguments(args, splits)
    counter = BitOpsCounter(supernet.config)
    space = supernet.search_space
    full = counter.bitops(space.full_precision())
    uniform = {}
    for weight_bits, activation_bits in UNIFORM_BITS:
        arch = space.largest(weight_bits, activation_bits)
        uniform[f"W{weight_bits}A{activation_bits}"] = {
            "share_of_full_precision": counter.bitops(arch) / full,
            "test_mean_iou": evaluate_dataset_mean_iou(supernet, splits["test"], seed=args.seed, subnet=arch),
        }
    full_precision = evaluate_dataset_mean_iou(supernet, splits["test"], seed=args.seed, subnet=space.full_precision())
    plain = plain_route(args, splits, counter)
    front = _embedded.front_from_arguments(args, supernet, splits)
    budgets = {name: route["share_of_full_precision"] for name, route in plain["ptq"].items()}
    budgets.update({f"{100 * share:g}%": share for share in LOW_SHARES})
    best = {}
    for name, share in budgets.items():
        entry = front.best_under(share * full)
        best[name] = None if entry is None else {
            "share_of_full_precision": entry.bitops / full,
            "test_mean_iou": evaluate_dataset_mean_iou(
                supernet, splits["test"], seed=args.seed, subnet=entry.to_architecture()
            ),
        }
    return {
        "supernet_full_precision": full_precision,
        "uniform": uniform,
        "plain_route": plain,
        "best_front_subnet_under": best,
    }


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = _embedded.make_splits(args)
    per_seed = _embedded.measure_per_seed(args, splits, measure_seed)
    return {**_embedded.result_header(NAME, args), "per_seed": per_seed, "wall_seconds": time.perf_counter() - started}


def summary(per_seed: list[dict], value) -> str:
    values = [value(seed) for seed in per_seed]
    if any(v is None for v in values):
        return "none fits"
    return _embedded.format_mean_std(_embedded.mean_and_std(values))


def print_results(results: dict) -> None:
    _common.print_header(
        "The supernet against a float fine-tune + onnxruntime quantize_static (box-prompt test mIoU)",
        results["machine"],
        {key: results["settings"][key] for key in ("train_steps", "seeds", "num_test")},
    )
    seeds = list(results["per_seed"].values())
    float_reference = [seed["plain_route"]["test_mean_iou_float"] for seed in seeds]
    rows = [["plain route: float fine-tune (the reference)", "100", summary(seeds, lambda s: s["plain_route"]["test_mean_iou_float"])]]
    for name in seeds[0]["plain_route"]["ptq"]:
        rows.append([
            f"plain route: quantize_static {name}",
            summary(seeds, lambda s: 100 * s["plain_route"]["ptq"][name]["share_of_full_precision"]),
            summary(seeds, lambda s: s["plain_route"]["ptq"][name]["test_mean_iou"]),
        ])
    rows.append(["supernet: full-precision subnet", "100", summary(seeds, lambda s: s["supernet_full_precision"])])
    for name in seeds[0]["uniform"]:
        rows.append([
            f"supernet: uniform {name}",
            summary(seeds, lambda s: 100 * s["uniform"][name]["share_of_full_precision"]),
            summary(seeds, lambda s: s["uniform"][name]["test_mean_iou"]),
        ])
    for name in seeds[0]["best_front_subnet_under"]:
        best = lambda s, key: None if s["best_front_subnet_under"][name] is None else s["best_front_subnet_under"][name][key]
        rows.append([
            f"supernet: best front subnet under {name}",
            summary(seeds, lambda s: None if best(s, "share_of_full_precision") is None else 100 * best(s, "share_of_full_precision")),
            summary(seeds, lambda s: best(s, "test_mean_iou")),
        ])
    _common.print_table(["model", "% of FP BitOPs", "test mIoU"], rows)
    print(f"float fine-tune: {_embedded.format_mean_std(_embedded.mean_and_std(float_reference))} test mIoU")
    print(f"{results['wall_seconds'] / 60:.1f} min")


def main(argv=None) -> None:
    _embedded.run_and_report(NAME, parse_args, run, print_results, argv)


if __name__ == "__main__":
    main()
