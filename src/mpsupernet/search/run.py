"""Evolutionary multi-objective search over subnet architectures, and the mIoU evaluator it runs.

The search minimises two objectives at once, BitOPs (analytic, free: `mpsupernet.bitops.BitOpsCounter`) and
minus the mean IoU of a subnet on validation data (measured, expensive), with an optional BitOPs budget as a hard
constraint. It runs pymoo's NSGA-II (or SMS-EMOA) on an integer encoding of `SubnetArchitecture`
(`ArchitectureEncoding`) and returns a `ParetoFront`: the non-dominated architectures among all those evaluated, kept
as JSON and drawn as a plot.
"""

import contextlib
import os
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.sms import SMSEMOA
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from tqdm.auto import tqdm
from transformers.utils import logging

from ..bitops import BitOpsCounter, format_bitops, parse_budget
from ..checkpoints import state_dict_sha256
from ..architecture import SubnetArchitecture
from ..search_space import SearchSpace
from ..weight_bytes import weight_bytes_bound
from .encoding import ArchitectureEncoding
from .front import ParetoFront
from .problem import _ArchitectureProblem, _CanonicalRepair, _checked_mean_iou, _Evaluations

logger = logging.get_logger(__name__)

ALGORITHMS = {"nsga2": NSGA2, "smsemoa": SMSEMOA}
"""The pymoo algorithms `evolutionary_search` can run, by name."""


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
    latency_model=None,
    max_latency_ms: float | None = None,
    max_weight_bytes: int | None = None,
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
        supernet (`SamSupernetForMaskGeneration`): its configuration defines the space and the cost function
            (`BitOpsCounter`); `evaluate` runs it.
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
        metadata (`dict`, *optional*): more metadata for the front (`run_search` gives `dataset`).
        latency_model (`mpsupernet.LatencyModel`, *optional*): makes the predicted latency (on its machine and
            runtime) the cost objective instead of BitOPs; BitOPs are still counted and recorded per entry.
        max_latency_ms (`float`, *optional*): a latency budget in predicted milliseconds, a hard constraint (needs
            `latency_model`).
        max_weight_bytes (`int`, *optional*): a budget in bytes of the exported encoder's weights (int8
            containers; `mpsupernet.weight_bytes.count_weight_bytes`), a hard constraint.

    Raises:
        `ValueError`: naming the value, for bad settings, a budget no subnet meets (for latency, naming the fastest
        predicted subnet), a latency budget without a latency model, or a latency model fitted on another
        architecture space.

    Returns:
        `ParetoFront`: with the full-precision point, the W8A8 reference, the date and the settings in `metadata`.
    """
    _check_search_settings(algorithm, population_size, generations)
    counter = BitOpsCounter(supernet.config)
    space: SearchSpace = counter.search_space
    full_precision = space.full_precision()
    full_precision_report = counter.report(full_precision)
    max_bitops, min_bitops = _bitops_bounds(counter, max_bitops, min_bitops)
    max_latency_ms = _latency_bound(supernet, latency_model, max_latency_ms)
    if max_weight_bytes is not None:
        max_weight_bytes = weight_bytes_bound(supernet.config, max_weight_bytes)
    full_precision_mean_iou = None
    if evaluate_full_precision:
        full_precision_mean_iou = _checked_mean_iou(evaluate(full_precision), full_precision)

    evaluations = _Evaluations(
        counter, evaluate, max_bitops, min_bitops, latency_model, max_latency_ms, max_weight_bytes
    )
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
    _run_generations(optimizer, encoding, evaluations, population_size, generations, seed, progress)
    entries = list(evaluations.entries.values())
    settings = {"algorithm": algorithm, "population_size": population_size, "generations": generations}
    objective = "bitops" if latency_model is None else "latency_ms"
    search = {
        **settings, "objective": objective, "max_bitops": max_bitops, "min_bitops": min_bitops,
        "max_latency_ms": max_latency_ms, "max_weight_bytes": max_weight_bytes, "seed": seed,
    }
    front_metadata = _front_metadata(supernet, full_precision_report, full_precision_mean_iou, search, len(entries))
    if latency_model is not None:
        front_metadata["latency_model"] = latency_model.machine()
    return ParetoFront(entries, metadata={**front_metadata, **(metadata or {})}, objective=objective)


def _latency_bound(supernet, latency_model, max_latency_ms) -> float | None:
    """The latency budget, checked against the latency model and the fastest predicted subnet."""
    if latency_model is None:
        if max_latency_ms is not None:
            raise ValueError(
                f"`max_latency_ms` is {max_latency_ms!r} but no `latency_model` prices latency; fit one with "
                "`mpsupernet.fit_latency_model(supernet)` and pass it as `latency_model`."
            )
        return None
    latency_model.check_compatible(supernet)
    return None if max_latency_ms is None else latency_model.parse_budget(max_latency_ms)


def _front_metadata(
    supernet, full_precision_report, full_precision_mean_iou: float | None, search: dict, num_evaluations: int
) -> dict:
    """The metadata `evolutionary_search` gives its front (see `ParetoFront`)."""
    return {
        "supernet": getattr(supernet, "name_or_path", None) or None,
        "supernet_weights_sha256": state_dict_sha256(supernet),
        "base_model": supernet.config.base_model_name_or_path,
        "training_dataset": supernet.config.training_dataset,
        "dataset": {"name": None, "size": None},
        "full_precision": {
            "bitops": full_precision_report.total_bitops,
            "macs": full_precision_report.total_macs,
            "mean_iou": full_precision_mean_iou,
        },
        "w8a8_bitops": full_precision_report.w8a8_bitops,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "search": {
            **search,
            "bit_granularity": supernet.config.bit_granularity,
            "num_evaluations": num_evaluations,
        },
    }


def _check_search_settings(algorithm: str, population_size: int, generations: int) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown search algorithm {algorithm!r}; allowed: {list(ALGORITHMS)}.")
    if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
        raise ValueError(f"`population_size` must be an integer of at least 2, got {population_size!r}.")
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 0:
        raise ValueError(f"`generations` must be a non-negative integer, got {generations!r}.")


def _bitops_bounds(
    counter: BitOpsCounter, max_bitops: float | str | None, min_bitops: float | str | None
) -> tuple[int | None, int | None]:
    """The BitOPs bounds as whole numbers, checked against the cheapest and the dearest subnet."""
    full_precision_bitops = counter.full_precision_bitops
    max_bitops = None if max_bitops is None else parse_budget(max_bitops, full_precision_bitops, name="max_bitops")
    min_bitops = None if min_bitops is None else parse_budget(min_bitops, full_precision_bitops, name="min_bitops")
    cheapest = counter.bitops(counter.search_space.smallest())
    dearest = counter.bitops(counter.search_space.largest())
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
    return max_bitops, min_bitops


def _run_generations(
    optimizer,
    encoding: ArchitectureEncoding,
    evaluations: _Evaluations,
    population_size: int,
    generations: int,
    seed: int,
    progress: bool,
) -> None:
    """Runs the optimizer's ask-evaluate-tell loop for `generations + 1` generations, with a bar and logs."""
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
            if population is None:  # pymoo found no offspring that is not a duplicate: a small space is exhausted
                break
            optimizer.evaluator.eval(problem, population)
            optimizer.tell(infills=population)
            if main_process:
                _log_generation(generation, generations, evaluations, evaluations.max_bitops)
            generation += 1


