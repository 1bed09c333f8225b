"""Latency models on this machine: how well they predict, and what a search under latency buys over one under BitOPs.

    python benchmarks/latency_search.py [--quick] [--part predictor|search|all] [--threads 1] [--supernet DIR]

Two parts, each writing into `<output-dir>/latency_search.json`:

- predictor: a latency model fitted (as `mpsupernet.fit_latency_model` fits it) on `--fit-subnets` exported subnets,
  and its error on `--held-out` random subnets it was not fitted on, all timed together in interleaved rounds with
  onnxruntime at `--threads` (so that load drifting between sessions is not counted as prediction error): the
  median and worst |predicted - measured| / measured. On the embedded SAM, and on a
  random-weight SAM of ViT-B size at 512 px (`--no-vit-b` skips it; latency does not depend on the weights).
- search: on the embedded task (the demo's: a supernet trained on synthetic shapes, searched on the validation
  split, scored on a test split), at 3 latency budgets spread between the fastest and the largest subnet's predicted
  latency, the front searched under latency (`max_latency_ms`) against the front searched under BitOPs; from each,
  the best subnet whose predicted latency meets the budget is exported and timed (interleaved rounds), and scored on
  the test split. One search per `--seeds` seed.

Timings on a shared machine are noisy: every figure comes with the spread of its runs, and the latency model says
`busy` when they spread more than an idle machine's do. `--quick` (one seed, fewer subnets and steps, no ViT-B) runs
in about 10 minutes on 2 idle cores.
"""

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import _embedded  # noqa: E402

from mpsupernet import LatencyModel, SamSupernetForMaskGeneration, fit_latency_model  # noqa: E402
from mpsupernet.metrics import evaluate_dataset_mean_iou  # noqa: E402
from mpsupernet.extraction import extract_subnet  # noqa: E402
from mpsupernet.latency import (  # noqa: E402
    FEATURES,
    calibration_architectures,
    check_spread,
    export_encoders,
    fit_coefficients,
    latency_features,
    relative_errors,
    time_encoders,
)
from mpsupernet.pretrained import load_sam  # noqa: E402
from mpsupernet.search import make_miou_evaluator  # noqa: E402
from mpsupernet.search.run import evolutionary_search  # noqa: E402
from mpsupernet.testing_utils import make_vit_b_sam_config  # noqa: E402

BUDGET_FRACTIONS = (0.3, 0.5, 0.75)
"""Where the 3 latency budgets sit between the fastest and the largest subnet's predicted latency."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _embedded.add_task_arguments(parser, "latency_search", train_steps=300)
    _embedded.add_supernet_argument(parser)
    parser.add_argument("--part", default="all", choices=("predictor", "search", "all"))
    parser.add_argument("--quick", action="store_true", help="one seed, fewer subnets, steps and rounds, no ViT-B")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default: 1)")
    parser.add_argument("--fit-subnets", type=int, default=12, help="subnets the latency model is fitted on")
    parser.add_argument("--held-out", type=int, default=20, help="subnets its error is measured on")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--no-vit-b", action="store_true", help="skip the ViT-B-size predictor check")
    parser.add_argument(
        "--latency-model", type=Path, help="a saved latency model of the search part's supernet (default: fit one)"
    )
    parser.add_argument("--population-size", type=int, default=12)
    parser.add_argument("--generations", type=int, default=4)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_steps, args.fit_subnets, args.held_out, args.rounds = 1, 60, 8, 8, 9
        args.num_train, args.num_validation, args.num_test = 64, 16, 32
        args.population_size, args.generations, args.no_vit_b = 8, 2, True
    return args


def predictor_error(supernet, args, name: str) -> dict:
    """The latency model's error on held-out random subnets.

    The fit subnets (those `fit_latency_model` picks) and the held-out ones are exported, then timed together in the
    same interleaved rounds, so that a change of the machine's load between two sessions does not pass for a
    prediction error; the model is fitted on the first set (as `fit_latency_model` fits it) and scored on the second.
    """
    space = supernet.search_space
    fit_archs = calibration_architectures(space, args.fit_subnets, args.seed)
    rng, held_out = random.Random(args.seed + 1000), []
    while len(held_out) < args.held_out:
        arch = space.sample(rng)
        if arch not in fit_archs and arch not in held_out:
            held_out.append(arch)
    archs = fit_archs + held_out
    print(f"[{name}] exporting {len(fit_archs)} subnets to fit and {len(held_out)} held out")
    with tempfile.TemporaryDirectory() as folder:
        paths = export_encoders(_calibrated(supernet, args.seed), archs, Path(folder))
        size = supernet.config.vision_config.image_size
        timings = time_encoders(paths, [size] * len(paths), num_threads=args.threads, rounds=args.rounds, seed=args.seed)
    features = [latency_features(supernet.config, arch) for arch in archs]
    measured = [timing.median_ms for timing in timings]
    count = len(fit_archs)
    coefficients = fit_coefficients(features[:count], measured[:count])
    predicted = [sum(coefficients[key] * row[key] for key in FEATURES) for row in features]
    return {
        "coefficients": coefficients,
        "fit_error": relative_errors(predicted[:count], measured[:count]),
        "held_out_error": relative_errors(predicted[count:], measured[count:]),
        "held_out": [
            {"predicted_ms": p, "measured_ms": t.median_ms, "spread": t.spread, "architecture": a.to_dict()}
            for p, t, a in zip(predicted[count:], timings[count:], held_out)
        ],
        "median_spread": statistics.median(t.spread for t in timings),
        "busy": check_spread(timings, None),
    }


def _calibrated(supernet, seed: int):
    """`supernet` with its activation steps set at every bit-width (latency does not depend on them)."""
    size = supernet.config.vision_config.image_size
    supernet.calibrate_quantizers(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    return supernet


def vit_b_supernet(seed: int) -> SamSupernetForMaskGeneration:
    from transformers import SamModel

    torch.manual_seed(seed)
    sam = SamModel(make_vit_b_sam_config(image_size=512)).eval()
    return SamSupernetForMaskGeneration.from_sam(sam).eval()


def search_comparison(args) -> dict:
    """Fronts under latency and under BitOPs at 3 latency budgets; each one's best subnet timed and scored."""
    splits = _embedded.make_splits(args)
    supernet = _embedded.supernet_from_arguments(args, splits)
    if args.latency_model is not None:
        model = LatencyModel.from_pretrained(args.latency_model)
        model.check_compatible(supernet)
    else:
        model = fit_latency_model(
            supernet, num_threads=args.threads, num_subnets=args.fit_subnets, rounds=args.rounds, max_spread=None,
            seed=args.seed,
        )
    _, fastest_ms = model.fastest()
    largest_ms = model.predict(supernet.search_space.largest())
    budgets = [fastest_ms + fraction * (largest_ms - fastest_ms) for fraction in BUDGET_FRACTIONS]
    from torch.utils.data import DataLoader

    from mpsupernet.data import SamSegmentationPreprocessor, collate_fn

    preprocessor = SamSegmentationPreprocessor(supernet.config, seed=args.seed)
    loader = DataLoader(splits["validation"].with_transform(preprocessor), batch_size=8, collate_fn=collate_fn)
    evaluate = make_miou_evaluator(supernet, loader)
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        common = {"population_size": args.population_size, "generations": args.generations, "seed": seed,
                  "progress": False, "evaluate_full_precision": False}
        # The BitOPs front does not depend on the latency budget: one search, its best entry that meets each budget.
        by_bitops = evolutionary_search(supernet, evaluate, **common)
        for budget in budgets:
            by_latency = evolutionary_search(supernet, evaluate, latency_model=model, max_latency_ms=budget, **common)
            fitting = [entry for entry in by_bitops.entries if model.predict(entry.to_architecture()) <= budget]
            chosen = {
                "latency": by_latency.best_under(max_latency_ms=budget),
                "bitops": max(fitting, key=lambda entry: entry.mean_iou, default=None),
            }
            results.append({"seed": seed, "budget_ms": budget, **_measure(supernet, model, chosen, splits["test"], args)})
    return {"machine": model.machine(), "budgets_ms": budgets, "runs": results}


