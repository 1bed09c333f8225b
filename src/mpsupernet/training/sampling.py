"""The sandwich rule of supernet training: which subnets train at a step, and the step that trains them.

Every optimizer step trains the largest subnet, the smallest one and a few random ones on the same batch, with the
gradients of all of them accumulated before one update (OFA / BigNAS "sandwich rule"). The bit-widths a step may
use grow over training, from high to low (`SamSupernetConfig.progressive_bits_schedule`); a bit-width enabled late
starts from the step sizes its quantizers learned at the next higher bit-width.

Both training paths share this module: `SupernetTrainer` (the transformers `Trainer`) and `train_supernet` (a plain
Accelerate loop).
"""

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers.utils import logging

from ..architecture import parameter_kind
from ..configuration_sam_supernet import SamSupernetConfig, validate_progressive_schedule
from ..data.processing import MODEL_INPUT_NAMES
from ..evaluation import evaluate_mean_iou
from ..modeling_sam_semantic import SamSupernetForSemanticSegmentation
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from ..semantic_evaluation import evaluate_class_mean_iou
from ..quantization import LsqQuantizer
from ..search_space import SearchSpace, SubnetArchitecture
from .losses import DISTILLATION_KINDS, mask_distillation_loss, sam_loss
from .semantic import check_semantic_batch, semantic_training_step


logger = logging.get_logger(__name__)

DISTILLATION_TEACHERS = ("largest", "full_precision")
PROMPT_INPUT_NAMES = ("input_boxes", "input_points")
QUANTIZER_LR_SCALE = 0.01
"""Default ratio of the quantizers' learning rate to the adapters' (see `policies.quantizer_parameter_groups`)."""


def is_quantizer_parameter(name: str) -> bool:
    """Whether a parameter name is a quantizer's step size or offset (see `mpsupernet.architecture.parameter_kind`)."""
    return parameter_kind(name) == "quantizer"


def _check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"The training progress fraction must be in [0, 1], got {fraction!r}.")
    return float(fraction)