def _log_generation(generation: int, generations: int, evaluations: _Evaluations, max_bitops: int | None) -> None:
    front = evaluations.front()
    best = front.entries[-1] if front.entries else None
    budgets = [f"{format_bitops(max_bitops)}"] if max_bitops is not None else []
    budgets += [f"{evaluations.max_latency_ms:g} ms"] if evaluations.max_latency_ms is not None else []
    budget = f"under {' and '.join(budgets)}" if budgets else "overall"
    latency = "" if best is None or best.latency_ms is None else f" ({best.latency_ms:.2f} ms predicted)"
    best_text = (
        f"{best.mean_iou:.4f} at {format_bitops(best.bitops)}{latency}" if best else "none (nothing evaluated yet)"
    )
    logger.info(
        f"Generation {generation}/{generations}: {len(evaluations.entries)} architectures evaluated, front of "
        f"{len(front)}, best mIoU {budget}: {best_text}."
    )


def make_miou_evaluator(
    supernet, dataloader, accelerator=None, max_batches: int | None = None
) -> Callable[[SubnetArchitecture], float]:
    """An `evaluate` for `evolutionary_search`: activates an architecture and measures its mean IoU (for a
    `SamSupernetForSemanticSegmentation`, the dataset-level class mIoU of `mpsupernet.metrics.evaluate_semantic_mean_iou`).

    Args:
        supernet (`SamSupernetForMaskGeneration`): the supernet to run.
        dataloader (`torch.utils.data.DataLoader`): validation batches from `mpsupernet.data.collate_fn`.
        accelerator (`accelerate.Accelerator`, *optional*): shards the dataloader across processes
            (`accelerator.prepare`), moves the supernet to its device and runs under its autocast; the metric sums
            over processes, so every process gets the same mIoU. With accelerate's default `even_batches`, the last
            batches are topped up with repeated examples, so the value may differ slightly from a one-process run.
        max_batches (`int`, *optional*): evaluate on at most this many batches (per process).

    Returns:
        `Callable[[SubnetArchitecture], float]`: the subnet active before a call is active again after it.
    """
    # Imported here: the evaluation loops pull in the data pipeline, which the search itself does not need.
    from ..metrics.evaluation import evaluate_mean_iou, evaluate_semantic_mean_iou
    from ..modeling_sam_semantic import SamSupernetForSemanticSegmentation

    autocast = contextlib.nullcontext
    if accelerator is not None:
        dataloader = accelerator.prepare(dataloader)
        supernet.to(accelerator.device)
        autocast = accelerator.autocast

    def evaluate(arch: SubnetArchitecture) -> float:
        with autocast():
            if isinstance(supernet, SamSupernetForSemanticSegmentation):
                return float(
                    evaluate_semantic_mean_iou(
                        supernet, dataloader, max_batches=max_batches, show_progress=False, subnet=arch
                    )["mean_iou"]
                )
            return evaluate_mean_iou(supernet, dataloader, max_batches=max_batches, show_progress=False, subnet=arch)

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
    latency_model=None,
    max_latency_ms: float | None = None,
    max_weight_bytes: int | None = None,
) -> ParetoFront:
    """Loads a supernet, searches its Pareto front on a validation set, and saves the front as JSON and PNG.

    Writes `pareto_front.json` and `pareto_front.png` into `output_dir` (on the main process).

    Args:
        supernet_path_or_model (`str`, `os.PathLike` or `SamSupernetForMaskGeneration`): what
            `mpsupernet.tasks.load_task_supernet` reads: a supernet, a folder or Hub repo id of one (promptable or
            semantic), or a shipped SAM's name (a new promptable supernet of it).
        dataset (`datasets.Dataset`): validation examples in the standard schema (`image`, `masks`, `image_id`);
            prompts are sampled by `SamSegmentationPreprocessor` with `seed`, the same for every architecture. A
            semantic supernet takes the semantic schema (`image`, `annotation`) and is scored by class mIoU.
        output_dir (`str` or `os.PathLike`): where to write the front.
        population_size, generations, max_bitops, seed, algorithm, latency_model, max_latency_ms, max_weight_bytes: see
            `evolutionary_search` (with a latency model the front's JSON and plot carry predicted latency).
        eval_batch_size (`int`, *optional*, defaults to 4): images per evaluation batch.
        max_eval_batches (`int`, *optional*): evaluate every architecture on at most this many batches (per process).
        accelerator (`accelerate.Accelerator`, *optional*): defaults to a new `Accelerator()`, which picks the device
            and, under `accelerate launch`, shards the evaluation across processes.
        dataset_name (`str`, *optional*): for the metadata; defaults to the dataset's own name, if it has one.
        progress (`bool`, *optional*, defaults to `True`): show the search's progress bar.
    """
    from torch.utils.data import DataLoader

    from ..data import SamSegmentationPreprocessor, SemanticSegmentationPreprocessor, check_dataset_task, collate_fn
    from ..data import dataset_name as name_of_dataset
    from ..modeling_sam_semantic import SamSupernetForSemanticSegmentation

    if eval_batch_size < 1:
        raise ValueError(f"`eval_batch_size` must be at least 1, got {eval_batch_size}.")
    if max_eval_batches is not None and (
        isinstance(max_eval_batches, bool) or not isinstance(max_eval_batches, int) or max_eval_batches < 1
    ):
        # 0 would evaluate nothing: every architecture's mean IoU would be NaN, refused only at the first one.
        raise ValueError(f"`max_eval_batches` must be a positive integer or None, got {max_eval_batches!r}.")
    from ..tasks import load_task_supernet

    supernet = load_task_supernet(supernet_path_or_model, seed=seed)
    semantic = isinstance(supernet, SamSupernetForSemanticSegmentation)
    check_dataset_task(dataset, "dataset", semantic)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    supernet.eval()
    if semantic:
        preprocessor = SemanticSegmentationPreprocessor(supernet.config)
    else:
        preprocessor = SamSegmentationPreprocessor(supernet.config, seed=seed)
    dataloader = DataLoader(
        dataset.with_transform(preprocessor), batch_size=eval_batch_size, shuffle=False, collate_fn=collate_fn
    )
    evaluate = make_miou_evaluator(supernet, dataloader, accelerator=accelerator, max_batches=max_eval_batches)
    dataset_name = dataset_name or name_of_dataset(dataset)
    front = evolutionary_search(
        supernet,
        evaluate,
        population_size=population_size,
        generations=generations,
        max_bitops=max_bitops,
        seed=seed,
        progress=progress,
        algorithm=algorithm,
        latency_model=latency_model,
        max_latency_ms=max_latency_ms,
        max_weight_bytes=max_weight_bytes,
        metadata={"dataset": {"name": dataset_name, "size": len(dataset), "max_eval_batches": max_eval_batches}},
    )
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        front.save(output_dir / "pareto_front.json")
        budget = front.metadata["search"]["max_latency_ms" if latency_model is not None else "max_bitops"]
        front.plot(output_dir / "pareto_front.png", budgets=[] if budget is None else [budget])
    accelerator.wait_for_everyone()
    return front
