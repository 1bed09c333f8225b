"""Class-segmentation quality against BitOPs on the synthetic semantic task, beside a float fine-tune and its PTQ.

For each training seed: a class-segmentation supernet of the shipped `shapes-sam` (the semantic demo's) is trained
with the sandwich rule, its Pareto front of BitOPs against class mIoU is searched on the validation split, and on a
held-out test split it reports the fine-tuned full-precision model (the supernet's float subnet), the best front
subnet under 3%, 5% and 10% of the full-precision BitOPs (chosen on validation) and the supernet's uniform W8A8 tier.
Side by side, the same SAM gets a float class head trained alone for the same steps (LoRA and decoder, one
architecture: the plain fine-tune a user would otherwise run), which is then quantized W8A8 after training with
onnxruntime's `quantize_static` (QDQ, per-channel int8 weights, uint8 activations calibrated on training images;
the class decoder stays float, as in the supernet's tiers). Class mIoU is dataset-level (intersections and unions
summed over the split), the figures over seeds are mean ± standard deviation.

    python benchmarks/semantic_quality.py                 # 3 seeds
    python benchmarks/semantic_quality.py --seeds 1 --train-steps 20   # a quick look
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mpsupernet import SamSupernetForSemanticSegmentation, SupernetTrainingArguments, run_search, train_supernet
from mpsupernet.data import (
    SYNTHETIC_SEMANTIC_ID2LABEL,
    SemanticSegmentationPreprocessor,
    collate_fn,
    make_synthetic_semantic_dataset,
    make_synthetic_semantic_dataset_dict,
)
from mpsupernet.demo import BATCH_SIZE, LEARNING_RATE
from mpsupernet.demo_semantic import SEMANTIC_DEMO_SAM, SEMANTIC_TRAIN_STEPS
from mpsupernet.pretrained import load_sam
from mpsupernet.runtime import cpu_model
from mpsupernet.metrics import SemanticAreas, evaluate_dataset_semantic_mean_iou

NAME = "semantic_quality"
BUDGET_SHARES = (0.03, 0.05, 0.10)
TEST_STREAM_SEED = 1000
"""The test split is drawn with this seed added to the data seed: disjoint from train and validation."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds, from --seed on (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="the first training seed and the data seed")
    parser.add_argument("--train-steps", type=int, default=SEMANTIC_TRAIN_STEPS)
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-validation", type=int, default=32)
    parser.add_argument("--num-test", type=int, default=64)
    parser.add_argument("--population-size", type=int, default=12)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--calibration-images", type=int, default=16, help="images for quantize_static's calibration")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/benchmarks") / NAME)
    args = parser.parse_args(argv)
    for name in ("seeds", "train_steps", "num_train", "num_validation", "num_test", "calibration_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def mean_and_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def new_supernet(seed: int) -> SamSupernetForSemanticSegmentation:
    torch.manual_seed(seed)  # the adapters are drawn from the global generator
    return SamSupernetForSemanticSegmentation.from_sam(
        load_sam(SEMANTIC_DEMO_SAM), id2label=SYNTHETIC_SEMANTIC_ID2LABEL
    )


def train(model, splits: dict, args: argparse.Namespace, seed: int, output_dir: Path, **options) -> None:
    arguments = SupernetTrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.train_steps,
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=BATCH_SIZE,
        seed=seed,
        save_strategy="no",
        report_to=[],
        **options,
    )
    train_supernet(model, splits["train"], args=arguments)


def subnet_test_miou(supernet, arch, test) -> float:
    return evaluate_dataset_semantic_mean_iou(supernet, test, subnet=arch)["mean_iou"]


def onnx_test_miou(model, test, config) -> float:
    """Class mIoU of an ONNX model (`OnnxSamForSemanticSegmentation`) on the test split."""
    metric = SemanticAreas(config.num_labels, config.semantic_loss_ignore_index)
    loader = DataLoader(test.with_transform(SemanticSegmentationPreprocessor(config)), batch_size=8, collate_fn=collate_fn)
    for batch in loader:
        logits = torch.from_numpy(model(pixel_values=batch["pixel_values"].numpy()).logits)
        logits = torch.nn.functional.interpolate(logits, size=batch["labels"].shape[-2:], mode="bilinear")
        metric.update(logits.argmax(dim=1).numpy(), batch["labels"].numpy())
    return metric.compute()["mean_iou"]


