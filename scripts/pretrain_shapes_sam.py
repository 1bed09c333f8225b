#!/usr/bin/env python
"""Pretrains the package's tiny `shapes-sam` on synthetic data, on the CPU, in a few minutes.

The supernet method fine-tunes a pretrained SAM, and no SAM checkpoint can be downloaded where the project runs, so
the project ships a small SAM that it trains itself: a plain transformers `SamModel` (config from
`mpsupernet.testing_utils.make_sam_config`) trained from scratch on `make_synthetic_segmentation_dataset` with SAM's
losses: jittered box prompts (one mask) on three steps out of four, single-point prompts (three masks, the best one
trained) on the fourth. SAM's unit-scale positional frequencies replace transformers' random initialisation (see
`POSITIONAL_FREQUENCY_STD`).

The number of steps follows the time budget: the warmup steps (whose learning rates do not depend on the total) are
timed, and the total is then fixed for the cosine schedule and written to `training_log.json`. `--steps N` skips the
timing; the same seed and steps give the same weights (on the same machine and thread count).

Usage:
    python scripts/pretrain_shapes_sam.py [--minutes N] [--steps N] [--output-dir DIR] [--seed S]
"""

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import SamModel

from mpsupernet.data import (
    MODEL_INPUT_NAMES,
    SamSegmentationPreprocessor,
    collate_fn,
    make_synthetic_segmentation_dataset_dict,
)
from mpsupernet.metrics import evaluate_mean_iou
from mpsupernet.pretrained import PRETRAINED_DIR
from mpsupernet.testing_utils import make_sam_config
from mpsupernet.training import sam_loss


logger = logging.getLogger("pretrain_shapes_sam")

# 3.8 MB of float32 weights. The 16x16 embedding grid is split into 4x4 windows; blocks 2 and 5 attend globally.
ARCHITECTURE = {
    "image_size": 128,
    "patch_size": 8,
    "hidden_size": 96,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "window_size": 4,
    "global_attn_indexes": (2, 5),
    "output_channels": 64,
    "decoder_mlp_dim": 256,
}
# Steps left out of the timing: the first ones are slower (allocations, lazy initialisation).
UNTIMED_STEPS = 5
LOSS_WINDOW = 100
VALIDATION_PROMPTS_PER_IMAGE = 4
# SAM's random Fourier features of coordinates have unit-variance frequencies (`PositionEmbeddingRandom(scale=1)`,
# a fixed buffer). transformers draws them with a standard deviation of `vision_config.hidden_size // 2` (it only
# matters when loading a checkpoint overwrites them), which makes positions look like noise and stalls training from
# scratch: on one batch, box-prompt IoU after 150 steps went from 0.16 to 0.35 with SAM's scale.
POSITIONAL_FREQUENCY_STD = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="Time budget of the training loop, in minutes.")
    parser.add_argument("--steps", type=int, default=None, help="Number of steps; overrides the time budget.")
    parser.add_argument(
        "--output-dir", type=Path, default=PRETRAINED_DIR / "shapes-sam", help="Where to save the model."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--validation-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--prompts-per-image",
        type=int,
        default=8,
        help="Training prompts per image (objects repeat, with other jitter); cheap: the encoder runs once per image.",
    )
    parser.add_argument(
        "--point-prompt-every",
        type=int,
        default=4,
        help=(
            "Every N-th step uses single-point prompts (three masks); the others use jittered boxes (one mask). "
            "Box prompts are what fine-tuning and evaluation use: after 450 steps, box mIoU was 0.13 with N=4 and "
            "0.005 with N=2."
        ),
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--min-learning-rate", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "torch threads. One is the default because on a 2-core machine shared with other jobs two spinning "
            "threads ran a step 5-10 times slower (0.3 s with one thread vs 1.5-2.8 s with two), while alone two "
            "threads gain only about 1.5x."
        ),
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps <= args.warmup_steps:
        parser.error(f"--steps must exceed --warmup-steps ({args.warmup_steps}), got {args.steps}.")
    if args.point_prompt_every < 1:
        parser.error(f"--point-prompt-every must be at least 1, got {args.point_prompt_every}.")
    if args.warmup_steps <= UNTIMED_STEPS:
        parser.error(f"--warmup-steps must exceed {UNTIMED_STEPS} (the untimed steps), got {args.warmup_steps}.")
    return args


