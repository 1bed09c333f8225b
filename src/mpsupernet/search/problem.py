"""The search as a pymoo problem: genotypes priced, scored once each, repaired to canonical architectures."""

import math

import numpy as np
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from tqdm.auto import tqdm

from ..architecture import SubnetArchitecture
from ..bitops import BitOpsCounter, BitOpsReport
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
    """Prices architectures (analytically) and scores those within the budget (through `evaluate`), each once."""

    def __init__(self, counter: BitOpsCounter, evaluate, max_bitops: int | None, min_bitops: int | None):
        self.counter = counter
        self.evaluate = evaluate
        self.max_bitops = max_bitops
        self.min_bitops = min_bitops
        self.reports: dict[SubnetArchitecture, BitOpsReport] = {}
        self.entries: dict[SubnetArchitecture, ParetoEntry] = {}

    def report(self, arch: SubnetArchitecture) -> BitOpsReport:
        if arch not in self.reports:
            self.reports[arch] = self.counter.report(arch)
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