class ProgressiveBitsSchedule:
    """The bit-widths enabled at each point of training, and the step-size hand-over to newly enabled ones.

    The schedule is `config.progressive_bits_schedule`: pairs `[fraction, [bits, ...]]`; from `fraction` of training
    on, those bit-widths are enabled in addition to the ones enabled before. The weight bit-widths a subnet may use
    are the enabled ones among `config.weight_bit_choices`, and likewise for activations.

    Args:
        config (`SamSupernetConfig`): the supernet configuration.

    Raises:
        `ValueError`: if the schedule is malformed, or enables no weight or no activation bit-width at the start.
    """

    def __init__(self, config: SamSupernetConfig):
        weight_choices, activation_choices = set(config.weight_bit_choices), set(config.activation_bit_choices)
        schedule = config.progressive_bits_schedule
        # The config validates the schedule when it is built; this catches one edited afterwards.
        validate_progressive_schedule(schedule, weight_choices | activation_choices)
        self.schedule = tuple((float(fraction), tuple(bits)) for fraction, bits in schedule)
        self.weight_choices = tuple(sorted(weight_choices, reverse=True))
        self.activation_choices = tuple(sorted(activation_choices, reverse=True))
        if not self.weight_bit_choices(0.0) or not self.activation_bit_choices(0.0):
            raise ValueError(
                f"`progressive_bits_schedule` starts with {list(self.schedule[0][1])} bits, which leaves no weight "
                f"bit-width (choices {list(self.weight_choices)}) or no activation bit-width (choices "
                f"{list(self.activation_choices)}) enabled; the first entry must enable at least one of each."
            )
        self._applied_bits: tuple[int, ...] | None = None

    def enabled_bits(self, fraction: float) -> tuple[int, ...]:
        """All bit-widths enabled at `fraction` (in [0, 1]) of training, highest first."""
        fraction = _check_fraction(fraction)
        enabled = {bits for start, entry in self.schedule if start <= fraction for bits in entry}
        return tuple(sorted(enabled, reverse=True))

    def weight_bit_choices(self, fraction: float) -> tuple[int, ...]:
        """The weight bit-widths a subnet may use at `fraction` of training, highest first."""
        return tuple(bits for bits in self.enabled_bits(fraction) if bits in self.weight_choices)

    def activation_bit_choices(self, fraction: float) -> tuple[int, ...]:
        """The activation bit-widths a subnet may use at `fraction` of training, highest first."""
        return tuple(bits for bits in self.enabled_bits(fraction) if bits in self.activation_choices)

    @torch.no_grad()
    def initialize_new_bits(self, model: nn.Module, fraction: float) -> int:
        """Hands step sizes over to the bit-widths enabled after the start, once per quantizer and bit-width.

        For every `LsqQuantizer` of `model` and every bit-width enabled at `fraction` but not at the start whose
        `initialized` flag is still `False`, the step sizes (and the offset, LSQ+) of the next higher enabled
        bit-width are copied into it and the flag is set. The source is the nearest higher enabled bit-width that is
        itself initialised; a quantizer with none keeps its usual initialisation from data at first use. Bit-widths
        are handled from high to low, so that 2 bits enabled together with 3 bits start from 3 bits' steps.

        The flags are part of the model's state, so a resumed run never copies twice; no communication is needed
        because every data-parallel replica holds the same state. The work is done only when the enabled set
        changes (and at the first call), so calling this at every step is cheap.

        Args:
            model (`nn.Module`): the supernet (unwrapped from DDP or not).
            fraction (`float`): the training progress in [0, 1].

        Returns:
            `int`: the number of (quantizer, bit-width) step sizes copied by this call.
        """
        enabled = self.enabled_bits(fraction)
        if enabled == self._applied_bits:
            return 0
        late_bits = [bits for bits in enabled if bits not in self.enabled_bits(0.0)]
        copied = 0
        for module in model.modules():
            if not isinstance(module, LsqQuantizer):
                continue
            for bits in late_bits:
                if bits in module.bit_choices and not bool(module.initialized[module.bit_index(bits)]):
                    copied += _copy_from_next_higher_bits(module, bits, enabled)
        if late_bits:
            logger.info(
                f"Progressive bit-widths: {list(enabled)} bits enabled at {fraction:.0%} of training; "
                f"{copied} quantizer step size(s) started from the next higher bit-width."
            )
        self._applied_bits = enabled
        return copied

    def calibrate_start_bits(self, model: SamSupernetForMaskGeneration, pixel_values: torch.Tensor) -> None:
        """Sets the activation step sizes of the bit-widths enabled at the start from one batch of images.

        Each activation step size is otherwise set from the first tensor it quantizes, inside a training forward
        pass. Calibrating first, before the model is wrapped for distributed training, makes the initialisation
        independent of which subnets train first, and keeps it out of wrappers that shard or shadow parameters
        (FSDP, DeepSpeed), where a write in the forward pass would be lost. Bit-widths enabled later start from the
        next higher one instead (`initialize_new_bits`). In a distributed run every process must call this: the
        statistics are averaged across processes.

        Args:
            model (`SamSupernetForMaskGeneration`): the unwrapped supernet.
            pixel_values (`torch.Tensor`): calibration images on the model's device, as the processor makes them.
        """
        model.calibrate_quantizers(
            pixel_values,
            activation_bits=self.activation_bit_choices(0.0),
            weight_bits=self.weight_bit_choices(0.0)[0],
        )

    def pending_copies(self, model: nn.Module) -> int:
        """How many (quantizer, bit-width) step sizes `initialize_new_bits` will still copy during training.

        Counts the bit-widths enabled after the start that a quantizer of `model` has not initialised yet.
        """
        late_bits = set(self.enabled_bits(1.0)) - set(self.enabled_bits(0.0))
        return sum(
            not bool(module.initialized[module.bit_index(bits)])
            for module in model.modules()
            if isinstance(module, LsqQuantizer)
            for bits in late_bits & set(module.bit_choices)
        )


