"""Evolutionary multi-objective search over subnet architectures, and the Pareto front it finds.

The search minimises two objectives at once, BitOPs (analytic, free: `SamSupernetForMaskGeneration.bitops`) and
minus the mean IoU of a subnet on validation data (measured, expensive), with an optional BitOPs budget as a hard
constraint. It runs pymoo's NSGA-II (or SMS-EMOA) on an integer encoding of `SubnetArchitecture`
(`ArchitectureEncoding`) and returns a `ParetoFront`: the non-dominated architectures among all those evaluated, kept
as JSON and drawn as a plot.
"""

import contextlib
import json
import math
import numbers
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.sms import SMSEMOA
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from tqdm.auto import tqdm
from transformers.utils import logging

from .bitops import BitOpsReport, format_bitops
from .search_space import SearchSpace, SubnetArchitecture

logger = logging.get_logger(__name__)

ALGORITHMS = {"nsga2": NSGA2, "smsemoa": SMSEMOA}
"""The pymoo algorithms `evolutionary_search` can run, by name."""

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
            `base_model` (name or path of the supernet), `dataset` (`{"name", "size"}`), `full_precision`
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
        budget = _resolve_budget(max_bitops, self.full_precision_bitops, name="max_bitops")
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
        """Writes the front, every evaluated point and the metadata as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ParetoFront":
        """Reads a front written by `save`; raises a `ValueError` naming the file and what is wrong with it."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
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
        """Draws mean IoU against BitOPs (log scale) and saves the figure (PNG, or any format matplotlib infers).

        The front is a step line (the best mean IoU any budget buys), every evaluated architecture a faint dot, the
        full-precision model a star (a dotted line when its mean IoU was not measured), and each budget a vertical
        dashed line.

        Args:
            path (`str` or `os.PathLike`): where to save the figure.
            title (`str`, *optional*): defaults to "Pareto front" and the base model's name.
            budgets (`Sequence`): BitOPs budgets to mark (numbers, or strings for `parse_budget`).
        """
        # The object-oriented API with no pyplot keeps the global backend and figure registry untouched; a bare
        # `Figure` renders with Agg.
        from matplotlib.figure import Figure

        figure = Figure(figsize=(8, 5), layout="constrained")
        axes = figure.add_subplot()
        if self.evaluated:
            axes.scatter(
                [entry.bitops for entry in self.evaluated],
                [entry.mean_iou for entry in self.evaluated],
                s=12,
                color="tab:gray",
                alpha=0.3,
                label=f"evaluated ({len(self.evaluated)})",
            )
        if self.entries:
            bitops = [entry.bitops for entry in self.entries]
            mean_ious = [entry.mean_iou for entry in self.entries]
            axes.step(bitops, mean_ious, where="post", color="tab:blue", linewidth=1.5)
            axes.plot(bitops, mean_ious, "o", color="tab:blue", label=f"Pareto front ({len(self.entries)})")
        if self.full_precision_bitops is not None:
            if self.full_precision_mean_iou is not None:
                axes.plot(
                    self.full_precision_bitops,
                    self.full_precision_mean_iou,
                    "*",
                    markersize=14,
                    color="tab:red",
                    label="full precision",
                )
                axes.annotate(
                    "FP",
                    (self.full_precision_bitops, self.full_precision_mean_iou),
                    textcoords="offset points",
                    xytext=(6, 6),
                    color="tab:red",
                )
            else:
                axes.axvline(self.full_precision_bitops, color="tab:red", linestyle=":", label="full precision")
        for budget in budgets:
            value = _resolve_budget(budget, self.full_precision_bitops, name="budget")
            axes.axvline(value, color="tab:green", linestyle="--", linewidth=1, label=f"budget {format_bitops(value)}")
        axes.set_xscale("log")
        axes.set_xlabel("BitOPs per image (image encoder)")
        axes.set_ylabel("mean IoU")
        base_model = self.metadata.get("base_model")
        axes.set_title(title or ("Pareto front" + (f": {base_model}" if base_model else "")))
        axes.grid(True, which="both", alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="lower right")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=150)
        return path


def _percent(value: int, reference: int | None) -> float | None:
    return None if not reference else round(100.0 * value / reference, 2)