def learning_rate(step: int, total_steps: int | None, args: argparse.Namespace) -> float:
    """Linear warmup, then a cosine decay to `min_learning_rate` at `total_steps`."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.min_learning_rate + 0.5 * (args.learning_rate - args.min_learning_rate) * (
        1 + math.cos(math.pi * progress)
    )


def endless_batches(dataset, preprocessor: SamSegmentationPreprocessor, batch_size: int, seed: int):
    """Shuffled batches, epoch after epoch, with fresh prompts every epoch; all seeded."""
    epoch = 0
    while True:
        preprocessor.set_epoch(epoch)
        loader = DataLoader(
            dataset.with_transform(preprocessor),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
            collate_fn=collate_fn,
        )
        yield from loader
        epoch += 1


def validation_loader(dataset, config, prompt_mode: str, args: argparse.Namespace) -> DataLoader:
    # Tight boxes: the validation number measures segmentation, not robustness to box noise.
    preprocessor = SamSegmentationPreprocessor(
        config,
        prompts_per_image=VALIDATION_PROMPTS_PER_IMAGE,
        prompt_mode=prompt_mode,
        box_noise_ratio=0.0,
        seed=args.seed,
    )
    return DataLoader(dataset.with_transform(preprocessor), batch_size=16, collate_fn=collate_fn)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = make_sam_config(**ARCHITECTURE)
    model = SamModel(config)
    # The prompt encoder shares this parameter with the image-wide positional embedding.
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.normal_(0.0, POSITIONAL_FREQUENCY_STD)
    model.shared_image_embedding.positional_embedding.requires_grad_(False)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info(f"SamModel with {num_parameters / 1e6:.2f}M parameters ({num_parameters * 4 / 1e6:.2f} MB float32).")

    splits = make_synthetic_segmentation_dataset_dict(
        args.train_images, args.validation_images, image_size=ARCHITECTURE["image_size"], seed=args.seed
    )
    logger.info(f"Generated {args.train_images} training and {args.validation_images} validation images.")
    box_validation = validation_loader(splits["validation"], config, "box", args)
    point_validation = validation_loader(splits["validation"], config, "points", args)
    miou_before = evaluate_mean_iou(model, box_validation, description="mIoU before (box)")
    logger.info(f"Validation mIoU with box prompts before training: {miou_before:.4f}")

    streams = {
        # (batches, multimask_output): a box names one object, a single point may name several (SAM's ambiguity).
        "box": (
            endless_batches(
                splits["train"],
                SamSegmentationPreprocessor(config, prompts_per_image=args.prompts_per_image, seed=args.seed),
                args.batch_size,
                args.seed,
            ),
            False,
        ),
        "points": (
            endless_batches(
                splits["train"],
                SamSegmentationPreprocessor(
                    config, prompts_per_image=args.prompts_per_image, prompt_mode="points", seed=args.seed + 1
                ),
                args.batch_size,
                args.seed + 1,
            ),
            True,
        ),
    }
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    model.train()
    total_steps = args.steps
    history = []
    train_start = time.perf_counter()
    timing_start = None
    progress = tqdm(total=total_steps, desc="Pretraining")
    step = 0
    while total_steps is None or step < total_steps:
        if step == UNTIMED_STEPS:
            timing_start = time.perf_counter()
        if total_steps is None and step == args.warmup_steps:
            seconds_per_step = (time.perf_counter() - timing_start) / (step - UNTIMED_STEPS)
            remaining = args.minutes * 60 - (time.perf_counter() - train_start)
            total_steps = max(step + 1, step + int(remaining / seconds_per_step))
            progress.total = total_steps
            progress.refresh()
            logger.info(f"{seconds_per_step:.3f} s per step: training for {total_steps} steps in total.")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, args)
        batches, multimask_output = streams[
            "points" if step % args.point_prompt_every == args.point_prompt_every - 1 else "box"
        ]
        batch = next(batches)
        outputs = model(
            **{name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}, multimask_output=multimask_output
        )
        losses = sam_loss(outputs.pred_masks, outputs.iou_scores, batch["ground_truth_masks"])
        optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        history.append(
            {
                "loss": losses.loss.item(),
                "focal": losses.focal_loss.item(),
                "dice": losses.dice_loss.item(),
                "iou": losses.iou_loss.item(),
            }
        )
        step += 1
        progress.update(1)
        if step % 10 == 0:
            progress.set_postfix(loss=f"{sum(h['loss'] for h in history[-10:]) / 10:.4f}")
        if step % 250 == 0:
            recent = history[-LOSS_WINDOW:]
            logger.info(
                f"step {step}: loss {sum(h['loss'] for h in recent) / len(recent):.4f} (mean of the last "
                f"{len(recent)} steps), lr {optimizer.param_groups[0]['lr']:.2e}"
            )
    progress.close()
    train_seconds = time.perf_counter() - train_start

    model.eval()
    miou_after = evaluate_mean_iou(model, box_validation, description="mIoU after (box)")
    miou_points = evaluate_mean_iou(model, point_validation, multimask_output=True, description="mIoU after (point)")
    logger.info(
        f"Validation mIoU with box prompts: {miou_before:.4f} before, {miou_after:.4f} after training; with one "
        f"point (best of 3 masks by predicted IoU): {miou_points:.4f}."
    )

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir, safe_serialization=True)
    recent = history[-LOSS_WINDOW:]
    record = {
        "command": " ".join(["python", "scripts/pretrain_shapes_sam.py", *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed,
        "architecture": {**ARCHITECTURE, "global_attn_indexes": list(ARCHITECTURE["global_attn_indexes"])},
        "num_parameters": num_parameters,
        "train_images": args.train_images,
        "validation_images": args.validation_images,
        "validation_prompts": (
            f"tight boxes and single positive points, {VALIDATION_PROMPTS_PER_IMAGE} per image, synthetic validation "
            f"split of seed {args.seed}"
        ),
        "batch_size": args.batch_size,
        "prompts_per_image": args.prompts_per_image,
        "point_prompt_every": args.point_prompt_every,
        "positional_frequency_std": POSITIONAL_FREQUENCY_STD,
        "learning_rate": args.learning_rate,
        "min_learning_rate": args.min_learning_rate,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "steps": total_steps,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "final_losses": {key: round(sum(h[key] for h in recent) / len(recent), 5) for key in recent[0]},
        "validation_miou_box": {"before": round(miou_before, 4), "after": round(miou_after, 4)},
        "validation_miou_point_after": round(miou_points, 4),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(args.output_dir / "training_log.json", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    logger.info(f"Saved the model and training_log.json to {args.output_dir}.")
    return record


if __name__ == "__main__":
    main()