def _copy_from_next_higher_bits(quantizer: LsqQuantizer, bits: int, enabled: tuple[int, ...]) -> int:
    target = quantizer.bit_index(bits)
    for source_bits in sorted(b for b in quantizer.bit_choices if b > bits and b in enabled):
        source = quantizer.bit_index(source_bits)
        if bool(quantizer.initialized[source]):
            quantizer.step_size.data[target] = quantizer.step_size.data[source]
            if quantizer.offset is not None:
                quantizer.offset.data[target] = quantizer.offset.data[source]
            quantizer.initialized[target] = True
            return 1
    return 0


class SandwichSampler:
    """Draws the subnets of each training step: the largest, the smallest and `num_random_subnets` random ones.

    The draw is a pure function of `(seed, step)` and the progress fraction: a resumed run draws the same subnets as
    an uninterrupted one, and every data-parallel rank draws the same ones without any communication. The largest
    and smallest subnets use the highest and lowest bit-widths enabled at that point of the progressive schedule,
    and random subnets draw their bit-widths among the enabled ones.

    Args:
        config (`SamSupernetConfig`): the supernet configuration (search space and progressive schedule).
        num_random_subnets (`int`, *optional*, defaults to 2): random subnets per step, besides the two ends.
        seed (`int`, *optional*, defaults to 0): seed of the random subnets.

    Attributes:
        search_space (`SearchSpace`), schedule (`ProgressiveBitsSchedule`).
    """

    def __init__(self, config: SamSupernetConfig, num_random_subnets: int = 2, seed: int = 0):
        if not isinstance(num_random_subnets, int) or num_random_subnets < 0:
            raise ValueError(f"`num_random_subnets` must be a non-negative integer, got {num_random_subnets!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
        self.search_space = SearchSpace(config)
        self.schedule = ProgressiveBitsSchedule(config)
        self.num_random_subnets = num_random_subnets
        self.seed = seed

    def sample(self, step: int, fraction: float) -> dict[str, SubnetArchitecture]:
        """The subnets to train at `step`, in training order: `largest`, `smallest`, `random_0`, `random_1`, ...

        Args:
            step (`int`): the optimizer step (0-based); all micro-batches of one step train the same subnets.
            fraction (`float`): the training progress in [0, 1] (usually `step / max_steps`).

        Returns:
            `dict[str, SubnetArchitecture]`, the largest subnet first (it is the distillation teacher).
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be a non-negative integer, got {step!r}.")
        weight_bits = self.schedule.weight_bit_choices(fraction)
        activation_bits = self.schedule.activation_bit_choices(fraction)
        space = self.search_space
        archs = {
            "largest": space.largest(weight_bits[0], activation_bits[0]),
            "smallest": space.smallest(weight_bits[-1], activation_bits[-1]),
        }
        # SeedSequence mixes (seed, step) into well-separated streams; consecutive steps must not share draws.
        rng = random.Random(int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0]))
        for index in range(self.num_random_subnets):
            archs[f"random_{index}"] = space.sample(
                rng, weight_bit_choices=weight_bits, activation_bit_choices=activation_bits
            )
        return archs


class FixedArchitectureSampler:
    """The "sampler" of a run that trains one architecture alone: every step trains it and nothing else.

    That is how a dedicated model of one architecture (a tier trained for its budget alone) or a standalone fine-tune
    of a subnet trains with the same loop, adapters and quantizers as the supernet. The progressive schedule stays (the
    loop initialises newly enabled bit-widths from it) but does not restrict the architecture's bits.

    Args:
        config (`SamSupernetConfig`): the supernet configuration.
        architecture (`SubnetArchitecture` or `dict`): the architecture; checked against the search space.

    Raises:
        `ValueError`: if the architecture is not in the search space (the message names the value).
    """

    def __init__(self, config: SamSupernetConfig, architecture: SubnetArchitecture | dict):
        if isinstance(architecture, dict):
            architecture = SubnetArchitecture.from_dict(architecture)
        self.search_space = SearchSpace(config)
        self.search_space.validate(architecture)
        self.schedule = ProgressiveBitsSchedule(config)
        self.architecture = self.search_space.canonical(architecture)

    def sample(self, step: int, fraction: float) -> dict[str, SubnetArchitecture]:
        """`{"fixed": architecture}` at every step."""
        return {"fixed": self.architecture}


def check_training_batch(batch: dict) -> None:
    """Raises a `ValueError` naming what is missing if `batch` cannot train a SAM supernet.

    A batch needs `pixel_values`, `ground_truth_masks` and at least one prompt (`input_boxes` or `input_points`
    with `input_labels`), as `mpsupernet.data.SamSegmentationPreprocessor` and `collate_fn` make them.
    """
    missing = [name for name in ("pixel_values", "ground_truth_masks") if name not in batch]
    if not any(name in batch for name in PROMPT_INPUT_NAMES):
        missing.append(" or ".join(PROMPT_INPUT_NAMES))
    if "input_points" in batch and "input_labels" not in batch:
        missing.append("input_labels")
    if missing:
        raise ValueError(
            f"The training batch lacks {missing}; it has {sorted(batch)}. Preprocess the dataset with "
            "`mpsupernet.data.SamSegmentationPreprocessor` (through `Dataset.set_transform`) and batch it with "
            "`mpsupernet.data.collate_fn`; with the Trainer, keep `remove_unused_columns=False`."
        )


def check_distributed_support(
    accelerator: Accelerator, model: SamSupernetForMaskGeneration, schedule: ProgressiveBitsSchedule
) -> None:
    """Refuses a run whose progressive schedule would write step sizes under FSDP or DeepSpeed.

    Handing step sizes to a newly enabled bit-width writes into parameters in the middle of training. FSDP keeps
    only a shard of each parameter outside the forward pass, and DeepSpeed keeps master copies in its optimizer that
    overwrite the model's parameters at the next step, so such a write would be lost or misplaced. DDP keeps whole
    parameters on every process and is unaffected.

    Raises:
        `ValueError`: under FSDP or DeepSpeed, if some quantizer still needs a step size from a higher bit-width.
    """
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    pending = schedule.pending_copies(model)
    if pending:
        raise ValueError(
            f"The progressive schedule {model.config.progressive_bits_schedule} would copy {pending} quantizer step "
            f"size(s) into newly enabled bit-widths during training, which {accelerator.distributed_type.value} "
            "cannot take (parameters are sharded or shadowed by the optimizer). Train with DDP, or use a schedule "
            "whose bit-widths are all enabled at fraction 0.0."
        )


@dataclass
class SandwichStepOutput:
    """What one sandwich step computed, per subnet (detached, before any gradient-accumulation scaling).

    Args:
        losses (`dict[str, torch.Tensor]`): total loss of each subnet (SAM loss plus weighted distillation).
        distillation_losses (`dict[str, torch.Tensor]`): distillation loss of each distilled subnet (unweighted).
    """

    losses: dict[str, torch.Tensor]
    distillation_losses: dict[str, torch.Tensor]

    @property
    def total(self) -> torch.Tensor:
        """Sum of the subnets' losses: what the accumulated gradient is the gradient of."""
        return torch.stack(list(self.losses.values())).sum()


def check_distillation(teacher: str | None, kind: str = "kl") -> None:
    """Raises a `ValueError` naming the value if the distillation teacher or kind is unknown."""
    if teacher is not None and teacher not in DISTILLATION_TEACHERS:
        raise ValueError(f"Unknown distillation teacher {teacher!r}; allowed: {list(DISTILLATION_TEACHERS)} or None.")
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"Unknown distillation kind {kind!r}; allowed: {list(DISTILLATION_KINDS)}.")


