"""Does the supernet rank subnets right? Kendall's tau between inherited and stand-alone fine-tuned mIoU.

A one-shot search trusts the mIoU a subnet reaches with the supernet's shared weights ("inherited"). The check every
supernet user asks for: fine-tune each of several architectures alone for a while, from the supernet's weights, and
see whether their order by mIoU stays the order the supernet gave them. Kendall's tau of the two orders (1: the same
order, 0: unrelated, -1: reversed) answers it (as in the NAS literature's rank-correlation checks, e.g. Yu et al.,
"Evaluating the search phase of neural architecture search", ICLR 2020).
"""

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from scipy.stats import kendalltau

from mpsupernet.architecture import SubnetArchitecture
from mpsupernet.bitops import BitOpsCounter
from mpsupernet.metrics import evaluate_dataset_mean_iou
from mpsupernet.training import SupernetTrainingArguments, train_supernet


@dataclass
class RankingResult:
    """Inherited and stand-alone mIoU of each architecture, and Kendall's tau between them.

    Attributes:
        architectures (`list[dict]`): the architectures, as `SubnetArchitecture.to_dict()`.
        bitops (`list[int]`): their BitOPs.
        inherited_mean_iou (`list[float]`): mIoU with the supernet's weights.
        standalone_mean_iou (`list[float]`): mIoU after fine-tuning the architecture alone.
        kendall_tau (`float`): Kendall's tau-b of the two (scipy.stats.kendalltau); NaN if either is constant.
        p_value (`float`): its two-sided p-value (no correlation as the null hypothesis).
        fine_tune_steps (`int`): optimizer steps of each fine-tune.
    """

    architectures: list[dict]
    bitops: list[int]
    inherited_mean_iou: list[float]
    standalone_mean_iou: list[float]
    kendall_tau: float
    p_value: float
    fine_tune_steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def ranking_correlation(
    supernet,
    architectures: list[SubnetArchitecture | dict],
    train_dataset,
    eval_dataset,
    *,
    fine_tune_steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
    output_dir: str | Path | None = None,
) -> RankingResult:
    """Kendall's tau between the inherited mIoU of `architectures` and their mIoU after a short stand-alone fine-tune.

    Each architecture is fine-tuned alone (`train_supernet` with `fixed_architecture`, no distillation) from a copy
    of the supernet's weights: the same adapters, quantizers and loss, the same data, learning rate and seed for each.
    Both mIoU are box-prompt mIoU on `eval_dataset` (`evaluate_dataset_mean_iou` with `seed`); `supernet` itself is
    not changed.

    Args:
        supernet (`SamSupernetForMaskGeneration`): the trained supernet.
        architectures (`list`): at least two distinct architectures (`SubnetArchitecture` or dicts), e.g. entries of
            a Pareto front (`ParetoEntry.to_architecture()`).
        train_dataset, eval_dataset (`datasets.Dataset`): standard-schema splits (see `mpsupernet.data`).
        fine_tune_steps (`int`), learning_rate (`float`), batch_size (`int`): each fine-tune's optimizer steps,
            peak learning rate and batch size.
        seed (`int`, *optional*, defaults to 0): seed of training and evaluation prompts.
        output_dir (`str` or `Path`, *optional*): where the fine-tuned supernets are saved (`arch_<i>`); a temporary
            folder, removed afterwards, if not given.

    Raises:
        `ValueError`: if fewer than two distinct architectures are given or `fine_tune_steps` is not positive.
    """
    archs = [SubnetArchitecture.from_dict(a) if isinstance(a, dict) else a for a in architectures]
    if len(set(archs)) < 2 or len(set(archs)) != len(archs):
        raise ValueError(
            f"Ranking needs at least two distinct architectures, got {len(set(archs))} distinct of {len(archs)}."
        )
    if not isinstance(fine_tune_steps, int) or fine_tune_steps < 1:
        raise ValueError(f"`fine_tune_steps` must be a positive integer, got {fine_tune_steps!r}.")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch)
        inherited, standalone = [], []
        for index, arch in enumerate(archs):
            inherited.append(evaluate_dataset_mean_iou(supernet, eval_dataset, seed=seed, subnet=arch))
            folder_of_arch = folder / f"arch_{index}"
            tuned = _fine_tune(
                supernet, arch, train_dataset, fine_tune_steps, learning_rate, batch_size, seed, folder_of_arch
            )
            standalone.append(evaluate_dataset_mean_iou(tuned, eval_dataset, seed=seed, subnet=arch))
    tau, p_value = kendalltau(inherited, standalone)
    counter = BitOpsCounter(supernet.config)
    return RankingResult(
        architectures=[arch.to_dict() for arch in archs],
        bitops=[counter.bitops(arch) for arch in archs],
        inherited_mean_iou=inherited,
        standalone_mean_iou=standalone,
        kendall_tau=float(tau),
        p_value=float(p_value),
        fine_tune_steps=fine_tune_steps,
    )


def _fine_tune(supernet, arch, dataset, steps, learning_rate, batch_size, seed, output_dir):
    """A copy of `supernet` trained on `arch` alone (its other subnets are left as the copy had them)."""
    tuned = copy.deepcopy(supernet)
    args = SupernetTrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        warmup_steps=0.05,
        logging_steps=max(steps // 5, 1),
        save_strategy="no",
        report_to="none",
        seed=seed,
        fixed_architecture=arch.to_dict(),
        distillation=None,
    )
    train_supernet(tuned, dataset, args=args)
    return tuned.eval()


__all__ = ["RankingResult", "ranking_correlation"]
