"""Quantization-aware LoRA: the adapter is added to the frozen weight *before* the weight is quantized.

peft's LoRA runs beside the base layer (`base(x) + B(A(x))·s`), outside any quantizer, so its float side branch would
survive into a deployed low-bit model. Here the quantizer sees the merged weight, `y = Q_a(x) · Q_w(W0 + s·B·A)ᵀ + b`,
so an extracted subnet folds the adapter into one quantized weight at no extra cost.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import FLOAT_BITS, is_float_bits
from .quantization import LsqFakeQuantize, LsqQuantizer, tensors_state_key
from .recompute import autocast_state, detached_leaves, gradient_edge, gradients_of


def num_adapters(lora_mode: str, num_weight_bits: int) -> int:
    """How many (A, B) pairs a layer holds: 1 (shared), one per weight bit-width (multiplex), or both (multipath)."""
    return {"shared": 1, "multiplex": num_weight_bits, "multipath": 1 + num_weight_bits}[lora_mode]


class QuantizedLoraLinear(nn.Linear):
    """A frozen `nn.Linear` with elastic width, bit-width-selected LoRA adapters and LSQ fake quantizers.

    It subclasses `nn.Linear` so that its `weight` and `bias` keep the names of the layer it replaces, and a SAM
    state dict loads into it unchanged.

    Args:
        in_features (`int`), out_features (`int`), bias (`bool`): as for `nn.Linear`.
        weight_bit_choices (`list[int]`): the weight bit-widths; each owns a step size (and, in multiplex and
            multipath mode, an adapter).
        activation_bit_choices (`list[int]`): the input-activation bit-widths.
        lora_rank (`int`), lora_alpha (`float`): adapter rank and scaling (`lora_alpha / lora_rank`).
        lora_mode (`str`): `"shared"`, `"multiplex"` or `"multipath"` (see `SamSupernetConfig`).
        activation_offset (`bool`): unsigned activation grid with a learned offset (LSQ+) instead of a signed one.
        step_size_min (`float`): lower bound on every step size.

    The active sub-layer is set with [`~QuantizedLoraLinear.set_active`]: which output rows are kept (an index, for
    heads and MLP units), how many input columns, and the weight and activation bit-widths (32 = float).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_bit_choices: list[int],
        activation_bit_choices: list[int],
        lora_rank: int,
        lora_alpha: float,
        lora_mode: str,
        activation_offset: bool = True,
        step_size_min: float = 1e-8,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.weight_bit_choices = list(weight_bit_choices)
        self.lora_mode = lora_mode
        self.lora_scaling = lora_alpha / lora_rank
        count = num_adapters(lora_mode, len(self.weight_bit_choices))
        self.lora_A = nn.Parameter(torch.empty(count, lora_rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(count, out_features, lora_rank))
        self.reset_lora_parameters()
        self.weight_quantizer = LsqQuantizer(
            self.weight_bit_choices, num_channels=out_features, signed=True, step_size_min=step_size_min
        )
        self.input_quantizer = LsqQuantizer(
            activation_bit_choices,
            signed=not activation_offset,
            learn_offset=activation_offset,
            step_size_min=step_size_min,
        )
        self.output_index: torch.Tensor | None = None
        self.active_in_features = in_features
        self._cached_weight: tuple[tuple, torch.Tensor] | None = None

    def reset_lora_parameters(self) -> None:
        """A as in `nn.Linear`'s default init, B at zero: a fresh adapter leaves the layer's output unchanged."""
        for adapter in self.lora_A.data:
            nn.init.kaiming_uniform_(adapter, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lora_rank={self.lora_A.shape[1]}, lora_mode={self.lora_mode}, "
            f"weight_bits={self.weight_quantizer.active_bits}, activation_bits={self.input_quantizer.active_bits}"
        )

    def set_active(
        self,
        weight_bits: int = FLOAT_BITS,
        activation_bits: int = FLOAT_BITS,
        output_index: torch.Tensor | None = None,
        in_features: int | None = None,
    ) -> None:
        """Selects the active sub-layer.

        Args:
            weight_bits (`int`): weight bit-width, or 32 for float.
            activation_bits (`int`): input-activation bit-width, or 32 for float.
            output_index (`torch.Tensor`, *optional*): the output rows kept, in order; `None` keeps all.
            in_features (`int`, *optional*): the number of leading input columns kept; `None` keeps all.
        """
        self.weight_quantizer.set_bits(weight_bits)
        self.input_quantizer.set_bits(activation_bits)
        self.output_index = output_index
        self.active_in_features = self.in_features if in_features is None else in_features
        self._cached_weight = None

    def adapter_indices(self, weight_bits: int) -> list[int]:
        """The adapters that serve `weight_bits`; a float layer uses those of the highest weight bit-width."""
        if self.lora_mode == "shared":
            return [0]
        bits = max(self.weight_bit_choices) if is_float_bits(weight_bits) else weight_bits
        per_bits = self.weight_bit_choices.index(bits)
        return [per_bits] if self.lora_mode == "multiplex" else [0, 1 + per_bits]

    def merged_weight(self, weight_bits: int | None = None) -> torch.Tensor:
        """`W0 + s·B·A` for the active rows and columns, before quantization."""
        weight_bits = self.weight_quantizer.active_bits if weight_bits is None else weight_bits
        return self._merge(
            self.weight, self.lora_A, self.lora_B, weight_bits, self.output_index, self.active_in_features
        )

    def _merge(
        self,
        weight: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        weight_bits: int,
        rows: torch.Tensor | None,
        columns: int,
    ) -> torch.Tensor:
        weight, lora_A = weight[:, :columns], lora_A[..., :columns]
        if rows is not None:
            rows = rows.to(weight.device)
            weight, lora_B = weight.index_select(0, rows), lora_B.index_select(1, rows)
        for index in self.adapter_indices(weight_bits):
            # Scaled in place: the product is a temporary the size of the weight, and the matmul keeps its operands
            # (not its result) for backward; `s * (B @ A)` would make a second one.
            weight = weight + (lora_B[index] @ lora_A[index]).mul_(self.lora_scaling)
        return weight

    def weight_function(self):
        """The active quantized weight as a function of `(weight, lora_A, lora_B, weight step sizes)`.

        The active rows, columns and bit-width are frozen when it is made, so that the weight recomputed in the
        backward pass is the one the forward pass used even if another subnet was activated in between.
        """
        weight_parts = self.weight_parts_function()

        def quantized_weight(*weight_inputs):
            merged, quantization = weight_parts(*weight_inputs)
            return merged if quantization is None else LsqFakeQuantize.apply(merged, *quantization)

        return quantized_weight

    def weight_parts_function(self):
        """[`weight_function`] in two parts: a function of the same inputs that returns the merged weight (before
        quantization) and the [`LsqArguments`] of its fake quantization (`None` at a float bit-width).

        `RecomputedWeightLinear` takes this form, to run the quantization's backward itself.
        """
        rows, columns = self.output_index, self.active_in_features
        bits = self.weight_quantizer.active_bits
        quantizer = self.weight_quantizer

        def weight_parts(weight, lora_A, lora_B, step_size):
            merged = self._merge(weight, lora_A, lora_B, bits, rows, columns)
            if is_float_bits(bits):
                return merged, None
            return merged, quantizer.fake_quantize_arguments(merged, bits, step_size, channel_index=rows)

        return weight_parts

    def _ensure_weight_steps(self) -> None:
        quantizer = self.weight_quantizer
        if quantizer.is_quantizing and self.weight.device.type != "meta":
            if not bool(quantizer.initialized[quantizer.bit_index(quantizer.active_bits)]):
                self.initialize_weight_quantizer(quantizer.active_bits)

    def _weight_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.lora_A, self.lora_B, self.weight_quantizer.step_size

    def quantized_weight(self) -> torch.Tensor:
        """The merged weight, fake-quantized at the active weight bit-width.

        Without autograd (evaluation, search) the result is cached until the sub-layer changes, a parameter is
        modified in place (an optimizer step bumps its version) or moves (`.to(device)` gives it new storage), so
        inference runs only the layer's own matmul.
        """
        self._ensure_weight_steps()
        weight_inputs = self._weight_inputs()
        if torch.is_grad_enabled():
            return self.weight_function()(*weight_inputs)
        versions = tensors_state_key(*weight_inputs)
        if self._cached_weight is None or self._cached_weight[0] != versions:
            self._cached_weight = (versions, self.weight_function()(*weight_inputs))
        return self._cached_weight[1]

    @torch.no_grad()
    def initialize_weight_quantizer(self, bits: int | None = None) -> None:
        """Initialises the weight step sizes of `bits` (all bit-widths if `None`) from the full merged weight."""
        if self.weight.device.type == "meta":
            return
        saved = (self.output_index, self.active_in_features)
        self.output_index, self.active_in_features = None, self.in_features
        for candidate in self.weight_bit_choices if bits is None else [bits]:
            self.weight_quantizer.initialize(self.merged_weight(candidate), candidate, channel_dim=0)
        self.output_index, self.active_in_features = saved

    def active_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.output_index is None:
            return self.bias
        return self.bias.index_select(0, self.output_index.to(self.bias.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(self.input_quantizer(x), self.quantized_weight(), self.active_bias())
        self.input_quantizer.ensure_initialized(x)
        self._ensure_weight_steps()
        input_tables = self.input_quantizer.quantize_tables()
        return RecomputedWeightLinear.apply(
            x,
            self.active_bias(),
            self.input_quantizer.quantize_function(),
            self.weight_parts_function(),
            len(input_tables),
            *input_tables,
            *self._weight_inputs(),
        )


class RecomputedWeightLinear(torch.autograd.Function):
    """`F.linear(input_fn(x, *input_tables), Q(merged), bias)`, where `merged, Q = weight_fn(*weight_inputs)`, that
    keeps only the raw `x` and its arguments (parameters and step-size tables) for the backward pass.

    Autograd would keep every weight-sized tensor on the way from the frozen weight to its quantized copy (the merged
    weight, the scaled one, the clamp's input, the rounded one) until backward, in every layer: for ViT-B several
    times the model's own size, more than the activations at moderate resolutions. It would also keep the input
    twice, raw for the quantizer's backward and fake-quantized for the matmul's. Here the input is quantized inside
    the operation and both the quantized input and the quantized weight are computed without autograd in the forward
    pass and recomputed, one layer at a time, in the backward pass, where autograd differentiates `input_fn` and the
    merge as usual. The weight's fake quantization is differentiated here ([`LsqArguments.gradients`]), so that the
    merged weight's values can be freed before the weight's gradient is made: at most three weight-sized tensors
    live at a time. `input_fn=None` means a float input, which is kept as the matmul saw it. Under autocast both
    passes run at the autocast dtype, as `F.linear` would.

    Args (of `apply`): `x`, `bias`, `input_fn` (`LsqQuantizer.quantize_function()` or `None`), `weight_fn`
    (`QuantizedLoraLinear.weight_parts_function()`: the merged weight and its `LsqArguments`, or `None` for a float
    weight), the number of step-size and offset tables `input_fn` takes besides `x`, then those tables, then the
    `weight_inputs`.
    """

    @staticmethod
    def forward(ctx, x, bias, input_fn, weight_fn, num_input_tables, *tensors):
        ctx.autocast = autocast_state(x.device.type)
        ctx.input_fn, ctx.weight_fn, ctx.num_input_tables = input_fn, weight_fn, num_input_tables
        ctx.input_dtype = x.dtype
        input_tables, weight_inputs = tensors[:num_input_tables], tensors[num_input_tables:]
        quantized_x = x if input_fn is None else input_fn(x, *input_tables)
        output = F.linear(quantized_x, quantize_weight(*weight_fn(*weight_inputs)), bias)
        # A float input is kept at the dtype the matmul saw (bf16 under autocast), as F.linear's own backward would;
        # a quantized one raw, which is all its recomputation needs.
        ctx.save_for_backward(x.to(output.dtype) if input_fn is None else x, bias, *tensors)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, bias, *tensors = ctx.saved_tensors
        count = ctx.num_input_tables
        input_tables, weight_inputs = tensors[:count], tensors[count:]
        needs_x, needs_bias = ctx.needs_input_grad[:2]
        needs_input_tables = ctx.needs_input_grad[5 : 5 + count]
        needs_weight_inputs = ctx.needs_input_grad[5 + count :]
        device_type, autocast_dtype, autocast_enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            weight_leaves = detached_leaves(weight_inputs, needs_weight_inputs)
            merged, quantization = ctx.weight_fn(*weight_leaves)
            x_leaves = detached_leaves((x, *input_tables), (needs_x, *needs_input_tables))
            quantized_x = x_leaves[0] if ctx.input_fn is None else ctx.input_fn(*x_leaves)
        grad_bias = None
        if needs_bias:
            grad_bias = grad_output.flatten(0, -2).sum(0).to(bias.dtype)
        x_grads = [None] * len(x_leaves)
        if needs_x or any(needs_input_tables):
            weight = quantize_weight(merged.detach(), quantization)
            grad_quantized_x = (grad_output @ weight.to(grad_output.dtype)).to(ctx.input_dtype)
            del weight
            if ctx.input_fn is None:
                x_grads[0] = grad_quantized_x
            else:
                x_grads = gradients_of(quantized_x, x_leaves, grad_quantized_x.to(quantized_x.dtype))
        weight_grads = [None] * len(weight_leaves)
        if any(needs_weight_inputs):
            columns = quantized_x.detach().flatten(0, -2).to(grad_output.dtype)
            merged_dtype = merged.dtype
            if quantization is not None:
                step, offset = quantization.step, quantization.offset
                needs = (merged.requires_grad, step.requires_grad, offset is not None and offset.requires_grad)
                # Only the quantizer's view of the merged weight is needed now: its values are freed (its place in
                # the graph kept) before the weight's gradient is made.
                with torch.no_grad():
                    scaled = quantization.scale(merged)
                merged = gradient_edge(merged)
            grad_weight = grad_output.flatten(0, -2).transpose(0, 1) @ columns
            if quantization is None:
                weight_grads = gradients_of(merged, weight_leaves, grad_weight.to(merged_dtype))
            else:
                # At the quantized weight's dtype (`scaled`'s), as autograd would hand it to the quantizer's backward;
                # the merged weight's gradient back at its own dtype, as autograd would pass it on.
                grad_merged, *grad_tables = quantization.gradients(scaled, grad_weight.to(scaled.dtype), needs)
                del scaled, grad_weight
                grad_merged = None if grad_merged is None else grad_merged.to(merged_dtype)
                weight_grads = gradients_of((merged, step, offset), weight_leaves, (grad_merged, *grad_tables))
        return x_grads[0], grad_bias, None, None, None, *x_grads[1:], *weight_grads


def quantize_weight(merged: torch.Tensor, quantization) -> torch.Tensor:
    """`merged` fake-quantized with its `LsqArguments` (`None`: a float weight, returned as it is), without autograd."""
    if quantization is None:
        return merged
    with torch.no_grad():
        return quantization.quantize(merged)