@contextlib.contextmanager
def _defer_gradient_sync(accelerator: Accelerator, model: nn.Module):
    """Backward passes inside accumulate gradients locally; the next one outside synchronises everything.

    DDP (and FSDP) skip their all-reduce under `no_sync`. DeepSpeed's engine instead steps its optimizer after every
    backward that accelerate marks as a sync point, so the sync flag is lowered as well. Only entered when the caller
    would synchronise (`accelerator.sync_gradients`): otherwise the caller's own `no_sync` already covers every
    backward, and FSDP2's `no_sync` would switch synchronisation back on when it exits.
    """
    gradient_state = accelerator.gradient_state
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        gradient_state._set_sync_gradients(True)


def check_batch_for(supernet, batch: dict) -> None:
    """Raises a `ValueError` naming what is missing if `batch` cannot train `supernet` (its task's inputs)."""
    if isinstance(supernet, SamSupernetForSemanticSegmentation):
        check_semantic_batch(batch)
    else:
        check_training_batch(batch)


def _check_step_inputs(supernet, batch: dict, archs: dict, distillation: str | None, distillation_kind: str) -> None:
    check_distillation(distillation, distillation_kind)
    if not archs:
        raise ValueError("`archs` is empty; give at least one subnet to train.")
    if distillation == "largest" and next(iter(archs)) != "largest":
        raise ValueError(
            f"With distillation='largest' the first subnet must be named 'largest' (it is the teacher); got the "
            f"order {list(archs)}."
        )
    check_batch_for(supernet, batch)


