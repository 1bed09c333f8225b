"""Measures what supernet training gives on a SAM (`--sam`, default the embedded one): the mean mask IoU of the
full-precision model and of the largest and smallest subnets, before and after a few CPU minutes of `train_supernet`.

The measurement trains and evaluates on synthetic images drawn with `--data-seed`, with box prompts. Results go to `<output-dir>/measurement.json` and stdout.

    python scripts/measure_training.py --max-steps 200 --output-dir outputs/measure_training

Under `accelerate launch` (e.g. `--config_file examples/accelerate_configs/cpu.yaml`) it runs the same way.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers.utils import logging

from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.data import SamSegmentationPreprocessor, collate_fn, make_synthetic_segmentation_dataset_dict
from mpsupernet.pretrained import load_sam
from mpsupernet.training import QUANTIZER_LR_SCALE, SupernetTrainingArguments, evaluate_subnets, train_supernet


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sam", default="embedded-sam", help="a shipped SAM's name (embedded-sam, shapes-sam) or a SamModel folder"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/measure_training"))
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-validation", type=int, default=128)
    parser.add_argument("--data-seed", type=int, default=1, help="seed of the synthetic images (pretraining used 0)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--quantizer-lr-scale", type=float, default=QUANTIZER_LR_SCALE)
    parser.add_argument("--num-random-subnets", type=int, default=2)
    parser.add_argument("--prompts-per-image", type=int, default=4)
    parser.add_argument("--lora-mode", default="multiplex", choices=["shared", "multiplex", "multipath"])
    parser.add_argument("--log-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.set_verbosity_info()
    sam = load_sam(args.sam)
    model = SamSupernetForMaskGeneration.from_sam(sam, lora_mode=args.lora_mode)
    splits = make_synthetic_segmentation_dataset_dict(
        args.num_train, args.num_validation, image_size=model.config.vision_config.image_size, seed=args.data_seed
    )
    preprocessor = SamSegmentationPreprocessor(model.config, prompts_per_image=args.prompts_per_image, seed=args.seed)

    # The full-precision model is the reference the subnets are measured against; train_supernet scores the others.
    eval_loader = DataLoader(
        splits["validation"].with_transform(copy.copy(preprocessor)), batch_size=args.batch_size, collate_fn=collate_fn
    )
    full_precision = {"full_precision": model.full_precision_subnet()}
    reference_before = evaluate_subnets(model, eval_loader, full_precision)["full_precision"]

    start = time.perf_counter()
    settings = SupernetTrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=0.05,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_random_subnets=args.num_random_subnets,
        seed=args.seed,
        logging_steps=args.log_steps,
        save_strategy="no",
        report_to="none",
        quantizer_lr_scale=args.quantizer_lr_scale,
    )
    summary = train_supernet(model, splits["train"], splits["validation"], args=settings, preprocessor=preprocessor)
    reference_after = evaluate_subnets(model, eval_loader, full_precision)["full_precision"]
    result = {
        "command": "python scripts/measure_training.py " + " ".join(argv if argv is not None else []),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "training_seconds": summary["seconds"],
        "steps": summary["steps"],
        "mean_iou_full_precision": {"before": reference_before, "after": reference_after},
        "mean_iou_before": summary["mean_iou_before"],
        "mean_iou_after": summary["mean_iou_after"],
        "final_losses": summary["final_losses"],
        "log_history": summary["log_history"],
        "bitops": {
            name: model.bitops_report(arch).summary()
            for name, arch in (("largest", model.largest_subnet()), ("smallest", model.smallest_subnet()))
        },
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "measurement.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("log_history", "bitops")}, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