def post_training_w8a8(float_model, splits: dict, args: argparse.Namespace, folder: Path) -> float:
    """The float fine-tune's full-precision subnet exported to ONNX, its encoder quantized W8A8 by onnxruntime's
    `quantize_static`; returns its test class mIoU."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from mpsupernet.runtime_semantic import OnnxSamForSemanticSegmentation

    subnet = float_model.extract_subnet(float_model.full_precision_subnet())
    subnet.export_onnx(folder, verify=False)
    preprocessor = SemanticSegmentationPreprocessor(subnet.config)
    calibration = splits["train"].select(range(min(args.calibration_images, len(splits["train"]))))
    images = collate_fn([calibration.with_transform(preprocessor)[i] for i in range(len(calibration))])["pixel_values"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixel_values": image[None].numpy()} for image in images])

        def get_next(self):
            return next(self.batches, None)

    encoder = folder / "vision_encoder.onnx"
    quantized = folder / "vision_encoder.w8a8.onnx"
    quantize_static(
        str(encoder), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
    )
    shutil.move(quantized, encoder)
    return onnx_test_miou(OnnxSamForSemanticSegmentation.from_pretrained(folder), splits["test"], subnet.config)


def measure_seed(args: argparse.Namespace, splits: dict, seed: int, scratch: Path) -> dict:
    supernet = new_supernet(seed)
    train(supernet, splits, args, seed, scratch / f"supernet-{seed}")
    supernet.eval()
    front = run_search(
        supernet, splits["validation"], output_dir=args.output_dir / f"seed-{seed}",
        population_size=args.population_size, generations=args.generations, seed=seed, progress=False,
    )
    full_precision = front.full_precision_bitops
    fine_tuned = subnet_test_miou(supernet, supernet.full_precision_subnet(), splits["test"])
    budgets = []
    for share in BUDGET_SHARES:
        best = front.best_under(share * full_precision)
        row = None
        if best is not None:
            miou = subnet_test_miou(supernet, best.to_architecture(), splits["test"])
            row = {"share_of_full_precision": best.bitops / full_precision, "test_mean_iou": miou,
                   "ratio_to_full_precision": miou / fine_tuned}
        budgets.append({"budget_share": share, "best": row})
    w8a8 = subnet_test_miou(supernet, supernet.search_space.largest(8, 8), splits["test"])

    baseline = new_supernet(seed)
    fixed = baseline.full_precision_subnet().to_dict()
    train(baseline, splits, args, seed, scratch / f"float-{seed}", fixed_architecture=fixed, distillation=None)
    baseline.eval()
    float_miou = subnet_test_miou(baseline, baseline.full_precision_subnet(), splits["test"])
    ptq_miou = post_training_w8a8(baseline, splits, args, scratch / f"ptq-{seed}")
    return {
        "full_precision_bitops": full_precision,
        "test_mean_iou_full_precision_fine_tuned": fine_tuned,
        "budgets": budgets,
        "test_mean_iou_supernet_w8a8": w8a8,
        "test_mean_iou_float_fine_tune": float_miou,
        "test_mean_iou_float_fine_tune_ptq_w8a8": ptq_miou,
        "evaluated_architectures": len(front.evaluated),
    }


def summarize(per_seed: list[dict]) -> dict:
    budgets = []
    for index, share in enumerate(BUDGET_SHARES):
        found = [seed["budgets"][index]["best"] for seed in per_seed if seed["budgets"][index]["best"] is not None]
        summary = {"budget_share": share, "seeds": len(found)}
        for key in ("share_of_full_precision", "test_mean_iou", "ratio_to_full_precision") if found else ():
            summary[key] = mean_and_std([best[key] for best in found])
        budgets.append(summary)
    keys = (
        "test_mean_iou_full_precision_fine_tuned", "test_mean_iou_supernet_w8a8", "test_mean_iou_float_fine_tune",
        "test_mean_iou_float_fine_tune_ptq_w8a8",
    )
    summary = {key: mean_and_std([seed[key] for seed in per_seed]) for key in keys}
    gap = [seed["test_mean_iou_supernet_w8a8"] - seed["test_mean_iou_float_fine_tune_ptq_w8a8"] for seed in per_seed]
    return {**summary, "w8a8_supernet_minus_ptq": mean_and_std(gap), "budgets": budgets}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    splits = dict(make_synthetic_semantic_dataset_dict(args.num_train, args.num_validation, seed=args.seed))
    splits["test"] = make_synthetic_semantic_dataset(args.num_test, seed=args.seed + TEST_STREAM_SEED)
    with tempfile.TemporaryDirectory() as scratch:
        per_seed = {
            seed: measure_seed(args, splits, seed, Path(scratch)) for seed in range(args.seed, args.seed + args.seeds)
        }
    return {
        "benchmark": NAME,
        "sam": SEMANTIC_DEMO_SAM,
        "machine": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        **summarize(list(per_seed.values())),
        "per_seed": per_seed,
        "wall_seconds": time.perf_counter() - started,
    }


def print_results(results: dict) -> None:
    def figure(value: dict) -> str:
        return f"{value['mean']:.4f} ± {value['std']:.4f}"

    print(f"{NAME}: {results['settings']['seeds']} seed(s), {results['machine']}, {results['date']}")
    print(f"fine-tuned full precision (supernet's float subnet): {figure(results['test_mean_iou_full_precision_fine_tuned'])}")
    for budget in results["budgets"]:
        if budget["seeds"]:
            print(
                f"best subnet ≤ {100 * budget['budget_share']:.0f}% of FP BitOPs: class mIoU "
                f"{figure(budget['test_mean_iou'])}, {figure(budget['ratio_to_full_precision'])} of FP "
                f"({budget['seeds']} seed(s))"
            )
        else:
            print(f"best subnet ≤ {100 * budget['budget_share']:.0f}% of FP BitOPs: none on the front")
    print(f"supernet's uniform W8A8 tier: {figure(results['test_mean_iou_supernet_w8a8'])}")
    print(f"float class head trained alone: {figure(results['test_mean_iou_float_fine_tune'])}")
    print(f"  + onnxruntime quantize_static W8A8: {figure(results['test_mean_iou_float_fine_tune_ptq_w8a8'])}")
    print(f"W8A8 supernet tier minus PTQ: {figure(results['w8a8_supernet_minus_ptq'])}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{NAME}.json").write_text(json.dumps(results, indent=2, default=float))
    print_results(results)
    return results


if __name__ == "__main__":
    main()
