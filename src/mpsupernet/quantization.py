"""LSQ fake quantizers that keep one learned step size per bit-width candidate.

A supernet switches a layer between 2 and 8 bits from one step to the next; one shared step size cannot serve both
(the 2-bit grid needs a step about 40 times coarser), so each candidate bit-width owns its step (and offset).
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

from .architecture import FLOAT_BITS, is_float_bits

logger = logging.get_logger(__name__)


class LsqArguments(NamedTuple):
    """What one fake quantization of a tensor `x` takes besides `x` (see [`LsqQuantizer.fake_quantize_arguments`]).

    `step` and `offset` broadcast against `x` (per channel: `(channels, 1, ...)`; per tensor: `(1,)`); `offset` is
    `None` on a signed grid without one. `grad_scale` scales the step's (not the offset's) gradient, as LSQ does.
    """

    step: torch.Tensor
    offset: torch.Tensor | None
    q_min: int
    q_max: int
    grad_scale: float

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """`(x - offset) / step`: `x` on the integer grid's scale, before clamping and rounding."""
        return (x if self.offset is None else x - self.offset) / self.step

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized `x`, computed without keeping anything for backward."""
        # The first op promotes to the result's dtype; the others run in place on that temporary, so that the
        # quantizer never holds more than one copy of `x` besides `x` itself (same values as out-of-place ops).
        quantized = self.scale(x).clamp_(self.q_min, self.q_max).round_().mul_(self.step)
        return quantized if self.offset is None else quantized.add_(self.offset)

    def gradients(
        self, scaled: torch.Tensor, grad_output: torch.Tensor, needs_grad: tuple[bool, bool, bool]
    ) -> tuple[torch.Tensor | None, ...]:
        """The gradients `(x, step, offset)` of the fake quantization, given `scaled = self.scale(x)` (which this
        overwrites) and the gradient of its output; `None` where `needs_grad` says it is not needed.

        LSQ's gradients (Esser et al.; Bhalgat et al. for the offset): the straight-through estimator for `x` inside
        the grid, `round(v) - v` inside and the bound outside for the step (times `grad_scale`), and 1 outside the
        grid for the offset.
        """
        q_min, q_max = self.q_min, self.q_max
        inside = (scaled >= q_min) & (scaled <= q_max)
        grad_x = grad_step = grad_offset = None
        if needs_grad[1]:
            # `(round(clamp(v)) - where(inside, v, 0)) * grad_output`, in place on `scaled` (clamping leaves `v`
            # inside the grid) and one more temporary rather than four; `grad_output` has the output's dtype, which
            # `scaled` has, so the values are those of the out-of-place formula.
            clamped = scaled.clamp_(q_min, q_max)
            step_gradient = clamped.round().sub_(clamped.masked_fill_(~inside, 0)).mul_(grad_output)
            grad_step = step_gradient.sum_to_size(self.step.shape) * self.grad_scale
            del step_gradient, clamped
        if self.offset is not None and needs_grad[2]:
            grad_offset = grad_output.masked_fill(inside, 0).sum_to_size(self.offset.shape)
        if needs_grad[0]:
            # `grad_output * inside` would convert the mask to a new float tensor first: it is written into `scaled`.
            grad_x = grad_output * scaled.copy_(inside)
        return grad_x, grad_step, grad_offset


class LsqFakeQuantize(torch.autograd.Function):
    """`round(clamp((x - offset) / step, q_min, q_max)) * step + offset` with LSQ's gradients, keeping only `x`.

    Written as ordinary ops, autograd would keep three tensors the size of `x` per quantizer (the scaled input, the
    clamp's mask, the rounded codes) until backward; for the attention probabilities of every block that is most of
    a supernet's training memory. Here backward recomputes them from `x` (see [`LsqArguments.gradients`]).

    Call as `LsqFakeQuantize.apply(x, *arguments)` with an [`LsqArguments`].
    """

    @staticmethod
    def forward(ctx, x, step, offset, q_min: int, q_max: int, grad_scale: float):
        ctx.arguments = LsqArguments(None, None, q_min, q_max, grad_scale)
        ctx.save_for_backward(x, step, offset)
        return LsqArguments(step, offset, q_min, q_max, grad_scale).quantize(x)

    @staticmethod
    def backward(ctx, grad_output):
        x, step, offset = ctx.saved_tensors
        arguments = ctx.arguments._replace(step=step, offset=offset)
        grads = arguments.gradients(arguments.scale(x), grad_output, ctx.needs_input_grad[:3])
        return *grads, None, None, None


def tensors_state_key(*tensors: torch.Tensor) -> tuple:
    """A key that changes when any of `tensors` is modified in place, moved or replaced: for caching derived weights.

    Inference tensors (made under `torch.inference_mode`) keep no version counter; they cannot be modified outside
    inference mode, so their storage identifies them.
    """
    return tuple((t.data_ptr(), t.device, t.dtype, None if t.is_inference() else t._version) for t in tensors)


class TensorStatistics(NamedTuple):
    """What a per-tensor step is set from: element count, mean, standard deviation (unbiased; `mean|x|` for a single
    element), minimum and maximum of a tensor (see [`LsqQuantizer.initialize_from_statistics`]).

    [`merge`] combines the statistics of the parts of one tensor into those of the whole, so that a tensor computed a
    part at a time (the attention probabilities of `mpsupernet.chunked_attention`) sets the step the whole would.
    """

    count: int
    mean: torch.Tensor
    std: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> "TensorStatistics":
        """The statistics of `x`, computed in float32."""
        x = x.detach().float()
        return cls(x.numel(), x.mean(), x.std() if x.numel() > 1 else x.abs().mean(), x.min(), x.max())

    @classmethod
    def merge(cls, parts: list["TensorStatistics"]) -> "TensorStatistics":
        """The statistics of the tensor made of `parts` (disjoint, together every element), in float64.

        Chan, Golub and LeVeque's pairwise update: the sum of squared deviations of the whole is that of each part
        plus `count * (part mean - mean)²` per part, which stays accurate where a sum of squares would not.
        """
        if len(parts) == 1:
            return parts[0]
        counts = torch.tensor([part.count for part in parts], dtype=torch.float64, device=parts[0].mean.device)
        means = torch.stack([part.mean for part in parts]).double()
        stds = torch.stack([part.std for part in parts]).double()
        count = counts.sum()
        mean = (counts * means).sum() / count
        squared_deviations = ((counts - 1) * stds.square()).sum() + (counts * (means - mean).square()).sum()
        std = (squared_deviations / (count - 1)).sqrt()
        minimum = torch.stack([part.minimum for part in parts]).min()
        maximum = torch.stack([part.maximum for part in parts]).max()
        return cls(int(count), mean.float(), std.float(), minimum, maximum)


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid of a `bits`-bit quantizer: `[-2^(b-1), 2^(b-1) - 1]` if signed, else `[0, 2^b - 1]`."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class LsqQuantizer(nn.Module):
    """Learned-step-size fake quantizer (LSQ, and LSQ+ with a learned offset) with a step per bit-width.

    Args:
        bit_choices (`list[int]`):
            The bit-widths this quantizer can run at. Setting `active_bits` to 32 (or anything of at least 16)
            turns it into the identity.
        num_channels (`int`, *optional*, defaults to 1):
            Number of step sizes per bit-width: the number of output channels for per-channel weight quantization,
            1 for per-tensor activation quantization.
        signed (`bool`, *optional*, defaults to `True`):
            Whether the integer grid is symmetric around zero (weights) or unsigned (activations with an offset,
            attention probabilities).
        learn_offset (`bool`, *optional*, defaults to `False`):
            Whether a learned offset is subtracted before quantization and added back after (LSQ+).
        step_size_min (`float`, *optional*, defaults to 1e-8):
            Lower bound on the step size, which must stay positive. In a dtype that cannot hold it (1e-8 is 0 in
            fp16), the bound is the dtype's smallest normal number instead (see [`step_floor`]). A step at the bound
            still gets a gradient (the bound is applied with a straight-through estimator), so it can recover.

    Step sizes start uninitialised; they are set from statistics of the first tensor quantized at each bit-width
    (weights: the weight itself; activations: the first calibration or training batch), averaged across processes
    when `torch.distributed` is initialised so that data-parallel replicas stay identical. Statistics that are not
    finite (a NaN pixel in the first batch) are refused with a `ValueError` naming the quantizer (`name`, set by the
    model with [`name_quantizers`]); a step set at its lower bound (an all-zero first batch) is warned about.
    """

    def __init__(
        self,
        bit_choices: list[int],
        num_channels: int = 1,
        signed: bool = True,
        learn_offset: bool = False,
        step_size_min: float = 1e-8,
    ):
        super().__init__()
        self.bit_choices = list(bit_choices)
        self.signed = signed
        self.step_size_min = step_size_min
        self.step_size = nn.Parameter(torch.ones(len(self.bit_choices), num_channels))
        self.offset = nn.Parameter(torch.zeros(len(self.bit_choices), 1)) if learn_offset else None
        self.register_buffer("initialized", torch.zeros(len(self.bit_choices), dtype=torch.bool))
        self.active_bits = FLOAT_BITS
        self.name = "a quantizer"

    def step_floor(self, dtype: torch.dtype) -> float:
        """The lower bound of the step size in `dtype`: `step_size_min`, or the dtype's smallest normal number if
        `step_size_min` is below it (so that the bound is never 0, and `x / step` never `0 / 0`)."""
        return max(self.step_size_min, torch.finfo(dtype).tiny)

    def step_magnitude(self, step: torch.Tensor) -> torch.Tensor:
        """The grid spacing a stored `step` stands for: `|step|`, raised to its floor (see [`step_floor`]).

        A step is a spacing, so its sign means nothing: one that an optimizer step or a checkpoint drove negative
        quantizes with its magnitude. Clamping it to the floor instead would clip every input to the grid's ends, and
        the layer below would get no gradient until the step climbed back above zero.
        """
        return step.abs().clamp_min(self.step_floor(step.dtype))

    def bounded_step(self, step: torch.Tensor) -> torch.Tensor:
        """[`step_magnitude`] in the forward pass, with the gradient of `|step|` without the floor (straight-through).

        With a plain clamp a step at its floor would get no gradient and could never grow again; the sign of the
        gradient follows the step's (a step of exactly 0 counts as positive, so that it still gets one). The forward
        value is the bounded magnitude exactly: written as `step + (bounded - step).detach()`, a step far from the
        floor (3e4 from a checkpoint or a large optimizer step) would round in float32 and turn `x / step` into NaN.
        """
        magnitude = torch.where(step < 0, -step, step)
        return self.step_magnitude(step).detach() + (magnitude - magnitude.detach())

    @torch.no_grad()
    def collapsed_channels(self, bits: int) -> torch.Tensor:
        """Mask of the channels whose `bits`-bit step is at (or below) its floor in magnitude, or not finite."""
        step = self.step_size[self.bit_index(bits)]
        return ~torch.isfinite(step) | (step.abs() <= self.step_floor(step.dtype))

    def extra_repr(self) -> str:
        return f"bit_choices={self.bit_choices}, signed={self.signed}, offset={self.offset is not None}"

    @torch.no_grad()
    def reset_steps(self, initialized: bool = False) -> None:
        """Unit step sizes, zero offsets; `initialized` says whether those values count as set (no data init)."""
        self.step_size.fill_(1.0)
        if self.offset is not None:
            self.offset.zero_()
        self.initialized.fill_(initialized)

    @property
    def is_quantizing(self) -> bool:
        return not is_float_bits(self.active_bits)

    def bit_index(self, bits: int) -> int:
        if bits not in self.bit_choices:
            raise ValueError(f"{bits} bits is not a bit-width of this quantizer; allowed: {self.bit_choices} or 32.")
        return self.bit_choices.index(bits)

    def set_bits(self, bits: int) -> None:
        """Selects the bit-width (32 for no quantization)."""
        if not is_float_bits(bits):
            self.bit_index(bits)
        self.active_bits = bits

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, bits: int, channel_dim: int | None = None) -> None:
        """Sets the step size (and offset) of `bits` from the statistics of `x`.

        Per-channel steps follow LSQ's initialisation (`2 * mean|x| / sqrt(q_max)`), which suits low bit-widths far
        better than max-scaling. Per-tensor steps are set by [`initialize_from_statistics`].
        """
        if channel_dim is None:
            self.initialize_from_statistics(TensorStatistics.of(x), bits)
            return
        _, q_max = integer_range(bits, self.signed)
        per_channel = x.detach().float().transpose(0, channel_dim).flatten(1).abs().mean(dim=1)
        self._set_step(bits, 2 * per_channel / math.sqrt(q_max), low=None, per_tensor=False)

    @torch.no_grad()
    def initialize_from_statistics(self, statistics: TensorStatistics, bits: int) -> None:
        """Sets the per-tensor step size (and offset) of `bits` from the statistics of a tensor.

        The range is clipped to three standard deviations around the mean, which keeps rare outliers from wasting the
        grid; with an offset the grid spans the clipped range, otherwise it is symmetric around zero.
        """
        q_min, q_max = integer_range(bits, self.signed)
        mean, std = statistics.mean, statistics.std
        low = torch.maximum(statistics.minimum, mean - 3 * std)
        high = torch.minimum(statistics.maximum, mean + 3 * std)
        if self.offset is not None:
            step = (high - low) / (q_max - q_min)
            self._sync_mean(low)
        else:
            step, low = torch.maximum(high.abs(), low.abs()) / q_max, None
        self._set_step(bits, step.reshape(1), low, per_tensor=True)

    def _set_step(self, bits: int, step: torch.Tensor, low: torch.Tensor | None, per_tensor: bool) -> None:
        """Checks and stores the step of `bits` (and `low` as the offset of an offset quantizer)."""
        index = self.bit_index(bits)
        if not bool(torch.isfinite(step).all()) or (low is not None and not bool(torch.isfinite(low))):
            raise ValueError(
                f"The {bits}-bit step size of {self.name} would be set from a tensor with non-finite values (NaN or "
                "inf); refusing it, so that the quantizer is not poisoned. Check the input images (a NaN pixel?) "
                "before calibrating or training."
            )
        floor = self.step_floor(self.step_size.dtype)
        if per_tensor and bool(step.le(floor).all()):
            logger.warning(
                f"The {bits}-bit step size of {self.name} starts at its floor ({floor:.3g}): the tensor it was set "
                "from is all (nearly) zero. Calibrate it on real images."
            )
        step = step.clamp_min(floor)
        self._sync_mean(step)
        if low is not None:
            self.offset.data[index] = low
        self.step_size.data[index] = step.to(self.step_size.dtype)
        self.initialized[index] = True

    @staticmethod
    def _sync_mean(tensor: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and tensor.device.type != "meta":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= dist.get_world_size()

    def forward(self, x: torch.Tensor, channel_index: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantizes `x` at the active bit-width, first initialising that bit-width's step from `x` if unset.

        Args:
            x (`torch.Tensor`): the tensor; per-channel quantizers take a weight of shape `(out, in)`.
            channel_index (`torch.Tensor`, *optional*): the output channels `x` holds, when a sliced weight is
                quantized (elastic width); defaults to all channels.
        """
        if not self.is_quantizing:
            return x
        self.ensure_initialized(x)
        return self.fake_quantize(x, self.active_bits, self.step_size, self.offset, channel_index)

    def ensure_initialized(self, x: torch.Tensor, bits: int | None = None) -> None:
        """Initialises the step (and offset) of `bits` (default: the active bit-width) from `x` if it is not set yet,
        as `forward` does; nothing at a float bit-width."""
        bits = self.active_bits if bits is None else bits
        if x.device.type != "meta" and self.needs_initialization(bits):
            self.initialize(x, bits, channel_dim=0 if self.step_size.shape[1] > 1 else None)

    def needs_initialization(self, bits: int) -> bool:
        """Whether the step of `bits` is still unset (never at a float bit-width, which has none)."""
        return not is_float_bits(bits) and not bool(self.initialized[self.bit_index(bits)])

    def quantize_function(self):
        """The active fake quantization as a function of `(x, step_size, offset)`, or `None` at a float bit-width.

        The bit-width is frozen when it is made, so that a quantized tensor recomputed in the backward pass is the
        one the forward pass used even if another subnet was activated in between (see `RecomputedWeightLinear`).
        """
        if not self.is_quantizing:
            return None
        bits = self.active_bits

        def quantize(x, step_size, offset):
            return self.fake_quantize(x, bits, step_size, offset)

        return quantize

    def quantize_tables(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The tensors `quantize_function()` takes besides `x`: the step-size table and the offset table (or `None`)."""
        return self.step_size, self.offset

    def fake_quantize(
        self,
        x: torch.Tensor,
        bits: int,
        step_size: torch.Tensor,
        offset: torch.Tensor | None = None,
        channel_index: torch.Tensor | None = None,
        elements: int | None = None,
    ) -> torch.Tensor:
        """Fake-quantizes `x` at `bits` with the given step-size (and offset) tables, one row per bit-width.

        The tables are arguments rather than read from the module so that a caller can recompute a quantized tensor
        from detached copies of them (see `QuantizedLoraLinear`); `forward` passes the module's own. `elements` is
        for a per-tensor step applied to `x` as a part of a larger tensor (see [`fake_quantize_arguments`]).
        """
        if is_float_bits(bits):
            return x
        arguments = self.fake_quantize_arguments(x, bits, step_size, offset, channel_index, elements)
        return LsqFakeQuantize.apply(x, *arguments)

    def fake_quantize_arguments(
        self, x: torch.Tensor, bits: int, step_size: torch.Tensor, offset=None, channel_index=None, elements=None
    ) -> LsqArguments:
        """The step (bounded, per channel of `x` or per tensor), offset, integer range and step-gradient scale with
        which [`fake_quantize`] quantizes `x` at `bits` (not a float bit-width), from the same arguments; the step
        and offset keep their autograd graph back to the tables.

        LSQ scales the step's gradient by `1 / sqrt(elements per step * q_max)`. A per-tensor step applied to a part
        of a tensor (a chunk of attention probabilities) passes the whole tensor's element count as `elements`, so
        that the parts' step gradients add up to the whole tensor's.
        """
        index = self.bit_index(bits)
        q_min, q_max = integer_range(bits, self.signed)
        step = self.bounded_step(step_size[index])
        if step_size.shape[1] > 1:
            if channel_index is not None:
                step = step[channel_index.to(step.device)]
            step = step.reshape(-1, *([1] * (x.dim() - 1)))
            elements_per_step = x[0].numel()
        else:
            elements_per_step = x.numel() if elements is None else elements
        offset = offset[index] if offset is not None else None
        grad_scale = 1.0 / math.sqrt(elements_per_step * q_max)
        return LsqArguments(step, offset, q_min, q_max, grad_scale)

    @torch.no_grad()
    def quantize_to_integers(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes and per-channel scales of a weight at `bits` (for export): `x ≈ codes * scales`."""
        index = self.bit_index(bits)
        q_min, q_max = integer_range(bits, self.signed)
        step = self.step_magnitude(self.step_size[index])
        step = step.reshape(-1, *([1] * (x.dim() - 1)))
        codes = torch.clamp(torch.round(x / step), q_min, q_max).to(torch.int8)
        return codes, step.reshape(-1)


def name_quantizers(model: nn.Module) -> None:
    """Names every `LsqQuantizer` of `model` by its module path, for the messages that must say which one failed."""
    for name, module in model.named_modules():
        if isinstance(module, LsqQuantizer):
            module.name = name


@contextmanager
def quantizers_restored_on_error(model: nn.Module) -> Iterator[None]:
    """Puts every `LsqQuantizer` of `model` back as it was (steps, offsets, which bit-widths are set) if the `with`
    block raises: a refused calibration or extraction changes nothing, even when it fails after some quantizers
    were initialised from the tensors they saw first. The quantizers are small: the copy costs little."""
    saved = {
        name: {key: value.detach().clone() for key, value in module.state_dict().items()}
        for name, module in model.named_modules()
        if isinstance(module, LsqQuantizer)
    }
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for name, state in saved.items():
                model.get_submodule(name).load_state_dict(state)
        raise


def collapsed_step_sizes(model: nn.Module) -> list[str]:
    """`"<quantizer> (<bits>-bit)"` for every calibrated per-tensor step of `model` at its floor or not finite.

    Per-channel weight steps are left out: an all-zero weight row legitimately has its step at the floor
    (extraction checks those rows against the weight).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LsqQuantizer) and module.step_size.shape[1] == 1:
            for index, bits in enumerate(module.bit_choices):
                if bool(module.initialized[index]) and bool(module.collapsed_channels(bits).any()):
                    found.append(f"{name} ({bits}-bit)")
    return found