@torch.no_grad()
def _full_precision_logits(model: nn.Module, supernet, inputs: dict, multimask_output: bool) -> torch.Tensor:
    """The mask logits of the full-precision subnet, the teacher of `distillation="full_precision"`."""
    supernet.set_subnet(supernet.full_precision_subnet())
    return model(**inputs, multimask_output=multimask_output).pred_masks.float()


def supernet_training_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    archs: dict[str, SubnetArchitecture],
    *,
    accelerator: Accelerator,
    loss_scale: float = 1.0,
    distillation: str | None = "largest",
    distillation_kind: str = "kl",
    distillation_weight: float = 1.0,
    multimask_output: bool = False,
    backward_kwargs: dict | None = None,
) -> SandwichStepOutput:
    """Trains the sandwich on one batch: forward and backward of every subnet, gradients accumulated.

    For each subnet in order: activate it, run the batch, compute SAM's loss (focal + dice + IoU MSE) against
    `ground_truth_masks` and, for every subnet but the teacher, add `distillation_weight` times the in-place
    distillation loss towards the teacher's mask logits; then backpropagate `loss * loss_scale` at once.

    Memory: each subnet is backpropagated right after its forward, so only one subnet's activations live at a time
    (summing the losses and calling backward once would hold all of them). With several backward passes per
    optimizer step, data-parallel gradients must be reduced once, not once per subnet: every backward but the last
    runs under `accelerator.no_sync`, and the last one reduces the gradients accumulated by all of them. When the
    caller does not synchronise this micro-batch (`accelerator.sync_gradients` is False: not the last micro-batch of
    a gradient-accumulation cycle, already under the caller's `no_sync`), nothing is reduced at all. DDP must be
    built with `find_unused_parameters=True`: subnets use different adapters, heads and blocks, so the last backward
    does not reach every trained parameter.

    Args:
        model (`nn.Module`): the supernet as prepared by `accelerator` (possibly wrapped in DDP).
        batch (`dict[str, torch.Tensor]`): a batch from `mpsupernet.data.collate_fn`, on the model's device.
        archs (`dict[str, SubnetArchitecture]`): the subnets, e.g. from `SandwichSampler.sample`; with
            `distillation="largest"` the first must be named `"largest"`.
        accelerator (`Accelerator`): runs the backward passes (mixed precision, DeepSpeed) and defers the syncs.
        loss_scale (`float`, *optional*, defaults to 1.0): multiplies every loss before backward (the Trainer divides
            by its gradient-accumulation steps here; accelerate's own loop lets `accelerator.backward` do it).
        distillation (`str`, *optional*, defaults to `"largest"`): the teacher of in-place distillation.
            `"largest"`: the largest subnet's mask logits of this very step, detached (no extra cost); the other
            subnets learn from it. `"full_precision"`: the supernet's full-precision subnet (float weights with the
            current adapters and mask decoder), run once more without gradients; every subnet, the largest
            included, learns from it. `None`: no distillation. A teacher with the adapters switched off is not
            offered: the mask decoder trains too, so the base model no longer exists inside the supernet once
            training has started.
        distillation_kind (`str`, *optional*, defaults to `"kl"`): `"kl"` or `"mse"`, see
            `mpsupernet.training.mask_distillation_loss`.
        distillation_weight (`float`, *optional*, defaults to 1.0): weight of the distillation loss.
        multimask_output (`bool`, *optional*, defaults to `False`): whether SAM predicts three masks per prompt
            (the best one is trained, as in SAM) or one.
        backward_kwargs (`dict`, *optional*): passed to `accelerator.backward`.

    Returns:
        `SandwichStepOutput` with each subnet's (detached, unscaled) losses.
    """
    supernet = accelerator.unwrap_model(model)
    _check_step_inputs(supernet, batch, archs, distillation, distillation_kind)
    if isinstance(supernet, SamSupernetForSemanticSegmentation):
        return semantic_training_step(
            model,
            batch,
            archs,
            accelerator=accelerator,
            defer_gradient_sync=_defer_gradient_sync,
            loss_scale=loss_scale,
            distillation=distillation,
            distillation_kind=distillation_kind,
            distillation_weight=distillation_weight,
            backward_kwargs=backward_kwargs,
        )
    inputs = {name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}
    targets = batch["ground_truth_masks"]
    teacher_logits = None
    if distillation == "full_precision":
        teacher_logits = _full_precision_logits(model, supernet, inputs, multimask_output)

    losses, distillation_losses = {}, {}
    names = list(archs)
    for position, name in enumerate(names):
        supernet.set_subnet(archs[name])
        defer_sync = accelerator.sync_gradients and position < len(names) - 1
        with _defer_gradient_sync(accelerator, model) if defer_sync else contextlib.nullcontext():
            outputs = model(**inputs, multimask_output=multimask_output)
            pred_masks = outputs.pred_masks.float()
            loss = sam_loss(pred_masks, outputs.iou_scores.float(), targets).loss
            if distillation == "largest" and name == "largest":
                teacher_logits = pred_masks.detach()
            elif teacher_logits is not None:
                distilled = mask_distillation_loss(pred_masks, teacher_logits, kind=distillation_kind)
                distillation_losses[name] = distilled.detach()
                loss = loss + distillation_weight * distilled
            accelerator.backward(loss * loss_scale, **(backward_kwargs or {}))
        losses[name] = loss.detach()
    return SandwichStepOutput(losses=losses, distillation_losses=distillation_losses)


