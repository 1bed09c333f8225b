"""Quantization-aware LoRA: the adapter is added to the frozen weight *before* the weight is quantized.

peft's LoRA runs beside the base layer (`base(x) + B(A(x))·s`), outside any quantizer, so its float side branch would
survive into a deployed low-bit model. Here the quantizer sees the merged weight, `y = Q_a(x) · Q_w(W0 + s·B·A)ᵀ + b`,
so an extracted subnet folds the adapter into one quantized weight at no extra cost.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_sam_supernet import FLOAT_BITS
from .quantization import LsqQuantizer, tensors_state_key


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
        bits = max(self.weight_bit_choices) if weight_bits >= 16 else weight_bits
        per_bits = self.weight_bit_choices.index(bits)
        return [per_bits] if self.lora_mode == "multiplex" else [0, 1 + per_bits]

    def merged_weight(self, weight_bits: int | None = None) -> torch.Tensor:
        """`W0 + s·B·A` for the active rows and columns, before quantization."""
        weight_bits = self.weight_quantizer.active_bits if weight_bits is None else weight_bits
        columns = self.active_in_features
        weight = self.weight[:, :columns]
        lora_A, lora_B = self.lora_A[..., :columns], self.lora_B
        if self.output_index is not None:
            rows = self.output_index.to(weight.device)
            weight = weight.index_select(0, rows)
            lora_B = lora_B.index_select(1, rows)
        for index in self.adapter_indices(weight_bits):
            weight = weight + self.lora_scaling * (lora_B[index] @ lora_A[index])
        return weight

    def quantized_weight(self) -> torch.Tensor:
        """The merged weight, fake-quantized at the active weight bit-width.

        Without autograd (evaluation, search) the result is cached until the sub-layer changes, a parameter is
        modified in place (an optimizer step bumps its version) or moves (`.to(device)` gives it new storage), so
        inference runs only the layer's own matmul.
        """
        quantizer = self.weight_quantizer
        if quantizer.is_quantizing and self.weight.device.type != "meta":
            if not bool(quantizer.initialized[quantizer.bit_index(quantizer.active_bits)]):
                self.initialize_weight_quantizer(quantizer.active_bits)
        if torch.is_grad_enabled():
            return quantizer(self.merged_weight(), channel_index=self.output_index)
        versions = tensors_state_key(self.weight, self.lora_A, self.lora_B, quantizer.step_size)
        if self._cached_weight is None or self._cached_weight[0] != versions:
            self._cached_weight = (versions, quantizer(self.merged_weight(), channel_index=self.output_index))
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
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.active_bias())
