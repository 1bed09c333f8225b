"""The plot of a Pareto front (matplotlib), imported only when a front is drawn."""

import os
from collections.abc import Sequence
from pathlib import Path

# The object-oriented API with no pyplot keeps the global backend and figure registry untouched; a bare `Figure`
# renders with Agg.
from matplotlib.figure import Figure

from ..bitops import format_bitops, parse_budget


def plot_pareto_front(
    front,
    path: str | os.PathLike,
    title: str | None = None,
    budgets: Sequence[float | str] = (),
) -> Path:
    """Draws mean IoU against the front's cost (BitOPs, or predicted milliseconds for a front searched with a latency
    model; log scale) and saves the figure (PNG, or any format matplotlib infers).

    The front is a step line (the best mean IoU any budget buys), every evaluated architecture a faint dot, the
    full-precision model a star (a dotted line when its mean IoU was not measured), and each budget a vertical
    dashed line.

    Args:
        front (`ParetoFront`): the front to draw.
        path (`str` or `os.PathLike`): where to save the figure.
        title (`str`, *optional*): defaults to "Pareto front" and the base model's name.
        budgets (`Sequence`): budgets to mark in the front's cost: BitOPs (numbers, or strings for `parse_budget`)
            or milliseconds.
    """
    latency = front.objective == "latency_ms"
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    if front.evaluated:
        axes.scatter(
            [entry.cost(front.objective) for entry in front.evaluated],
            [entry.mean_iou for entry in front.evaluated],
            s=12,
            color="tab:gray",
            alpha=0.3,
            label=f"evaluated ({len(front.evaluated)})",
        )
    if front.entries:
        bitops = [entry.cost(front.objective) for entry in front.entries]
        mean_ious = [entry.mean_iou for entry in front.entries]
        axes.step(bitops, mean_ious, where="post", color="tab:blue", linewidth=1.5)
        axes.plot(bitops, mean_ious, "o", color="tab:blue", label=f"Pareto front ({len(front.entries)})")
    if front.full_precision_bitops is not None and not latency:
        if front.full_precision_mean_iou is not None:
            axes.plot(
                front.full_precision_bitops,
                front.full_precision_mean_iou,
                "*",
                markersize=14,
                color="tab:red",
                label="full precision",
            )
            axes.annotate(
                "FP",
                (front.full_precision_bitops, front.full_precision_mean_iou),
                textcoords="offset points",
                xytext=(6, 6),
                color="tab:red",
            )
        else:
            axes.axvline(front.full_precision_bitops, color="tab:red", linestyle=":", label="full precision")
    for budget in budgets:
        value = float(budget) if latency else parse_budget(budget, front.full_precision_bitops, name="budget")
        text = f"{value:g} ms" if latency else format_bitops(value)
        axes.axvline(value, color="tab:green", linestyle="--", linewidth=1, label=f"budget {text}")
    axes.set_xscale("log")
    machine = front.metadata.get("latency_model") or {}
    axes.set_xlabel(
        f"predicted ms per image (image encoder; {machine.get('runtime')}, {machine.get('num_threads')} threads, "
        f"{machine.get('cpu')})" if latency else "BitOPs per image (image encoder)"
    )
    axes.set_ylabel("mean IoU")
    base_model = front.metadata.get("base_model")
    axes.set_title(title or ("Pareto front" + (f": {base_model}" if base_model else "")))
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    return path