def _resolve_budget(budget: float | str, full_precision_bitops: int | None, name: str = "budget") -> int:
    """A BitOPs budget as a positive integer.

    Args:
        budget (`int`, `float` or `str`): a number of BitOPs, or a string that `mpsupernet.bitops.parse_budget`
            reads ("120G", "1.5T", "5%").
        full_precision_bitops (`int`, *optional*): the reference of a budget given as a share.
        name (`str`): the argument's name, for the error message.
    """
    if isinstance(budget, str):
        # Imported here: `parse_budget` belongs to bitops.py and must not be needed to import this module.
        from .bitops import parse_budget

        budget = parse_budget(budget, full_precision_bitops)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget > 0 or math.isinf(budget):
        raise ValueError(
            f"`{name}` must be a positive number of BitOPs or a budget string like '120G' or '5%', got {budget!r}."
        )
    return int(budget)


# --- the encoding --------------------------------------------------------------------------------------------------
class ArchitectureEncoding:
    """A `SubnetArchitecture` as a vector of integer choice indices, the genotype the evolutionary search works on.

    Genes, in order: resolution, depth, attention heads per block, MLP width per block, then weight bits and
    activation bits per quantized layer (per encoder block under `bit_granularity="block"`, so that every genotype is
    a valid architecture). Each gene is an index into the search space's choices, which are sorted from largest to
    smallest: index 0 is the largest (or highest-bit) choice, and a larger index never costs more BitOPs. That order
    lets pymoo's numeric operators (SBX, polynomial mutation) make children whose cost is near their parents'.

    `decode` returns canonical architectures (`SearchSpace.canonical`), so the genes of skipped blocks do not matter;
    `canonicalize` rewrites a genotype to the canonical one, which makes equal architectures equal genotypes.
    The float bit-width (32) is not a search choice: the full-precision model cannot be encoded.

    Args:
        space (`SearchSpace`): the search space to encode.
    """

    def __init__(self, space: SearchSpace):
        self.space = space
        self.per_block_bits = space.config.bit_granularity == "block"
        # Blocks without quantized layers have no bits to choose.
        self.bit_blocks = tuple(sorted(set(space.layer_blocks)))
        bit_units = [f"block {block}" for block in self.bit_blocks] if self.per_block_bits else list(space.layer_names)
        blocks = range(space.num_blocks)
        self.gene_names = tuple(
            ["resolution", "depth"]
            + [f"num_heads of block {block}" for block in blocks]
            + [f"mlp_dim of block {block}" for block in blocks]
            + [f"weight_bits of {unit}" for unit in bit_units]
            + [f"activation_bits of {unit}" for unit in bit_units]
        )
        self.gene_choices = tuple(
            [space.resolution_choices, space.depth_choices]
            + [space.num_heads_choices] * space.num_blocks
            + [space.mlp_dim_choices] * space.num_blocks
            + [space.weight_bit_choices] * len(bit_units)
            + [space.activation_bit_choices] * len(bit_units)
        )
        self.num_bit_units = len(bit_units)

    @property
    def num_genes(self) -> int:
        return len(self.gene_names)

    @property
    def lower(self) -> np.ndarray:
        """Lowest index of every gene (all zeros)."""
        return np.zeros(self.num_genes, dtype=int)

    @property
    def upper(self) -> np.ndarray:
        """Highest index of every gene."""
        return np.array([len(choices) - 1 for choices in self.gene_choices], dtype=int)

    def encode(self, arch: SubnetArchitecture) -> np.ndarray:
        """The genotype of `arch` (canonicalised and checked against the space first)."""
        self.space.validate(arch)
        arch = self.space.canonical(arch)
        if self.per_block_bits:
            first_layer = {block: self.space.layer_blocks.index(block) for block in self.bit_blocks}
            weight_bits = [arch.weight_bits[first_layer[block]] for block in self.bit_blocks]
            activation_bits = [arch.activation_bits[first_layer[block]] for block in self.bit_blocks]
        else:
            weight_bits, activation_bits = list(arch.weight_bits), list(arch.activation_bits)
        values = (
            [arch.resolution, arch.depth] + list(arch.num_heads) + list(arch.mlp_dims) + weight_bits + activation_bits
        )
        genes = []
        for name, choices, value in zip(self.gene_names, self.gene_choices, values):
            if value not in choices:
                raise ValueError(
                    f"The {name} is {value}, which is not a search choice ({list(choices)}); the full-precision "
                    "(32-bit) model is outside the search."
                )
            genes.append(choices.index(value))
        return np.array(genes, dtype=int)

    def decode(self, genes: Sequence[int] | np.ndarray) -> SubnetArchitecture:
        """The canonical architecture of a genotype; raises a `ValueError` naming a gene out of its range."""
        genes = np.asarray(genes)
        if genes.shape != (self.num_genes,):
            raise ValueError(
                f"A genotype of this space has {self.num_genes} genes, got an array of shape {genes.shape}."
            )
        if not np.array_equal(genes, np.round(genes)):
            raise ValueError(f"Genes must be integer choice indices, got {genes.tolist()}.")
        values = []
        for name, choices, gene in zip(self.gene_names, self.gene_choices, genes.astype(int).tolist()):
            if not 0 <= gene < len(choices):
                raise ValueError(
                    f"The gene of the {name} is {gene}; allowed: 0 to {len(choices) - 1} (for {list(choices)})."
                )
            values.append(choices[gene])
        space, num_blocks, units = self.space, self.space.num_blocks, self.num_bit_units
        resolution, depth = values[0], values[1]
        num_heads = tuple(values[2 : 2 + num_blocks])
        mlp_dims = tuple(values[2 + num_blocks : 2 + 2 * num_blocks])
        weight_bits = values[2 + 2 * num_blocks : 2 + 2 * num_blocks + units]
        activation_bits = values[2 + 2 * num_blocks + units :]
        if self.per_block_bits:
            unit_of_block = {block: unit for unit, block in enumerate(self.bit_blocks)}
            weight_bits = [weight_bits[unit_of_block[block]] for block in space.layer_blocks]
            activation_bits = [activation_bits[unit_of_block[block]] for block in space.layer_blocks]
        arch = SubnetArchitecture(
            resolution=resolution,
            skipped_blocks=space.skipped_blocks(depth),
            num_heads=num_heads,
            mlp_dims=mlp_dims,
            layer_names=space.layer_names,
            weight_bits=tuple(weight_bits),
            activation_bits=tuple(activation_bits),
        )
        arch = space.canonical(arch)
        space.validate(arch)
        return arch

    def canonicalize(self, genes: Sequence[int] | np.ndarray) -> np.ndarray:
        """The genotype of the canonical architecture that `genes` decodes to."""
        return self.encode(self.decode(genes))


