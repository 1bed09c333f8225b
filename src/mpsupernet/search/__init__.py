"""Evolutionary search over subnet architectures and the Pareto front it finds.

The package's rooms: `front` (the front and its JSON; numpy only), `plot` (matplotlib), `encoding` (the integer
genotype), `problem` (the pymoo problem and repair) and `run` (`evolutionary_search`, `run_search` and the mIoU evaluator).
The front's names load eagerly; the search's load on first use, so that `mpsupernet.search.front` and readers of a
saved front never import pymoo. The search prices architectures with `mpsupernet.bitops.BitOpsCounter` and never
imports training (the ranking analysis, which fine-tunes, is `benchmarks/_ranking.py`).
"""

from .._lazy import lazy_attributes
from .front import PARETO_FRONT_FORMAT_VERSION, TABLE_COLUMNS, ParetoEntry, ParetoFront, non_dominated_mask

_LAZY_NAMES = {
    "ALGORITHMS": "run",
    "ArchitectureEncoding": "encoding",
    "evolutionary_search": "run",
    "make_miou_evaluator": "run",
    "run_search": "run",
    "plot_pareto_front": "plot",
}

__all__ = [
    "PARETO_FRONT_FORMAT_VERSION",
    "TABLE_COLUMNS",
    "ParetoEntry",
    "ParetoFront",
    "non_dominated_mask",
    *_LAZY_NAMES,
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_NAMES)
