"""The search as a pymoo problem: genotypes priced, scored once each, repaired to canonical architectures."""

import math

import numpy as np
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from tqdm.auto import tqdm

from ..architecture import SubnetArchitecture
from ..bitops import BitOpsCounter, BitOpsReport
from ..weight_bytes import count_weight_bytes
from .encoding import ArchitectureEncoding
from .front import ParetoEntry, ParetoFront


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


class _Evaluations:
    """Prices architectures (BitOPs analytically, latency with a latency model) and scores those within the budgets
    (through `evaluate`), each once.

    The cost the search minimises is the predicted latency when a `latency_model` is given, else the BitOPs.
    """

    def __init__(
        self,
        counter: BitOpsCounter,
        evaluate,
        max_bitops: int | None,
        min_bitops: int | None,
        latency_model=None,
        max_latency_ms: float | None = None,
        max_weight_bytes: int | None = None,
    ):
        self.counter = counter
        self.max_weight_bytes = max_weight_bytes
        self.evaluate = evaluate
        self.max_bitops = max_bitops
        self.min_bitops = min_bitops
        self.latency_model = latency_model
        self.max_latency_ms = max_latency_ms
        self.reports: dict[SubnetArchitecture, BitOpsReport] = {}
        self.latencies: dict[SubnetArchitecture, float] = {}
        self.entries: dict[SubnetArchitecture, ParetoEntry] = {}

    def report(self, arch: SubnetArchitecture) -> BitOpsReport:
        if arch not in self.reports:
            self.reports[arch] = self.counter.report(arch)
        return self.reports[arch]

    def latency_ms(self, arch: SubnetArchitecture) -> float | None:
        """Predicted milliseconds of `arch`, or `None` without a latency model."""
        if self.latency_model is None:
            return None
        if arch not in self.latencies:
            self.latencies[arch] = self.latency_model.predict(arch)
        return self.latencies[arch]

    def cost(self, arch: SubnetArchitecture) -> float:
        """The cost objective: predicted latency with a latency model, else BitOPs."""
        latency = self.latency_ms(arch)
        return self.report(arch).total_bitops if latency is None else latency

    @property
    def num_constraints(self) -> int:
        bounds = (self.max_bitops, self.min_bitops, self.max_latency_ms, self.max_weight_bytes)
        return sum(bound is not None for bound in bounds)

    def weight_bytes(self, arch: SubnetArchitecture) -> int:
        return count_weight_bytes(self.counter.config, arch)

    def constraints(self, arch: SubnetArchitecture) -> list[float]:
        """pymoo inequality constraints (feasible when every value is <= 0), relative so that they are O(1)."""
        bitops = self.report(arch).total_bitops
        values = []
        if self.max_bitops is not None:
            values.append(bitops / self.max_bitops - 1.0)
        if self.min_bitops is not None:
            values.append(1.0 - bitops / self.min_bitops)
        if self.max_latency_ms is not None:
            values.append(self.latency_ms(arch) / self.max_latency_ms - 1.0)
        if self.max_weight_bytes is not None:
            values.append(self.weight_bytes(arch) / self.max_weight_bytes - 1.0)
        return values

    def is_feasible(self, arch: SubnetArchitecture) -> bool:
        return all(value <= 0 for value in self.constraints(arch))

    def score(self, arch: SubnetArchitecture) -> float:
        """Mean IoU of `arch`, measured once; the cache also keeps the search in lockstep across processes."""
        if arch not in self.entries:
            report = self.report(arch)
            self.entries[arch] = ParetoEntry(
                architecture=arch.to_dict(),
                bitops=report.total_bitops,
                mean_iou=_checked_mean_iou(self.evaluate(arch), arch),
                macs=report.total_macs,
                latency_ms=self.latency_ms(arch),
                weight_bytes=self.weight_bytes(arch),
            )
        return self.entries[arch].mean_iou

    def front(self) -> ParetoFront:
        return ParetoFront(self.entries.values(), objective="bitops" if self.latency_model is None else "latency_ms")


def _checked_mean_iou(value, arch: SubnetArchitecture) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"`evaluate` returned {value} for the architecture {arch.to_dict()}; it must return a finite mean IoU "
            "(NaN means the evaluation data had no masks)."
        )
    return value


class _ArchitectureProblem(Problem):
    """Minimise log10(cost) and -mIoU of decoded genotypes, with the budgets as inequality constraints.

    The cost is BitOPs, or the predicted latency with a latency model (see `_Evaluations.cost`). log10 is a monotone
    change of the first objective, so it leaves the Pareto order unchanged, but NSGA-II's crowding
    distance (and SMS-EMOA's hypervolume) then spreads the population evenly over orders of magnitude of the cost, as
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
            feasible = self.evaluations.is_feasible(arch)
            mean_iou = self.evaluations.score(arch) if feasible else 0.0
            objectives.append([math.log10(max(self.evaluations.cost(arch), 1e-12)), -mean_iou])
            constraints.append(self.evaluations.constraints(arch))
            self.progress_bar.update(1)
            self.progress_bar.set_postfix(evaluated=len(self.evaluations.entries), refresh=False)
        out["F"] = np.array(objectives, dtype=float)
        if self.n_ieq_constr:
            out["G"] = np.array(constraints, dtype=float)