class _CanonicalRepair(Repair):
    """Rounds and clips offspring to valid indices, then canonicalises them.

    pymoo eliminates duplicate offspring by comparing genotypes after the repair, so canonical genotypes make it
    drop offspring that are the same architecture as another one.
    """

    def __init__(self, encoding: ArchitectureEncoding):
        super().__init__()
        self.encoding = encoding

    def _do(self, problem, X, **kwargs):
        genes = np.clip(np.rint(X.astype(float)), self.encoding.lower, self.encoding.upper).astype(int)
        return np.stack([self.encoding.canonicalize(row) for row in genes])


# --- evaluation ----------------------------------------------------------------------------------------------------
class _Evaluations:
    """Prices architectures (analytically) and scores those within the budget (through `evaluate`), each once."""

    def __init__(self, supernet, evaluate, max_bitops: int | None, min_bitops: int | None):
        self.supernet = supernet
        self.evaluate = evaluate
        self.max_bitops = max_bitops
        self.min_bitops = min_bitops
        self.reports: dict[SubnetArchitecture, BitOpsReport] = {}
        self.entries: dict[SubnetArchitecture, ParetoEntry] = {}

    def report(self, arch: SubnetArchitecture) -> BitOpsReport:
        if arch not in self.reports:
            self.reports[arch] = self.supernet.bitops(arch)
        return self.reports[arch]

    @property
    def num_constraints(self) -> int:
        return (self.max_bitops is not None) + (self.min_bitops is not None)

    def constraints(self, bitops: int) -> list[float]:
        """pymoo inequality constraints (feasible when every value is <= 0), relative so that they are O(1)."""
        values = []
        if self.max_bitops is not None:
            values.append(bitops / self.max_bitops - 1.0)
        if self.min_bitops is not None:
            values.append(1.0 - bitops / self.min_bitops)
        return values

    def is_feasible(self, arch: SubnetArchitecture) -> bool:
        return all(value <= 0 for value in self.constraints(self.report(arch).total_bitops))

    def score(self, arch: SubnetArchitecture) -> float:
        """Mean IoU of `arch`, measured once; the cache also keeps the search in lockstep across processes."""
        if arch not in self.entries:
            report = self.report(arch)
            self.entries[arch] = ParetoEntry(
                architecture=arch.to_dict(),
                bitops=report.total_bitops,
                mean_iou=_checked_mean_iou(self.evaluate(arch), arch),
                macs=report.total_macs,
            )
        return self.entries[arch].mean_iou

    def front(self) -> ParetoFront:
        return ParetoFront(self.entries.values())


