"""The sandwich rule of supernet training: which subnets train at a step (the step itself is `training.step`).

Every optimizer step trains the largest subnet, the smallest one and a few random ones on the same batch, with the
gradients of all of them accumulated before one update (OFA / BigNAS "sandwich rule"). The bit-widths a step may
use grow over training, from high to low (`SamSupernetConfig.progressive_bits_schedule`); a bit-width enabled late
starts from the step sizes its quantizers learned at the next higher bit-width.

Both training paths sample with this module: `SupernetTrainer` (the transformers `Trainer`) and `train_supernet` (a
plain Accelerate loop).
"""

import random

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..architecture import SubnetArchitecture
from ..configuration_sam_supernet import SamSupernetConfig, validate_progressive_schedule
from ..modeling_sam_supernet import SamSupernetForMaskGeneration
from ..quantization import LsqQuantizer
from ..search_space import SearchSpace


logger = logging.get_logger(__name__)


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
