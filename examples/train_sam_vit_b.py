"""Recipe: a mixed-precision supernet from SAM ViT-B, trained on a Hub segmentation dataset with the Trainer.

Converts `facebook/sam-vit-base` into a supernet (frozen base, quantization-aware LoRA, per-bit-width step sizes),
converts a Hub dataset to the project's standard schema with one of the `mpsupernet.data` adapters, and trains the
sandwich of subnets with `SupernetTrainer`. The trained supernet is saved with `save_pretrained` in `--output-dir`,
ready for `mpsupernet search` and `mpsupernet extract`.

Examples (the batch size is per GPU; see `examples/accelerate_configs/`):

    # ADE20K (image + label map): every connected region of a class becomes an object mask.
    accelerate launch --config_file examples/accelerate_configs/multi_gpu_ddp.yaml examples/train_sam_vit_b.py \
        --dataset zhoubolei/scene_parse_150 --schema semantic --output-dir sam-vit-b-supernet

    # A COCO-style instance dataset (an `objects` column with polygon or RLE `segmentation`s), one GPU:
    accelerate launch --config_file examples/accelerate_configs/single_gpu_bf16.yaml examples/train_sam_vit_b.py \
        --dataset <your/coco-style-dataset> --schema coco --output-dir sam-vit-b-supernet

    # Resume after an interruption, with the same arguments:
    accelerate launch ... examples/train_sam_vit_b.py ... --resume-from-checkpoint sam-vit-b-supernet/checkpoint-2000

Cost, to plan a run: SAM ViT-B's image encoder at 1024 pixels is 0.49 TMACs per image (`mpsupernet.count_bitops`),
and each optimizer step runs the sandwich (2 + `--num-random-subnets` subnets) forward and backward on every example.
Only one subnet's activations are held at a time; gradient checkpointing (on by default here) and bf16 (on GPUs that
support it) shrink them further.
"""

import argparse

import torch
from datasets import load_dataset
from transformers.utils import logging

from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.data import (
    DATASET_SCHEMAS,
    PROMPT_MODES,
    SamSegmentationPreprocessor,
    remove_examples_without_masks,
    to_standard_schema,
)
from mpsupernet.training import SupernetTrainer, SupernetTrainingArguments


logger = logging.get_logger("train_sam_vit_b")

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam", default="facebook/sam-vit-base", help="SAM checkpoint: Hub id or local folder")
    parser.add_argument("--dataset", required=True, help="Hub dataset id (or a local folder `load_dataset` reads)")
    parser.add_argument("--dataset-config", default=None, help="configuration name of the Hub dataset")
    parser.add_argument(
        "--schema", required=True, choices=list(DATASET_SCHEMAS), help="how the dataset stores masks (see mpsupernet.data)"
    )
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--max-eval-examples", type=int, default=500, help="evaluate on this many examples")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per GPU and micro-batch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--num-random-subnets", type=int, default=2)
    parser.add_argument("--distillation", default="largest", choices=["largest", "full_precision", "none"])
    parser.add_argument("--lora-mode", default="multiplex", choices=["shared", "multiplex", "multipath"])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--prompts-per-image", type=int, default=8)
    parser.add_argument("--prompt-mode", default="box", choices=PROMPT_MODES)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, but more memory")
    parser.add_argument("--save-steps", type=int, default=1000)
    parser.add_argument("--eval-steps", type=int, default=2000)
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--report-to", default="none", help="'tensorboard', 'wandb', ... (as for TrainingArguments)")
    parser.add_argument("--num-workers", type=int, default=4, help="dataloader worker processes per GPU")
    parser.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint-<step> folder of --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_training_arguments(args: argparse.Namespace) -> SupernetTrainingArguments:
    """The Trainer's arguments for this recipe: cosine schedule, bf16 where supported, periodic eval and checkpoints,
    and the sandwich's options."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return SupernetTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(500, args.max_steps // 20),
        max_grad_norm=1.0,
        bf16=bf16,
        activation_checkpointing=not args.no_gradient_checkpointing,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=3,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        dataloader_num_workers=args.num_workers,
        seed=args.seed,
        num_random_subnets=args.num_random_subnets,
        distillation=None if args.distillation == "none" else args.distillation,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.set_verbosity_info()

    model = SamSupernetForMaskGeneration.from_sam(args.sam, lora_mode=args.lora_mode, lora_rank=args.lora_rank)
    logger.info(
        f"Supernet from {args.sam}: largest subnet {model.bitops_report(model.largest_subnet()).total_bitops / 1e9:.0f} "
        f"GBitOPs, smallest {model.bitops_report(model.smallest_subnet()).total_bitops / 1e9:.0f} GBitOPs per image."
    )

    training_args = make_training_arguments(args)
    # The first process converts and caches the dataset; the others then read its cache.
    with training_args.main_process_first(desc="dataset conversion"):
        raw = load_dataset(args.dataset, args.dataset_config)
        train_split = raw[args.train_split]
        eval_split = raw[args.eval_split].select(range(min(args.max_eval_examples, len(raw[args.eval_split]))))
        train_data = remove_examples_without_masks(to_standard_schema(train_split, args.schema))
        eval_data = remove_examples_without_masks(to_standard_schema(eval_split, args.schema))
    preprocessor = SamSegmentationPreprocessor(
        model.config, prompts_per_image=args.prompts_per_image, prompt_mode=args.prompt_mode, seed=args.seed
    )
    # Evaluation prompts are the tight boxes (no jitter), so that scores compare across runs.
    eval_preprocessor = SamSegmentationPreprocessor(
        model.config, prompts_per_image=args.prompts_per_image, prompt_mode=args.prompt_mode, box_noise_ratio=0.0
    )

    trainer = SupernetTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data.with_transform(preprocessor),
        eval_dataset=eval_data.with_transform(eval_preprocessor),
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()
    logger.info(f"Supernet saved to {args.output_dir}; final evaluation: {metrics}")
    return metrics


if __name__ == "__main__":
    main()
