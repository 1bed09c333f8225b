"""Both training benchmarks at the paper's scale: SAM ViT-B at 1024 px on one CUDA GPU, in a few minutes.

Runs `training_memory.py` (LoRA supernet vs full-fine-tuning supernet vs peft LoRA fine-tune of the same SAM with
SDPA attention, each in a fresh process) and then `step_time.py` (supernet step vs plain peft LoRA step), both with
bf16 autocast and gradient checkpointing, and prints the three ratios with the GPU's name. It is meant to finish in
under 5 minutes on one H100-class GPU (the run of 2026-11-30 with two memory variants took 1.3 min on an H200).

    python benchmarks/gpu_vit_b.py

Without a CUDA device it stops with exit code 2: on a CPU a ViT-B training step at 1024 px takes minutes, so the
figures would take hours; run `training_memory.py` and `step_time.py` at a small resolution there instead.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import _common
import step_time
import training_memory

NAME = "gpu_vit_b"
EXIT_NO_GPU = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=1024, help="Base input resolution (default: 1024).")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps of the memory benchmark (default: 3).")
    parser.add_argument(
        "--repeats", type=int, default=10, help="Timed rounds of the step-time benchmark (default: 10)."
    )
    parser.add_argument("--warmup", type=int, default=2, help="Warm-up rounds of the step-time benchmark (default: 2).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, the inputs and the subnets drawn.")
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/benchmarks") / f"{NAME}.json", help="Where to write the JSON."
    )
    # Run the GPU code path on the CPU (with `--tiny --image-size 128`), to check it end to end without a GPU.
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def benchmark_argv(args: argparse.Namespace, device: str) -> list[str]:
    """The command-line flags shared by both benchmarks; their own parsers fill in the rest."""
    argv = ["--device", device, "--image-size", str(args.image_size), "--seed", str(args.seed)]
    return argv + ["--gradient-checkpointing", "--bf16"] + (["--tiny"] if args.tiny else [])


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            f"gpu_vit_b.py needs a CUDA GPU, and torch {torch.__version__} sees none. On a CPU, run "
            "benchmarks/training_memory.py and benchmarks/step_time.py (small resolutions by default) instead.",
            file=sys.stderr,
        )
        sys.exit(EXIT_NO_GPU)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()

    memory_args = training_memory.parse_args(benchmark_argv(args, device) + ["--steps", str(args.steps)])
    memory = training_memory.run(memory_args)
    training_memory.print_results(memory)
    print()
    time_args = step_time.parse_args(
        benchmark_argv(args, device) + ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    )
    timing = step_time.run(time_args)
    step_time.print_results(timing)

    elapsed = time.perf_counter() - start
    machine = timing["machine"]
    print(f"\n== Summary on {machine['gpu'] or 'CPU ' + machine['cpu']} ({timing['model']}), {elapsed / 60:.1f} min")
    _common.verdict(
        "memory LoRA/full, peak of model and training", memory["ratio_peak_model_and_training"], memory["target_ratio"]
    )
    _common.verdict(
        "memory LoRA supernet/peft LoRA, peak of model and training",
        memory["ratio_to_peft_peak_model_and_training"],
        memory["target_ratio_to_peft"],
    )
    _common.verdict(
        "step time supernet (1 random subnet)/LoRA", timing["ratios_to_peft"]["subnet"], timing["target_ratio"]
    )
    _common.write_json(
        args.output,
        {
            "benchmark": NAME,
            "machine": machine,
            "wall_seconds": elapsed,
            "training_memory": memory,
            "step_time": timing,
        },
    )


if __name__ == "__main__":
    main()
