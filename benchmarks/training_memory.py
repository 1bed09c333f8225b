"""Peak training memory: our LoRA supernet against a full-fine-tuning mixed-precision supernet (the paper's QFA*) and
against a plain peft LoRA fine-tune of the same SAM.

The two supernet variants are the same `SamSupernetForMaskGeneration` built from the same random SAM, trained on the
same inputs with the same sandwich of subnets per step (the largest, the smallest and two random ones, drawn from the
same seeds) and the same fake quantization. They differ only in what trains:

- `lora`: our method. Base weights frozen; adapters, quantizer step sizes and the mask decoder train (AdamW over
  those only).
- `full`: the QFA* baseline of the paper. Every weight trains (AdamW over all), the same quantizers included.
- `peft`: what a user would otherwise run: the same `SamModel` in float with SDPA attention, peft LoRA (r=8) on the
  image encoder's Linears and a trainable mask decoder, one forward and backward per step (no subnets).

Each variant runs in a fresh subprocess, one after the other, so that neither inherits the other's allocations. The
peak is taken over steps 2..N, once AdamW's states exist (they are created in step 1): on the CPU from the resident
set (`ru_maxrss`, its high-water mark reset after step 1), on CUDA from `torch.cuda.max_memory_allocated`. The
target is judged on the peak above the memory in use before the model is built: on the CPU that subtracts the Python,
torch and transformers runtime (about 0.5 GiB, the same in both), as CUDA's counter leaves out the CUDA context. The
whole process's peak and the increment over the built model are printed beside it.

    python benchmarks/training_memory.py                      # CPU, ViT-B at 256 px, 2 steps (a few minutes)
    python benchmarks/training_memory.py --image-size 1024 --gradient-checkpointing  # CPU, ViT-B at 1024 px
    python benchmarks/training_memory.py --device cuda --image-size 1024 --steps 3 --gradient-checkpointing --bf16
"""

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import _common

NAME = "training_memory"
VARIANTS = ("lora", "full", "peft")
PAPER_RATIO = 0.82  # "about 18% less training memory" than QFA*
TARGET_RATIO = 0.5
TARGET_RATIO_TO_PEFT = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_arguments(parser, NAME, image_size=256)
    parser.add_argument(
        "--steps", type=int, default=2, help="Optimizer steps; the peak is taken over 2..N (default: 2)."
    )
    parser.add_argument(
        "--subnets",
        choices=("sandwich", "largest"),
        default="sandwich",
        help="What a supernet step trains: the sandwich of 4 subnets (default), or only the largest, the costliest "
        "of them (a quarter of the compute at about the same peak, for slow machines; the adapters of the other "
        "bit-widths then get no gradients nor AdamW states).",
    )
    # Internal: run one variant in this process and write its figures to a file (the parent starts these).
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the peak is measured once optimizer states exist, from step 2 on.")
    return args


def measure_variant(args: argparse.Namespace) -> dict:
    """Builds one variant, trains it for `args.steps` sandwich steps and returns its memory figures (bytes)."""
    device = _common.check_device(args.device)
    gc.collect()
    before_model = _common.current_memory(device)
    sam = _common.build_sam(args.image_size, args.tiny, args.seed)
    config = sam.config
    if args.variant == "peft":
        model = _common.build_peft_model(sam, args.gradient_checkpointing)
    else:
        model = _common.build_supernet(sam)
        del sam  # the supernet holds its own copy of the weights
        if args.variant == "full":
            model.requires_grad_(True)
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable()
    model.to(device).train()
    trainable = _common.trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    inputs = _common.make_inputs(config, args.batch_size, args.prompts, device, args.seed)
    gc.collect()
    after_build = _common.current_memory(device)

    step_seconds = []
    for step in range(args.steps):
        if step == 1:
            _common.reset_peak_memory(device)
        subnets = None if args.variant == "peft" else _common.sandwich_subnets(model, step, args.seed)
        if subnets is not None and args.subnets == "largest":
            subnets = subnets[:1]
        train = functools.partial(_common.train_step, model, optimizer, inputs, subnets, args.bf16)
        step_seconds.append(_common.timed(train, device))
        print(f"  [{args.variant}] step {step + 1}/{args.steps}: {step_seconds[-1]:.1f} s", flush=True)
    peak = _common.peak_memory(device)
    return {
        "variant": args.variant,
        "model": _common.describe_model(config),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trainable_parameters": sum(parameter.numel() for parameter in trainable),
        "memory_before_model_bytes": before_model,
        "memory_after_build_bytes": after_build,
        "peak_bytes": peak,
        "peak_model_and_training_bytes": peak - before_model,
        "training_increment_bytes": peak - after_build,
        "step_seconds": step_seconds,
    }


