"""Helpers shared by the training benchmarks: models, inputs, one training step, timing, memory and reporting.

The benchmarks compare two ways of training on the same machine in the same run and report ratios, because the
machines they run on are shared and noisy: an absolute second or megabyte measured today says little tomorrow, a
ratio measured side by side does.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import SamModel

from mpsupernet import SamSupernetForMaskGeneration, SubnetArchitecture
from mpsupernet.data import low_res_mask_size
from mpsupernet.runtime import cpu_model
from mpsupernet.testing_utils import make_sam_config, make_vit_b_sam_config
from mpsupernet.training import SandwichSampler, sam_loss

MIB = 2**20
RANDOM_SUBNETS_PER_STEP = 2
"""The sandwich rule of supernet training: the largest subnet, the smallest, and this many random ones per step."""
TRAINING_FRACTION = 1.0
"""Where in training the subnets are drawn: at the end, every bit-width of the progressive schedule is enabled."""


# --- command line ----------------------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, name: str, image_size: int) -> None:
    """The flags every benchmark shares: where it runs, the model and input sizes, precision and the output file."""
    parser.add_argument("--device", default="cpu", help="`cpu` or `cuda` (default: cpu).")
    parser.add_argument(
        "--image-size", type=int, default=image_size, help=f"Base input resolution in pixels (default: {image_size})."
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Images per step (default: 1).")
    parser.add_argument("--prompts", type=int, default=4, help="Box prompts per image (default: 4).")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Recompute each encoder block in the backward pass (applied to every variant alike).",
    )
    parser.add_argument("--bf16", action="store_true", help="Run forward passes under bf16 autocast.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, the inputs and the subnets drawn.")
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/benchmarks") / f"{name}.json", help="Where to write the JSON."
    )
    # A test-size SAM instead of ViT-B, so that a GPU-only code path can be run end to end on a CPU in seconds.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def check_device(name: str) -> torch.device:
    """The requested device, or a clear error if it is CUDA and no CUDA device is present."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was requested but torch {torch.__version__} sees no CUDA device.")
    return device


# --- models and inputs -----------------------------------------------------------------------------------------------
def make_config(image_size: int, tiny: bool = False):
    """A SAM ViT-B configuration (or the test-size one) at `image_size`.

    `make_vit_b_sam_config` fixes the resolution at 1024, and transformers derives the prompt encoder's
    `image_embedding_size` when the config is built, so a smaller resolution is set on both sub-configs and on that
    derived value; otherwise the prompt encoder's dense grid would no longer match the image embedding.
    """
    if tiny:
        return make_sam_config(image_size=image_size, attn_implementation="sdpa")
    config = make_vit_b_sam_config(attn_implementation="sdpa")
    prompt = config.prompt_encoder_config
    config.vision_config.image_size = prompt.image_size = image_size
    prompt.image_embedding_size = image_size // prompt.patch_size
    return config


def describe_model(config) -> str:
    vision = config.vision_config
    return (
        f"SAM image encoder hidden {vision.hidden_size}, {vision.num_hidden_layers} blocks, "
        f"{vision.num_attention_heads} heads, at {vision.image_size} px"
    )


def build_sam(image_size: int, tiny: bool, seed: int) -> SamModel:
    """A random-weight SAM (ViT-B unless `tiny`); random weights cost the same time and memory as trained ones."""
    torch.manual_seed(seed)
    return SamModel(make_config(image_size, tiny))


def build_supernet(sam: SamModel) -> SamSupernetForMaskGeneration:
    """Our LoRA supernet of `sam`: frozen base, adapters, step sizes and the mask decoder trainable."""
    return SamSupernetForMaskGeneration.from_sam(sam, attn_implementation="sdpa")


LORA_RANK, LORA_ALPHA = 8, 16
"""The plain LoRA baseline's adapters (peft's usual r=8, alpha=16)."""
# peft matches a string `target_modules` with `re.fullmatch` against the whole module name, so this selects the
# image encoder's Linears and not the mask decoder's own `mlp.lin1/lin2`.
PEFT_TARGET_MODULES = r"vision_encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(lin1|lin2))"


