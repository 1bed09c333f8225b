"""The policies both training paths follow (`SupernetTrainer` and `train_supernet`), written once.

Which subnets train and are evaluated, how the quantizers start (calibration on the first training examples), at which
learning rate the quantizers learn, how the per-subnet losses are averaged between two logs, and the warning about
step sizes that collapsed to their floor.
"""

import torch
from torch import nn
from transformers.utils import logging

from ..architecture import SubnetArchitecture
from ..data import dataset_name
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from ..quantization import collapsed_step_sizes
from .arguments import SupernetTrainingArguments
from .sampling import FixedArchitectureSampler, SandwichSampler
from .step import is_quantizer_parameter


logger = logging.get_logger(__name__)


def make_sandwich_sampler(
    model: SamSupernetForMaskGeneration, args: SupernetTrainingArguments
) -> SandwichSampler | FixedArchitectureSampler:
    """The sampler of a run: `num_random_subnets` random subnets, seeded with `sandwich_seed` or else `seed`; or,
    with `fixed_architecture`, that architecture alone at every step."""
    if args.fixed_architecture is not None:
        return FixedArchitectureSampler(model.config, args.fixed_architecture)
    seed = args.seed if args.sandwich_seed is None else args.sandwich_seed
    return SandwichSampler(model.config, num_random_subnets=args.num_random_subnets, seed=seed)


def warn_collapsed_steps(model: nn.Module, step: int) -> list[str]:
    """Warns (at each log) about activation step sizes at their floor or not finite; returns their names.

    Such a quantizer maps its whole input to one or two codes, so its layer passes nearly nothing on; extraction
    refuses it. A step at its floor still gets a gradient and may recover.
    """
    collapsed = collapsed_step_sizes(model)
    if collapsed:
        shown = ", ".join(collapsed[:5]) + (f" and {len(collapsed) - 5} more" if len(collapsed) > 5 else "")
        logger.warning(
            f"Step {step}: {len(collapsed)} activation step size(s) at their floor or not finite: {shown}. Their "
            "layers pass nearly nothing on; lower the quantizers' learning rate (quantizer_lr_scale) or recalibrate."
        )
    return collapsed


def evaluation_subnets(model: SamSupernetForMaskGeneration) -> dict[str, SubnetArchitecture]:
    """The subnets both paths evaluate: the largest and the smallest of the whole search space, so that numbers stay
    comparable across the progressive bit-width schedule."""
    return {"largest": model.largest_subnet(), "smallest": model.smallest_subnet()}


def record_training_dataset(model: SamSupernetForMaskGeneration, dataset) -> None:
    """Records the training data's name (`mpsupernet.data.dataset_name`) in `model.config.training_dataset`, which
    Pareto fronts and model cards state; a dataset without a name leaves the record as it was."""
    name = dataset_name(dataset)
    if name:
        model.config.training_dataset = name


def calibrate_from_dataset(
    sampler: SandwichSampler, model: SamSupernetForMaskGeneration, dataset, collate_fn, batch_size: int, rank: int
) -> bool:
    """Calibrates the activation quantizers at the start bit-widths on the first training examples of a process.

    Process `rank` takes examples `rank * batch_size` to `(rank + 1) * batch_size - 1` (wrapping around a small
    dataset); the statistics are averaged across processes (`ProgressiveBitsSchedule.calibrate_start_bits`). The
    examples are indexed, not drawn from a dataloader, so that calibrating leaves the random state that shuffles the
    data untouched.

    Args:
        sampler (`SandwichSampler`): its schedule says the start bit-widths.
        model (`SamSupernetForMaskGeneration`): the unwrapped supernet, already on its device.
        dataset: the preprocessed training examples (a `datasets.Dataset` with its transform, or any sequence).
        collate_fn (`Callable`): makes a batch of examples (`mpsupernet.data.collate_fn`).
        batch_size (`int`): examples per process.
        rank (`int`): the index of this process.

    Returns:
        `bool`: whether it calibrated; `False` for a dataset that cannot be indexed (the quantizers then initialise on
        their first training batch).
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        logger.info("The training dataset cannot be indexed: quantizers initialise on their first training batch.")
        return False
    first = rank * batch_size
    batch = collate_fn([dataset[index % len(dataset)] for index in range(first, first + batch_size)])
    pixel_values = batch["pixel_values"].to(next(model.parameters()).device)
    sampler.schedule.calibrate_start_bits(model, pixel_values)
    return True


def split_quantizer_groups(param_groups: list[dict], model: nn.Module, quantizer_lr_scale: float) -> list[dict]:
    """Optimizer parameter groups with the quantizers' step sizes and offsets moved into groups of their own.

    Each group that holds quantizer parameters gives them up to a new group with the same settings and `lr` times
    `quantizer_lr_scale` (Adam moves every parameter by about the learning rate per step, which would change an 8-bit
    step size of 1e-3 by tens of percent per step at the adapters' rate); a group left empty is dropped. The groups
    given are not changed.

    Args:
        param_groups (`list[dict]`): groups with `params` and `lr` (as `torch.optim.Optimizer.param_groups`).
        model (`nn.Module`): names the parameters (`is_quantizer_parameter`).
        quantizer_lr_scale (`float`): the quantizers' learning rate over their group's.

    Returns:
        `list[dict]`: the other parameters' groups, then the quantizers' groups.
    """
    if not quantizer_lr_scale >= 0:
        raise ValueError(f"`quantizer_lr_scale` must be non-negative, got {quantizer_lr_scale!r}.")
    quantizer_ids = {id(p) for name, p in model.named_parameters() if is_quantizer_parameter(name)}
    kept, moved = [], []
    for group in param_groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        others = [p for p in group["params"] if id(p) not in quantizer_ids]
        quantizers = [p for p in group["params"] if id(p) in quantizer_ids]
        if others:
            kept.append({**settings, "params": others})
        if quantizers:
            moved.append({**settings, "params": quantizers, "lr": group["lr"] * quantizer_lr_scale})
    return kept + moved


def quantizer_parameter_groups(model: nn.Module, learning_rate: float, quantizer_lr_scale: float) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters, the quantizers' own at a scaled learning rate.

    Args:
        model (`nn.Module`): the supernet; frozen parameters are left out.
        learning_rate (`float`): the learning rate of the adapters and the mask decoder.
        quantizer_lr_scale (`float`): the quantizers' learning rate is `learning_rate * quantizer_lr_scale`.

    Returns:
        `list[dict]`: `{"params": [...], "lr": learning_rate}`, then `{"params": [...], "lr": learning_rate *
        quantizer_lr_scale}` (see `split_quantizer_groups`; a group without parameters is left out).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return split_quantizer_groups([{"params": trainable, "lr": learning_rate}], model, quantizer_lr_scale)


class SubnetLossWindow:
    """Each subnet's mean loss since the last log, averaged over processes.

    `add` sums the detached per-subnet losses of a micro-batch (`SandwichStepOutput.losses`); `pop_means` returns the
    means over the micro-batches added, rounded to 4 decimals, and empties the window.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0

    def __len__(self) -> int:
        return self.batches

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, loss in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + loss
        self.batches += 1

    def pop_means(self, accelerator) -> dict[str, float]:
        """The means (collective: every process must call it), by subnet name; `{}` for an empty window."""
        if not self.batches:
            return {}
        names = list(self.sums)
        means = accelerator.reduce(torch.stack([self.sums[name] for name in names]) / self.batches, reduction="mean")
        self.sums, self.batches = {}, 0
        return {name: round(value, 4) for name, value in zip(names, means.tolist())}
