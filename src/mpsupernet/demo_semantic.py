"""Class segmentation end to end, offline, on CPUs: `mpsupernet demo --task semantic`.

shipped pretrained SAM → class-segmentation supernet (SAMed's head, five shape classes and the background) → sandwich
training on the synthetic class dataset → evolutionary search by class mIoU → three extracted tiers with model cards,
ONNX exports (encoder + prompt-free class decoder) and their measured onnxruntime latency → the Pareto plot and a
summary table.
"""

import time
from pathlib import Path

import torch

from .bitops import format_bitops
from .data import SYNTHETIC_SEMANTIC_ID2LABEL, make_synthetic_semantic_dataset_dict
from .demo import check_demo_settings, finish_demo, pick_tier_budgets, train_and_search
from .hub import save_tiers
from .modeling_sam_semantic import SamSupernetForSemanticSegmentation
from .pretrained import load_sam
from .metrics.evaluation import evaluate_dataset_semantic_mean_iou

SEMANTIC_DEMO_SAM = "shapes-sam"
"""The shipped SAM the semantic demo starts from: the one pretrained on the package's shapes (whose classes the demo
segments), several times cheaper to train than the embedded default, so that training, search and three ONNX
exports stay within the demo's 15 minutes on two cores."""
SEMANTIC_TRAIN_STEPS = 200


def run_semantic_demo(
    output_dir: str = "outputs/demo-semantic",
    train_steps: int = SEMANTIC_TRAIN_STEPS,
    num_train: int = 128,
    num_validation: int = 32,
    population_size: int = 12,
    generations: int = 4,
    seed: int = 0,
    export_onnx: bool = True,
) -> dict:
    """Runs the semantic demo and writes everything under `output_dir`.

    Args:
        output_dir (`str`): where the supernet, the Pareto front (JSON and PNG), the tiers with their model cards and
            `summary.json` go.
        train_steps (`int`): optimizer steps of supernet training (each trains 4 subnets).
        num_train, num_validation (`int`): sizes of the synthetic splits.
        population_size, generations (`int`): the evolutionary search's settings.
        seed (`int`): seeds data, sampling and search.
        export_onnx (`bool`): export and time each tier on onnxruntime.

    Returns:
        `dict`: the summary also written to `summary.json`; its rows' `mean_iou` is the dataset-level class mIoU on
        the validation split.

    Raises:
        `ValueError`: for bad settings, before anything is loaded or written.
    """
    check_demo_settings(train_steps, num_train, num_validation, population_size, generations, seed)
    started = time.perf_counter()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    print(f"[1/5] Shipped SAM {SEMANTIC_DEMO_SAM!r} → class-segmentation supernet ({len(SYNTHETIC_SEMANTIC_ID2LABEL)} classes)")
    supernet = SamSupernetForSemanticSegmentation.from_sam(
        load_sam(SEMANTIC_DEMO_SAM), id2label=SYNTHETIC_SEMANTIC_ID2LABEL
    )
    splits = make_synthetic_semantic_dataset_dict(num_train, num_validation, seed=seed)

    training, front = train_and_search(supernet, splits, output, train_steps, population_size, generations, seed)

    budgets = pick_tier_budgets(front)
    print(f"[4/5] Extracting tiers under {', '.join(f'{n}: {format_bitops(b)}' for n, b in budgets.items())}")
    tiers = {name: supernet.extract_subnet(budget, pareto_front=front) for name, budget in budgets.items()}
    mean_ious = {
        name: evaluate_dataset_semantic_mean_iou(tier, splits["validation"])["mean_iou"] for name, tier in tiers.items()
    }
    manifest = save_tiers(tiers, output / "tiers", mean_ious=mean_ious, export_onnx=export_onnx)

    print("[5/5] Summary (mIoU: class mIoU on the synthetic validation split; search by class mIoU)")
    rows = [
        {
            "model": "supernet, full precision",
            "gbitops": front.full_precision_bitops / 1e9,
            "share_of_full_precision": 1.0,
            "mean_iou": front.metadata["full_precision"]["mean_iou"],
            "latency_ms": None,
        }
    ]
    rows += [
        {
            "model": f"tier {name}",
            "gbitops": tier["bitops"] / 1e9,
            "share_of_full_precision": tier["share_of_full_precision"],
            "mean_iou": tier["mean_iou"],
            "latency_ms": tier.get("latency_ms"),
        }
        for name, tier in manifest["tiers"].items()
    ]
    return finish_demo(output, rows, manifest, training, started)


__all__ = ["SEMANTIC_DEMO_SAM", "SEMANTIC_TRAIN_STEPS", "run_semantic_demo"]