def child_command(args: argparse.Namespace, variant: str, result_file: Path) -> list[str]:
    """The command line that measures `variant` in a fresh Python process with the same settings."""
    command = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--result-file", str(result_file)]
    command += ["--device", args.device, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    command += ["--prompts", str(args.prompts), "--steps", str(args.steps), "--seed", str(args.seed)]
    command += ["--subnets", args.subnets]
    switches = {"--gradient-checkpointing": args.gradient_checkpointing, "--bf16": args.bf16, "--tiny": args.tiny}
    return command + [flag for flag, on in switches.items() if on]


def child_environment() -> dict:
    """The environment of the measuring processes: glibc told to give freed tensor memory back to the system.

    By default glibc raises its mmap threshold each time a large block is freed, after which tensors of that size come
    from the heap, whose freed pages stay in the resident set: the peak then reflects the allocation history more
    than the tensors alive. A fixed 128 KiB threshold maps every tensor of that size or more on its own and unmaps
    it when freed, in both variants alike. (On CUDA the allocator's own counter is read and this changes nothing.)
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run(args: argparse.Namespace) -> dict:
    """Measures the three variants, each in its own subprocess; returns the figures and the ratios of `lora` to `full`
    and to `peft`."""
    measurements = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in VARIANTS:
            print(f"measuring `{variant}` in a fresh process ...", flush=True)
            result_file = Path(folder) / f"{variant}.json"
            subprocess.run(child_command(args, variant, result_file), check=True, env=child_environment())
            measurements[variant] = json.loads(result_file.read_text())
    return summarize(args, measurements)


def summarize(args: argparse.Namespace, measurements: dict) -> dict:
    """The results of `run` from the figures of each variant (as `measure_variant` returns them)."""
    lora, full, peft = measurements["lora"], measurements["full"], measurements["peft"]
    ratio = lora["peak_model_and_training_bytes"] / full["peak_model_and_training_bytes"]
    ratio_to_peft = lora["peak_model_and_training_bytes"] / peft["peak_model_and_training_bytes"]
    return {
        "benchmark": NAME,
        "machine": _common.machine_info(_common.check_device(args.device)),
        "settings": _common.settings_of(args),
        "measurements": measurements,
        "ratio_peak_model_and_training": ratio,
        "ratio_peak_process": lora["peak_bytes"] / full["peak_bytes"],
        "ratio_increment": lora["training_increment_bytes"] / full["training_increment_bytes"],
        "paper_ratio": PAPER_RATIO,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "ratio_to_peft_peak_model_and_training": ratio_to_peft,
        "target_ratio_to_peft": TARGET_RATIO_TO_PEFT,
        "target_to_peft_met": ratio_to_peft <= TARGET_RATIO_TO_PEFT,
    }


def print_results(results: dict) -> None:
    settings = results["settings"]
    measurements = results["measurements"]
    memory_kind = "GPU tensors allocated" if settings["device"].startswith("cuda") else "process resident set"
    _common.print_header(
        "Peak training memory: LoRA supernet vs full-fine-tuning supernet (QFA*) vs peft LoRA",
        results["machine"],
        {
            "model": measurements["lora"]["model"],
            "memory": memory_kind,
            **{key: settings[key] for key in ("batch_size", "prompts", "steps", "gradient_checkpointing", "bf16")},
            "subnets per supernet step": (
                f"largest, smallest, {_common.RANDOM_SUBNETS_PER_STEP} random"
                if settings["subnets"] == "sandwich"
                else "largest only"
            ),
        },
    )
    rows = [
        [
            name,
            f"{m['trainable_parameters'] / 1e6:.1f}M / {m['parameters'] / 1e6:.1f}M",
            m["memory_before_model_bytes"] / _common.MIB,
            m["memory_after_build_bytes"] / _common.MIB,
            m["peak_bytes"] / _common.MIB,
            m["peak_model_and_training_bytes"] / _common.MIB,
            _common.median(m["step_seconds"][1:]),
        ]
        for name, m in measurements.items()
    ]
    header = ["variant", "trainable / all", "runtime MiB", "after build MiB", "peak MiB", "peak - runtime MiB"]
    _common.print_table(header + ["step s"], rows)
    print(f"ratio LoRA/full of the whole process's peak (runtime included): {results['ratio_peak_process']:.3f}")
    print(f"ratio LoRA/full of the increment over the built model: {results['ratio_increment']:.3f}")
    print(f"paper (LoRA vs QFA*): about {results['paper_ratio']}")
    _common.verdict(
        "ratio LoRA/full of the peak of model and training",
        results["ratio_peak_model_and_training"],
        results["target_ratio"],
    )
    _common.verdict(
        "ratio LoRA supernet/peft LoRA of the peak of model and training",
        results["ratio_to_peft_peak_model_and_training"],
        results["target_ratio_to_peft"],
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        args.result_file.write_text(json.dumps(measure_variant(args)))
        return
    results = run(args)
    print_results(results)
    _common.write_json(args.output, results)


if __name__ == "__main__":
    main()