def build_peft_model(sam: SamModel, gradient_checkpointing: bool) -> torch.nn.Module:
    """`sam` with peft LoRA adapters on the image encoder and a trainable mask decoder: what a user would otherwise
    run (SAM's own attention, in SDPA where `sam` was built with it).

    The decoder is unfrozen in place rather than through `modules_to_save`, which would train a copy of it: the
    supernet trains its decoder in place too.
    """
    from peft import LoraConfig, get_peft_model  # the `benchmarks` extra

    if gradient_checkpointing:
        sam.activation_checkpointing_enable()
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=PEFT_TARGET_MODULES)
    model = get_peft_model(sam, config)
    wrapped = [name for name, module in model.named_modules() if name.endswith(".base_layer")]
    expected = 4 * sam.config.vision_config.num_hidden_layers
    if len(wrapped) != expected:
        raise RuntimeError(f"peft wrapped {len(wrapped)} Linears, expected {expected} (4 per encoder block): {wrapped}")
    sam.mask_decoder.requires_grad_(True)
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def make_inputs(config, batch_size: int, prompts: int, device: torch.device, seed: int) -> dict:
    """Images, box prompts and binary targets in the frame of `pred_masks`, as the training collator gives them.

    Each target is the box filled in, so the loss has a foreground to find; its content does not change the cost.
    """
    image_size = config.vision_config.image_size
    mask_size = low_res_mask_size(image_size, config.vision_config.patch_size)
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch_size, prompts, 2, 2, generator=generator).sort(dim=2).values * image_size
    boxes = corners.permute(0, 1, 3, 2).reshape(batch_size, prompts, 4)[..., [0, 2, 1, 3]]
    scale = mask_size / image_size
    grid = torch.arange(mask_size) + 0.5
    inside_x = (grid >= boxes[..., 0, None] * scale) & (grid <= boxes[..., 2, None] * scale)
    inside_y = (grid >= boxes[..., 1, None] * scale) & (grid <= boxes[..., 3, None] * scale)
    targets = (inside_y[..., :, None] & inside_x[..., None, :]).float()
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
        "input_boxes": boxes.to(device),
        "ground_truth_masks": targets.to(device),
    }


def sandwich_subnets(model: SamSupernetForMaskGeneration, step: int, seed: int) -> list[SubnetArchitecture]:
    """The subnets supernet training trains at `step`: largest, smallest, then the random ones.

    They are drawn by training's own `SandwichSampler`, so the same `step` and `seed` give the same subnets in every
    process, and the benchmark trains what training trains.
    """
    sampler = SandwichSampler(model.config, num_random_subnets=RANDOM_SUBNETS_PER_STEP, seed=seed)
    return list(sampler.sample(step, TRAINING_FRACTION).values())


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: dict,
    subnets: list[SubnetArchitecture] | None = None,
    bf16: bool = False,
) -> float:
    """One optimizer step: forward, SAM's loss, backward (gradients accumulated over `subnets`), update.

    `subnets=None` trains `model` as it is (a plain SAM with peft adapters); otherwise each subnet is activated in
    turn and contributes its share of the loss. Returns the loss.
    """
    device = inputs["pixel_values"].device
    runs = subnets or [None]
    total = 0.0
    for subnet in runs:
        if subnet is not None:
            model.set_subnet(subnet)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(
                pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=True
            )
        loss = sam_loss(outputs.pred_masks.float(), outputs.iou_scores.float(), inputs["ground_truth_masks"]).loss
        (loss / len(runs)).backward()
        total += loss.item() / len(runs)
    optimizer.step()
    # Gradients are freed here rather than at the next step, so that memory between steps holds no gradients.
    optimizer.zero_grad(set_to_none=True)
    return total


# --- timing and memory -----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that a wall-clock reading covers the work itself and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_rounds(
    functions: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds each function takes in each of `rounds` timed rounds, after `warmup` untimed ones.

    Every round calls each function once, in order (A B C, A B C, ...), so that a slow spell of a shared machine
    hits all of them alike and per-round ratios cancel it.
    """
    seconds = {name: [] for name in functions}
    for round_index in range(warmup + rounds):
        for name, function in functions.items():
            elapsed = timed(function, device)
            if round_index >= warmup:
                seconds[name].append(elapsed)
    return seconds


def current_memory(device: torch.device) -> int:
    """Bytes in use now: the resident set of this process on the CPU, the tensors allocated on a GPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(device: torch.device) -> None:
    """Restarts the peak-memory counter from the current use.

    On the CPU, writing 5 to `/proc/self/clear_refs` resets the kernel's resident-set high-water mark, which is what
    `getrusage(RUSAGE_SELF).ru_maxrss` reports for a running process: without it the peak would be that of building
    the model (the source SAM and the supernet exist side by side for a moment) rather than that of training.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since the last `reset_peak_memory`: `ru_maxrss` on the CPU, `max_memory_allocated` on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# --- reporting -------------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: CPU model, GPU name, library versions, threads and the date."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_header(title: str, machine: dict, settings: dict) -> None:
    print(f"== {title}")
    hardware = (
        machine["gpu"] or f"CPU {machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} threads)"
    )
    print(f"machine: {hardware}; torch {machine['torch']}, transformers {machine['transformers']}; {machine['date']}")
    print("settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))


def print_table(header: list[str], rows: list[list]) -> None:
    """A plain-text table: the first column left-aligned, numbers right-aligned."""
    cells = [header] + [[f"{value:.3f}" if isinstance(value, float) else str(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def verdict(name: str, ratio: float, target: float) -> None:
    """Prints `ratio` and whether it meets `target` (at most)."""
    print(f"{name}: {ratio:.3f} (target <= {target}): {'MET' if ratio <= target else 'NOT MET'}")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results written to {path}")


def settings_of(args: argparse.Namespace) -> dict:
    """The command-line settings as JSON-friendly values."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
