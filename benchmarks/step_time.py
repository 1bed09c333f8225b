"""Wall time of a supernet training step against a step of plain LoRA fine-tuning of the same SAM with peft.

Both start from the same random SAM, train on the same inputs with SAM's loss and AdamW, keep the mask decoder
trainable, and use SDPA attention where the model allows it. Variants, timed in interleaved rounds (one of each per
round, so that a slow spell of a shared machine hits all of them alike) after warm-up rounds; the median is kept:

- `peft`: plain LoRA (r=8, alpha=16) on the image encoder's qkv/proj/lin1/lin2, the baseline.
- `subnet`: our supernet, one sampled subnet: set_subnet, forward with fake quantization and quantization-aware
  LoRA, loss, backward, optimizer step. The subnet is drawn anew each round (from fixed seeds), so its median mixes
  resolutions, depths and widths as training does. This is the figure the target is about.
- `largest`: the same with the largest subnet every time (the costliest single subnet), for context.
- `sandwich`: a whole sandwich-rule step, 4 subnets (largest, smallest, 2 random) accumulated, for context.

    python benchmarks/step_time.py                            # CPU, ViT-B at 256 px (a few minutes)
    python benchmarks/step_time.py --device cuda --image-size 1024 --gradient-checkpointing --bf16
    python benchmarks/step_time.py --image-size 1024 --gradient-checkpointing --variants peft subnet  # CPU, hours
"""

import argparse

import torch

import _common

NAME = "step_time"
TARGET_RATIO = 1.3
VARIANTS = ("peft", "subnet", "largest", "sandwich")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser, NAME, image_size=256)
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds; the median is reported (default: 5).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first (default: 1).")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS[1:],
        default=list(VARIANTS[1:]),
        help="Supernet variants timed beside the peft baseline (default: all; `largest` and `sandwich` are context).",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Times peft and the chosen supernet variants in interleaved rounds; returns the medians and ratios to `peft`."""
    device = _common.check_device(args.device)
    sam = _common.build_sam(args.image_size, args.tiny, args.seed)
    supernet = _common.build_supernet(sam)  # copies the weights, so `sam` can be wrapped by peft afterwards
    if args.gradient_checkpointing:
        supernet.activation_checkpointing_enable()
    peft_model = _common.build_peft_model(sam, args.gradient_checkpointing)
    models = {"peft": peft_model.to(device).train(), "supernet": supernet.to(device).train()}
    optimizers = {
        name: torch.optim.AdamW(_common.trainable_parameters(model), lr=1e-5) for name, model in models.items()
    }
    inputs = _common.make_inputs(sam.config, args.batch_size, args.prompts, device, args.seed)

    def step(variant: str, round_index: int) -> float:
        largest, smallest, *random_subnets = _common.sandwich_subnets(supernet, round_index, args.seed)
        subnets = {
            "peft": None,
            "subnet": random_subnets[:1],
            "largest": [largest],
            "sandwich": [largest, smallest, *random_subnets],
        }[variant]
        model_name = "peft" if subnets is None else "supernet"
        return _common.timed(
            lambda: _common.train_step(models[model_name], optimizers[model_name], inputs, subnets, args.bf16), device
        )

    variants = ["peft", *(variant for variant in VARIANTS[1:] if variant in args.variants)]
    seconds = {variant: [] for variant in variants}
    for round_index in range(args.warmup + args.repeats):
        elapsed = {variant: step(variant, round_index) for variant in variants}
        warm_up = round_index < args.warmup
        label = f"warm-up {round_index + 1}/{args.warmup}" if warm_up else f"round {round_index - args.warmup + 1}"
        print(f"  {label}: " + ", ".join(f"{v} {s:.2f} s" for v, s in elapsed.items()), flush=True)
        if not warm_up:
            for variant, value in elapsed.items():
                seconds[variant].append(value)
    medians = {variant: _common.median(values) for variant, values in seconds.items()}
    ratios = {variant: medians[variant] / medians["peft"] for variant in variants[1:]}
    return {
        "benchmark": NAME,
        "machine": _common.machine_info(device),
        "settings": _common.settings_of(args),
        "model": _common.describe_model(sam.config),
        "trainable_parameters": {
            name: sum(parameter.numel() for parameter in _common.trainable_parameters(model))
            for name, model in models.items()
        },
        "seconds": seconds,
        "median_seconds": medians,
        "ratios_to_peft": ratios,
        "target_ratio": TARGET_RATIO,
        "target_met": ratios["subnet"] <= TARGET_RATIO if "subnet" in ratios else None,
    }


def print_results(results: dict) -> None:
    settings = results["settings"]
    trainable = results["trainable_parameters"]
    _common.print_header(
        "Training step time: supernet vs plain LoRA (peft)",
        results["machine"],
        {
            "model": results["model"],
            **{key: settings[key] for key in ("batch_size", "prompts", "gradient_checkpointing", "bf16")},
            "rounds": f"{settings['warmup']} warm-up + {settings['repeats']} timed, interleaved, median",
            "trainable": f"peft {trainable['peft'] / 1e6:.2f}M, supernet {trainable['supernet'] / 1e6:.2f}M",
        },
    )
    descriptions = {
        "peft": "plain LoRA step (baseline)",
        "subnet": "supernet step, 1 random subnet",
        "largest": "supernet step, largest subnet",
        "sandwich": "supernet sandwich step, 4 subnets",
    }
    ratios = results["ratios_to_peft"]
    rows = [
        [descriptions[variant], median, min(results["seconds"][variant]), ratios.get(variant, 1.0)]
        for variant, median in results["median_seconds"].items()
    ]
    _common.print_table(["step", "median s", "min s", "ratio to peft"], rows)
    if "subnet" in ratios:
        _common.verdict(
            "ratio supernet step (1 random subnet) / plain LoRA step", ratios["subnet"], results["target_ratio"]
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    print_results(results)
    _common.write_json(args.output, results)


if __name__ == "__main__":
    main()