def _checked_mean_iou(value, arch: SubnetArchitecture) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"`evaluate` returned {value} for the architecture {arch.to_dict()}; it must return a finite mean IoU "
            "(NaN means the evaluation data had no masks)."
        )
    return value


class _ArchitectureProblem(Problem):
    """Minimise log10(BitOPs) and -mIoU of decoded genotypes, with the BitOPs budget as inequality constraints.

    log10 is a monotone change of the first objective, so it leaves the Pareto order unchanged, but NSGA-II's crowding
    distance (and SMS-EMOA's hypervolume) then spreads the population evenly over orders of magnitude of BitOPs, as
    budgets are given. Architectures outside the budget are not evaluated: pymoo ranks infeasible solutions by their
    constraint violation alone, so their mIoU is never read and is set to 0.
    """

    def __init__(self, encoding: ArchitectureEncoding, evaluations: _Evaluations, progress_bar: tqdm):
        super().__init__(
            n_var=encoding.num_genes,
            n_obj=2,
            n_ieq_constr=evaluations.num_constraints,
            xl=encoding.lower,
            xu=encoding.upper,
            vtype=int,
        )
        self.encoding = encoding
        self.evaluations = evaluations
        self.progress_bar = progress_bar

    def _evaluate(self, X, out, *args, **kwargs):
        objectives, constraints = [], []
        for genes in X:
            arch = self.encoding.decode(genes)
            bitops = self.evaluations.report(arch).total_bitops
            feasible = self.evaluations.is_feasible(arch)
            mean_iou = self.evaluations.score(arch) if feasible else 0.0
            objectives.append([math.log10(bitops), -mean_iou])
            constraints.append(self.evaluations.constraints(bitops))
            self.progress_bar.update(1)
            self.progress_bar.set_postfix(evaluated=len(self.evaluations.entries), refresh=False)
        out["F"] = np.array(objectives, dtype=float)
        if self.n_ieq_constr:
            out["G"] = np.array(constraints, dtype=float)


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _initial_population(
    space: SearchSpace, encoding: ArchitectureEncoding, evaluations: _Evaluations, population_size: int, seed: int
) -> np.ndarray:
    """Genotypes of the first generation: the anchors of the front, then random architectures.

    The smallest and the largest subnet bound the front; uniform-bit full-size subnets (W8A8, W6A6, W4A4, ...) are
    the baselines a mixed-precision search should beat. Anchors outside the budget are left out. The rest are drawn
    with `SearchSpace.sample`, those within the budget preferred; a population of distinct architectures may come
    out smaller than `population_size` in a very small space.
    """
    anchors = [space.smallest(), space.largest()]
    for weight_bits in space.weight_bit_choices[1:]:
        # The lowest activation bit-width that is not below the weight bits (W2 pairs with A4 by default).
        activation_bits = min(
            (bits for bits in space.activation_bit_choices if bits >= weight_bits),
            default=space.activation_bit_choices[0],
        )
        anchors.append(space.largest(weight_bits, activation_bits))
    chosen = list(dict.fromkeys(arch for arch in anchors if evaluations.is_feasible(arch)))[:population_size]
    rng = random.Random(seed)
    infeasible = []
    for _ in range(50 * population_size):
        if len(chosen) >= population_size:
            break
        arch = space.sample(rng)
        if arch in chosen or arch in infeasible:
            continue
        (chosen if evaluations.is_feasible(arch) else infeasible).append(arch)
    chosen += infeasible[: population_size - len(chosen)]
    return np.stack([encoding.encode(arch) for arch in chosen])