def evaluate_subnets(
    model: nn.Module, dataloader, archs: dict[str, SubnetArchitecture], **evaluate_kwargs
) -> dict[str, float]:
    """Mean mask IoU of each subnet on a dataloader (see `mpsupernet.evaluation.evaluate_mean_iou`); for a semantic
    supernet, the dataset-level class mIoU (`mpsupernet.semantic_evaluation.evaluate_class_mean_iou`).

    The model's active subnet is restored afterwards.

    Args:
        model (`SamSupernetForMaskGeneration`): the (unwrapped) supernet.
        dataloader: batches from `mpsupernet.data.collate_fn`; in a distributed run, each process's shard.
        archs (`dict[str, SubnetArchitecture]`): the subnets to evaluate, by name.
        evaluate_kwargs: passed to `evaluate_mean_iou` (`multimask_output`, `device`, `show_progress`, ...).

    Returns:
        `dict[str, float]`: the mean IoU of each subnet.
    """
    results = {}
    for name, arch in archs.items():
        if isinstance(model, SamSupernetForSemanticSegmentation):
            with model.using_subnet(arch):
                results[name] = evaluate_class_mean_iou(
                    model, dataloader, description=f"class mIoU of the {name} subnet", **evaluate_kwargs
                )["mean_iou"]
            continue
        with model.using_subnet(arch):
            results[name] = evaluate_mean_iou(
                model, dataloader, description=f"mIoU of the {name} subnet", **evaluate_kwargs
            )
    return results
