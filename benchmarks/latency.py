"""CPU latency of extracted subnets against the full-precision model, beside their MACs and BitOPs ratios.

    python benchmarks/latency.py [--budgets 5% 10% 25% 50%] [--repeats 15]

Subnets are extracted from the embedded default's supernet along the cost-only descent (no search needed for a
latency figure), and each is timed against the plain float `SamModel` in interleaved repetitions (A B A B ...), so that
machine noise hits both alike; the median ratio is reported. Only the image encoder is timed, as only it changes.

Extracted subnets keep integer weight codes but run them through dequantized float matmuls, with activations
fake-quantized in float: their speed-up can only come from skipped blocks, narrower layers and a lower resolution
(the MACs ratio), never from the bits. The gap between the latency ratio and the MACs ratio is the overhead of doing
quantization in floating point.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, median, print_header, print_table, settings_of, timed, write_json  # noqa: E402

from mpsupernet import SamSupernetForMaskGeneration  # noqa: E402
from mpsupernet.pretrained import load_embedded_sam  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["5%", "10%", "25%", "50%"], help="BitOPs budgets to extract")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per model (median reported)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmarks/latency.json"))
    args = parser.parse_args()
    device = torch.device("cpu")
    machine = machine_info(device)
    print_header("Latency of extracted subnets vs the full model (image encoder, CPU)", machine, settings_of(args))

    sam = load_embedded_sam().eval()
    supernet = SamSupernetForMaskGeneration.from_sam(sam).eval()
    size = sam.config.vision_config.image_size
    pixel_values = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    supernet.calibrate_quantizers(pixel_values)
    full_macs = supernet.bitops_report(supernet.full_precision_subnet()).total_macs

    def run_full():
        sam.get_image_embeddings(pixel_values)

    rows, results = [], []
    with torch.inference_mode():
        for budget in args.budgets:
            subnet = supernet.extract_subnet(budget).eval()
            report = subnet.bitops_report()

            def run_subnet(subnet=subnet):
                subnet.get_image_embeddings(pixel_values)

            run_full(), run_subnet()  # warm-up: caches, allocator, dequantized weights
            ratios = []
            for _ in range(args.repeats):
                full_seconds = timed(run_full, device)
                ratios.append(timed(run_subnet, device) / full_seconds)
            latency_ratio = median(ratios)
            macs_ratio = report.total_macs / full_macs
            arch = subnet.config.architecture
            rows.append(
                [
                    budget,
                    f"{100 * report.summary()['share_of_full_precision']:.2f}%",
                    round(macs_ratio, 3),
                    round(latency_ratio, 3),
                    f"{arch['resolution']}px, {arch['depth']} blocks",
                ]
            )
            results.append(
                {
                    "budget": budget,
                    "bitops": report.total_bitops,
                    "share_of_full_precision": report.summary()["share_of_full_precision"],
                    "macs_ratio": macs_ratio,
                    "latency_ratio": latency_ratio,
                    "architecture": arch,
                }
            )
    print_table(["budget", "BitOPs vs FP", "MACs ratio", "latency ratio", "subnet"], rows)
    write_json(args.output, {"machine": machine, "settings": settings_of(args), "results": results})


if __name__ == "__main__":
    main()
