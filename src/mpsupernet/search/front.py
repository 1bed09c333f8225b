"""The Pareto front of a search: evaluated architectures, non-dominated sorting and the front's JSON file.

This module needs numpy and no optimiser or plotting library, so that the consumers of a saved front (extraction,
the Hub helpers, `mpsupernet extract`) load it without pymoo or matplotlib.
"""

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..architecture import SubnetArchitecture
from ..atomic import write_file_atomic
from ..bitops import parse_budget

PARETO_FRONT_FORMAT_VERSION = 1
TABLE_COLUMNS = ("GBitOPs", "% of FP", "% of W8A8", "mIoU")


# --- dominance ---------------------------------------------------------------------------------------------------
def non_dominated_mask(objectives: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Which points no other point dominates, every objective minimised.

    A point dominates another when it is no worse in every objective and better in at least one. Points with equal
    objectives do not dominate each other, so all copies of a non-dominated point are kept.

    Args:
        objectives (array-like of shape `(num_points, num_objectives)`): the objective values, lower is better.

    Returns:
        `np.ndarray` of `bool`, shape `(num_points,)`: `True` for the non-dominated points.
    """
    points = np.asarray(objectives, dtype=float)
    if points.ndim != 2:
        raise ValueError(
            f"`objectives` must be a 2-D array (points x objectives), got an array of shape {points.shape}."
        )
    if np.isnan(points).any():
        raise ValueError("`objectives` holds NaN; every point needs a value for every objective.")
    mask = np.ones(len(points), dtype=bool)
    for index, point in enumerate(points):
        no_worse = np.all(points <= point, axis=1)
        better = np.any(points < point, axis=1)
        mask[index] = not np.any(no_worse & better)
    return mask


# --- the Pareto front --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParetoEntry:
    """One evaluated architecture: what it is, what it costs and how well it segments.

    Attributes:
        architecture (`dict`): `SubnetArchitecture.to_dict()` of the subnet.
        bitops (`int`): BitOPs of the image encoder for one image.
        mean_iou (`float`): mean mask IoU on the search's validation data.
        macs (`int`, *optional*): multiply-accumulates of the image encoder for one image.
    """

    architecture: dict
    bitops: int
    mean_iou: float
    macs: int | None = None

    def to_architecture(self) -> SubnetArchitecture:
        """The architecture as a `SubnetArchitecture` (for `set_subnet` or extraction)."""
        return SubnetArchitecture.from_dict(self.architecture)

    def to_dict(self) -> dict:
        return {"bitops": self.bitops, "mean_iou": self.mean_iou, "macs": self.macs, "architecture": self.architecture}

    @classmethod
    def from_dict(cls, data: dict) -> "ParetoEntry":
        """Reads `to_dict`'s output; raises a `ValueError` naming a missing key."""
        missing = [key for key in ("architecture", "bitops", "mean_iou") if key not in data]
        if missing:
            raise ValueError(
                f"A Pareto entry lacks {missing}; it needs 'architecture', 'bitops' and 'mean_iou': {data!r}."
            )
        return cls(
            architecture=data["architecture"],
            bitops=int(data["bitops"]),
            mean_iou=float(data["mean_iou"]),
            macs=None if data.get("macs") is None else int(data["macs"]),
        )


class ParetoFront:
    """The architectures that no other evaluated architecture beats in both BitOPs and mean IoU.

    Args:
        candidates (`Iterable[ParetoEntry]`): evaluated architectures; the dominated ones are dropped.
        evaluated (`Iterable[ParetoEntry]`, *optional*): every architecture the search evaluated (the plot shows
            them); defaults to `candidates`.
        metadata (`dict`, *optional*): where the front comes from. `evolutionary_search` and `run_search` fill:
            `supernet` (the name or path it was loaded from), `base_model` and `training_dataset` (its provenance:
            `config.base_model_name_or_path` and `config.training_dataset`), `dataset` (what the search measured on: `{"name", "size"}`), `full_precision`
            (`{"bitops", "macs", "mean_iou"}`, `mean_iou` `None` when not measured), `w8a8_bitops` (the uniform W8A8
            reference), `date` (ISO 8601, UTC) and `search` (the search settings and the number of evaluations).

    Attributes:
        entries (`list[ParetoEntry]`): the front, by increasing BitOPs (and so increasing mean IoU).
    """

    def __init__(
        self,
        candidates: Iterable[ParetoEntry],
        *,
        evaluated: Iterable[ParetoEntry] | None = None,
        metadata: dict | None = None,
    ):
        candidates = list(candidates)
        self.evaluated = list(evaluated) if evaluated is not None else candidates
        self.metadata = dict(metadata or {})
        if candidates:
            keep = non_dominated_mask([(entry.bitops, -entry.mean_iou) for entry in candidates])
            candidates = [entry for entry, kept in zip(candidates, keep) if kept]
        self.entries = sorted(candidates, key=lambda entry: (entry.bitops, -entry.mean_iou))

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"ParetoFront({len(self.entries)} entries of {len(self.evaluated)} evaluated)"

    # --- references -------------------------------------------------------------------------------------------
    @property
    def full_precision_bitops(self) -> int | None:
        """BitOPs of the full-precision model, from the metadata."""
        return (self.metadata.get("full_precision") or {}).get("bitops")

    @property
    def full_precision_mean_iou(self) -> float | None:
        """Mean IoU of the full-precision model, from the metadata (`None` when it was not measured)."""
        return (self.metadata.get("full_precision") or {}).get("mean_iou")

    @property
    def w8a8_bitops(self) -> int | None:
        """BitOPs of the full-size model at uniform W8A8, from the metadata."""
        return self.metadata.get("w8a8_bitops")

    # --- queries ----------------------------------------------------------------------------------------------
    def best_under(self, max_bitops: float | str) -> ParetoEntry | None:
        """The entry with the highest mean IoU at or under a BitOPs budget, or `None` when none fits.

        Args:
            max_bitops (`int`, `float` or `str`): the budget in BitOPs, or a string that
                `mpsupernet.bitops.parse_budget` reads ("120G", "5%"; a share needs `full_precision_bitops`).
        """
        budget = parse_budget(max_bitops, self.full_precision_bitops, name="max_bitops")
        fitting = [entry for entry in self.entries if entry.bitops <= budget]
        return max(fitting, key=lambda entry: entry.mean_iou, default=None)

    def to_table(self) -> list[dict]:
        """The front as rows for printing, cheapest first, with the columns of `TABLE_COLUMNS`.

        `GBitOPs` is rounded to 4 significant digits, the shares of the full-precision and W8A8 references to 0.01%
        (`None` when the metadata lacks the reference), the mean IoU to 4 decimals.
        """
        rows = []
        for entry in self.entries:
            values = (
                float(f"{entry.bitops / 1e9:.4g}"),
                _percent(entry.bitops, self.full_precision_bitops),
                _percent(entry.bitops, self.w8a8_bitops),
                round(entry.mean_iou, 4),
            )
            rows.append(dict(zip(TABLE_COLUMNS, values)))
        return rows

    # --- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": PARETO_FRONT_FORMAT_VERSION,
            "metadata": self.metadata,
            "entries": [entry.to_dict() for entry in self.entries],
            "evaluated": [entry.to_dict() for entry in self.evaluated],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the front, every evaluated point and the metadata as JSON, crash-safely; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ParetoFront":
        """Reads a front written by `save`; raises a `ValueError` naming the file and what is wrong with it."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(path)!r} is not a JSON file written by ParetoFront.save: {error}.") from error
        if not isinstance(data, dict) or "entries" not in data:
            raise ValueError(
                f"{str(path)!r} is not a Pareto front: it needs an 'entries' list (written by ParetoFront.save)."
            )
        version = data.get("format_version", PARETO_FRONT_FORMAT_VERSION)
        if version != PARETO_FRONT_FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has format_version {version!r}; this mpsupernet reads version {PARETO_FRONT_FORMAT_VERSION}."
            )
        entries = [ParetoEntry.from_dict(item) for item in data["entries"]]
        evaluated = [ParetoEntry.from_dict(item) for item in data.get("evaluated", data["entries"])]
        return cls(entries, evaluated=evaluated, metadata=data.get("metadata"))

    # --- drawing ------------------------------------------------------------------------------------------------
    def plot(
        self,
        path: str | os.PathLike,
        title: str | None = None,
        budgets: Sequence[float | str] = (),
    ) -> Path:
        """Draws the front with matplotlib and saves the figure; see `mpsupernet.search.plot.plot_pareto_front`."""
        # Imported here: reading, querying and saving a front must not need matplotlib.
        from .plot import plot_pareto_front

        return plot_pareto_front(self, path, title=title, budgets=budgets)


def _percent(value: int, reference: int | None) -> float | None:
    return None if not reference else round(100.0 * value / reference, 2)