def evolutionary_search(
    supernet,
    evaluate: Callable[[SubnetArchitecture], float],
    *,
    population_size: int = 16,
    generations: int = 5,
    max_bitops: float | str | None = None,
    min_bitops: float | str | None = None,
    seed: int = 0,
    progress: bool = True,
    algorithm: str = "nsga2",
    evaluate_full_precision: bool = True,
    metadata: dict | None = None,
) -> ParetoFront:
    """Searches the supernet's architectures for the Pareto front of BitOPs against mean IoU.

    pymoo's NSGA-II (or SMS-EMOA) evolves integer genotypes (`ArchitectureEncoding`): simulated binary crossover and
    polynomial mutation on the choice indices, rounded and canonicalised by a repair, with duplicate offspring
    eliminated. BitOPs come from the analytic counter; `evaluate` is called once per distinct architecture within
    the budget (results are cached), never for one outside it. The front returned holds the non-dominated
    architectures among all those evaluated, not only the last population.

    In a distributed run every process must call this with the same arguments and an `evaluate` that returns the
    same value on every process (`make_miou_evaluator` with an `Accelerator` does): the search then stays in
    lockstep. Only the main process shows the progress bar and logs.

    Args:
        supernet (`SamSupernetForMaskGeneration`): prices architectures (`supernet.bitops`) and defines the space.
        evaluate (`Callable[[SubnetArchitecture], float]`): the mean IoU of an architecture (e.g.
            `make_miou_evaluator(...)`); deterministic, for the search to be.
        population_size (`int`, *optional*, defaults to 16): architectures per generation, at least 2.
        generations (`int`, *optional*, defaults to 5): generations of offspring after the initial population (0
            evaluates the initial population only); at most `population_size * (generations + 1)` evaluations.
        max_bitops (`int`, `float` or `str`, *optional*): the BitOPs budget, a hard constraint; a string is read by
            `mpsupernet.bitops.parse_budget` ("120G", "5%" of the full-precision model).
        min_bitops (`int`, `float` or `str`, *optional*): a lower BitOPs bound, to focus on a range of the front.
        seed (`int`, *optional*, defaults to 0): seeds the initial population and pymoo.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over the architectures considered.
        algorithm (`str`, *optional*, defaults to `"nsga2"`): one of `ALGORITHMS` (`"nsga2"`, `"smsemoa"`).
        evaluate_full_precision (`bool`, *optional*, defaults to `True`): also measure the full-precision model
            (one more `evaluate` call) for the front's metadata and plot.
        metadata (`dict`, *optional*): more metadata for the front (`run_search` gives `base_model`, `dataset`).

    Returns:
        `ParetoFront`: with the full-precision point, the W8A8 reference, the date and the settings in `metadata`.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown search algorithm {algorithm!r}; allowed: {list(ALGORITHMS)}.")
    if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
        raise ValueError(f"`population_size` must be an integer of at least 2, got {population_size!r}.")
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 0:
        raise ValueError(f"`generations` must be a non-negative integer, got {generations!r}.")
    space: SearchSpace = supernet.search_space
    full_precision = supernet.full_precision_subnet()
    full_precision_report = supernet.bitops(full_precision)
    full_precision_bitops = full_precision_report.total_bitops
    max_bitops = None if max_bitops is None else _resolve_budget(max_bitops, full_precision_bitops, "max_bitops")
    min_bitops = None if min_bitops is None else _resolve_budget(min_bitops, full_precision_bitops, "min_bitops")
    cheapest = supernet.bitops(space.smallest()).total_bitops
    dearest = supernet.bitops(space.largest()).total_bitops
    if max_bitops is not None and max_bitops < cheapest:
        raise ValueError(
            f"`max_bitops` is {max_bitops:,} but the smallest subnet costs {cheapest:,} BitOPs; no architecture fits. "
            f"Allowed: at least {cheapest:,}."
        )
    if min_bitops is not None and min_bitops > min(dearest, max_bitops or dearest):
        raise ValueError(
            f"`min_bitops` is {min_bitops:,} but it must not exceed `max_bitops` ({max_bitops}) nor the largest "
            f"subnet's {dearest:,} BitOPs."
        )

    full_precision_mean_iou = None
    if evaluate_full_precision:
        full_precision_mean_iou = _checked_mean_iou(evaluate(full_precision), full_precision)

    evaluations = _Evaluations(supernet, evaluate, max_bitops, min_bitops)
    encoding = ArchitectureEncoding(space)
    # Integer genes through pymoo's real-valued operators plus rounding, as pymoo documents for integer variables; a
    # small distribution index (eta=3) makes steps of more than one choice likely despite the rounding.
    optimizer = ALGORITHMS[algorithm](
        pop_size=population_size,
        n_offsprings=population_size,
        sampling=_initial_population(space, encoding, evaluations, population_size, seed),
        crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=3.0, vtype=float, repair=RoundingRepair()),
        repair=_CanonicalRepair(encoding),
        eliminate_duplicates=True,
    )
    main_process = _is_main_process()
    with tqdm(
        total=population_size * (generations + 1),
        desc="Searching architectures",
        unit="arch",
        disable=not (progress and main_process),
    ) as progress_bar:
        problem = _ArchitectureProblem(encoding, evaluations, progress_bar)
        optimizer.setup(problem, termination=("n_gen", generations + 1), seed=seed, verbose=False)
        generation = 0
        while optimizer.has_next():
            population = optimizer.ask()
            optimizer.evaluator.eval(problem, population)
            optimizer.tell(infills=population)
            if main_process:
                _log_generation(generation, generations, evaluations, max_bitops)
            generation += 1

    entries = list(evaluations.entries.values())
    front_metadata = {
        "base_model": getattr(supernet, "name_or_path", None) or None,
        "dataset": {"name": None, "size": None},
        "full_precision": {
            "bitops": full_precision_bitops,
            "macs": full_precision_report.total_macs,
            "mean_iou": full_precision_mean_iou,
        },
        "w8a8_bitops": full_precision_report.w8a8_bitops,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "search": {
            "algorithm": algorithm,
            "population_size": population_size,
            "generations": generations,
            "max_bitops": max_bitops,
            "min_bitops": min_bitops,
            "seed": seed,
            "bit_granularity": space.config.bit_granularity,
            "num_evaluations": len(entries),
        },
        **(metadata or {}),
    }
    return ParetoFront(entries, metadata=front_metadata)


def _log_generation(generation: int, generations: int, evaluations: _Evaluations, max_bitops: int | None) -> None:
    front = evaluations.front()
    best = front.entries[-1] if front.entries else None
    budget = f"under {format_bitops(max_bitops)}" if max_bitops is not None else "overall"
    best_text = (
        f"{best.mean_iou:.4f} at {format_bitops(best.bitops)}" if best else "none (nothing evaluated yet)"
    )
    logger.info(
        f"Generation {generation}/{generations}: {len(evaluations.entries)} architectures evaluated, front of "
        f"{len(front)}, best mIoU {budget}: {best_text}."
    )


# --- measuring mIoU -----------------------------------------------------------------------------------------------
def make_miou_evaluator(
    supernet, dataloader, accelerator=None, max_batches: int | None = None
) -> Callable[[SubnetArchitecture], float]:
    """An `evaluate` for `evolutionary_search`: activates an architecture and measures its mean IoU.

    Args:
        supernet (`SamSupernetForMaskGeneration`): the supernet to run.
        dataloader (`torch.utils.data.DataLoader`): validation batches from `mpsupernet.data.collate_fn`.
        accelerator (`accelerate.Accelerator`, *optional*): shards the dataloader across processes
            (`accelerator.prepare`), moves the supernet to its device and runs under its autocast; the metric sums
            over processes, so every process gets the same mIoU. With accelerate's default `even_batches`, the last
            batches are topped up with repeated examples, so the value may differ slightly from a one-process run.
        max_batches (`int`, *optional*): evaluate on at most this many batches (per process).

    Returns:
        `Callable[[SubnetArchitecture], float]`: leaves the architecture it evaluated active in the supernet.
    """
    # Imported here: evaluation.py pulls in the data pipeline, which the search itself does not need.
    from .evaluation import evaluate_mean_iou

    autocast = contextlib.nullcontext
    if accelerator is not None:
        dataloader = accelerator.prepare(dataloader)
        supernet.to(accelerator.device)
        autocast = accelerator.autocast

    def evaluate(arch: SubnetArchitecture) -> float:
        supernet.set_subnet(arch)
        with autocast():
            return evaluate_mean_iou(supernet, dataloader, max_batches=max_batches, show_progress=False)

    return evaluate


def run_search(
    supernet_path_or_model,
    dataset,
    *,
    output_dir: str | os.PathLike,
    population_size: int = 16,
    generations: int = 5,
    max_bitops: float | str | None = None,
    eval_batch_size: int = 4,
    max_eval_batches: int | None = None,
    seed: int = 0,
    algorithm: str = "nsga2",
    accelerator=None,
    dataset_name: str | None = None,
    progress: bool = True,
) -> ParetoFront:
    """Loads a supernet, searches its Pareto front on a validation set, and saves the front as JSON and PNG.

    Writes `pareto_front.json` and `pareto_front.png` into `output_dir` (on the main process).

    Args:
        supernet_path_or_model (`str`, `os.PathLike` or `SamSupernetForMaskGeneration`): a supernet, or a folder or
            Hub repo id for `SamSupernetForMaskGeneration.from_pretrained`.
        dataset (`datasets.Dataset`): validation examples in the standard schema (`image`, `masks`, `image_id`);
            prompts are sampled by `SamSegmentationPreprocessor` with `seed`, the same for every architecture.
        output_dir (`str` or `os.PathLike`): where to write the front.
        population_size, generations, max_bitops, seed, algorithm: see `evolutionary_search`.
        eval_batch_size (`int`, *optional*, defaults to 4): images per evaluation batch.
        max_eval_batches (`int`, *optional*): evaluate every architecture on at most this many batches (per process).
        accelerator (`accelerate.Accelerator`, *optional*): defaults to a new `Accelerator()`, which picks the device
            and, under `accelerate launch`, shards the evaluation across processes.
        dataset_name (`str`, *optional*): for the metadata; defaults to the dataset's own name, if it has one.
        progress (`bool`, *optional*, defaults to `True`): show the search's progress bar.
    """
    from torch.utils.data import DataLoader

    from .data import SamSegmentationPreprocessor, collate_fn
    from .modeling_sam_supernet import SamSupernetForMaskGeneration

    if isinstance(supernet_path_or_model, (str, os.PathLike)):
        supernet = SamSupernetForMaskGeneration.from_pretrained(supernet_path_or_model)
    elif isinstance(supernet_path_or_model, SamSupernetForMaskGeneration):
        supernet = supernet_path_or_model
    else:
        raise TypeError(
            "`supernet_path_or_model` must be a SamSupernetForMaskGeneration, a folder or a Hub repo id, got "
            f"{type(supernet_path_or_model).__name__}: {supernet_path_or_model!r}."
        )
    if eval_batch_size < 1:
        raise ValueError(f"`eval_batch_size` must be at least 1, got {eval_batch_size}.")
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    supernet.eval()
    preprocessor = SamSegmentationPreprocessor(supernet.config, seed=seed)
    dataloader = DataLoader(
        dataset.with_transform(preprocessor), batch_size=eval_batch_size, shuffle=False, collate_fn=collate_fn
    )
    evaluate = make_miou_evaluator(supernet, dataloader, accelerator=accelerator, max_batches=max_eval_batches)
    info = getattr(dataset, "info", None)
    dataset_name = dataset_name or getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    front = evolutionary_search(
        supernet,
        evaluate,
        population_size=population_size,
        generations=generations,
        max_bitops=max_bitops,
        seed=seed,
        progress=progress,
        algorithm=algorithm,
        metadata={"dataset": {"name": dataset_name, "size": len(dataset), "max_eval_batches": max_eval_batches}},
    )
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        front.save(output_dir / "pareto_front.json")
        budgets = [front.metadata["search"]["max_bitops"]] if max_bitops is not None else []
        front.plot(output_dir / "pareto_front.png", budgets=budgets)
    accelerator.wait_for_everyone()
    return front