def _measure(supernet, model, chosen: dict, test, args) -> dict:
    """Exports the chosen subnets, times them in interleaved rounds and scores them on the test split."""
    names = [name for name, entry in chosen.items() if entry is not None]
    archs = [chosen[name].to_architecture() for name in names]
    with tempfile.TemporaryDirectory() as folder:
        paths = export_encoders(supernet, archs, Path(folder), progress=False)
        size = supernet.config.vision_config.image_size
        timings = time_encoders(paths, [size] * len(paths), num_threads=args.threads, rounds=args.rounds, progress=False)
    out = {}
    for name, arch, timing in zip(names, archs, timings):
        subnet = extract_subnet(supernet, arch).eval()
        out[name] = {
            "predicted_ms": model.predict(arch), "measured_ms": timing.median_ms, "spread": timing.spread,
            "bitops": chosen[name].bitops, "validation_mean_iou": chosen[name].mean_iou,
            "test_mean_iou": evaluate_dataset_mean_iou(subnet, test, seed=args.seed), "architecture": arch.to_dict(),
        }
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    results = {"benchmark": "latency_search", "machine": _common.machine_info(torch.device("cpu")),
               "settings": _common.settings_of(args)}
    if args.part in ("predictor", "all"):
        results["predictor"] = {"embedded": predictor_error(
            SamSupernetForMaskGeneration.from_sam(load_sam(args.sam or "embedded-sam")).eval(), args, "embedded"
        )}
        if not args.no_vit_b:
            results["predictor"]["vit_b_512"] = predictor_error(vit_b_supernet(args.seed), args, "vit_b_512")
        for name, part in results["predictor"].items():
            error = part["held_out_error"]
            print(f"{name}: held-out median error {error['median_relative_error']:.1%}, worst "
                  f"{error['max_relative_error']:.1%} on {error['count']} subnets (median spread "
                  f"{part['median_spread']:.0%}; busy: {part['busy']})")
    if args.part in ("search", "all"):
        results["search"] = search_comparison(args)
        for run in results["search"]["runs"]:
            line = ", ".join(
                f"{name}: {run[name]['measured_ms']:.2f} ms measured, test mIoU {run[name]['test_mean_iou']:.4f}"
                for name in ("latency", "bitops") if name in run
            )
            print(f"seed {run['seed']}, budget {run['budget_ms']:.2f} ms: {line}")
    _common.write_json(args.output_dir / "latency_search.json", results)


if __name__ == "__main__":
    main()
