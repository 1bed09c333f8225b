"""Analytic MACs and BitOPs of a subnet architecture, without running anything.

`BitOPs = Σ MACs × weight_bits × activation_bits` over every matmul-like operation of the image encoder, for one image:
the patch-embedding and neck convolutions (MACs = output positions × output channels × input channels × kernel area, at
their own bits when they are quantized), the Linears and the attention products, all at the architecture's feature size.
Float operations count at `config.float_bits` on both operands. The act×act attention products (queries × keys,
probabilities × values) count at the activation bits of the block's `qkv` layer when
`config.quantize_attention_products` is set, else in float; the decomposed relative-position products multiply a
(quantized) query by a float table. The counts follow transformers' SAM operation by operation, windows padded as the
encoder pads them, so that they agree exactly with `torch.utils.flop_counter` (FLOPs = 2 × MACs).

The prompt encoder and mask decoder run once per prompt, not per image, stay in float and do not change with the
architecture; they are not part of these counts.
"""

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal, InvalidOperation

from .architecture import CONV_PATHS, FLOAT_BITS, SubnetArchitecture, is_float_bits
from .configuration_sam_supernet import SamSupernetConfig
from .search_space import SearchSpace


@dataclass(frozen=True)
class BitOpsRow:
    """One operation of the count: its name, kind, MACs and the bit-widths of its two operands."""

    name: str
    kind: str
    macs: int
    weight_bits: int
    activation_bits: int

    @property
    def bitops(self) -> int:
        return self.macs * self.weight_bits * self.activation_bits


@dataclass
class BitOpsReport:
    """BitOPs of one architecture, with per-operation rows and the two references every reduction needs.

    Attributes:
        rows: every counted operation (`kind` is `"conv"`, `"linear"` or `"attention"`).
        full_precision_bitops: the base SAM at full size, every operation in float.
        w8a8_bitops: the base SAM at full size with every quantized layer (and attention product) at 8 bits.
    """

    rows: list[BitOpsRow]
    full_precision_bitops: int
    w8a8_bitops: int
    architecture: dict = field(default_factory=dict)

    @property
    def total_macs(self) -> int:
        return sum(row.macs for row in self.rows)

    @property
    def total_bitops(self) -> int:
        return sum(row.bitops for row in self.rows)

    @property
    def attention_bitops(self) -> int:
        """BitOPs of the act×act (and relative-position) attention products, reported apart."""
        return sum(row.bitops for row in self.rows if row.kind == "attention")

    @property
    def reduction_vs_full_precision(self) -> float:
        """Share of the full-precision BitOPs saved (0.95 means 95% fewer)."""
        return 1.0 - self.total_bitops / self.full_precision_bitops

    @property
    def reduction_vs_w8a8(self) -> float:
        """Share of the uniform W8A8 BitOPs saved; negative if this subnet costs more."""
        return 1.0 - self.total_bitops / self.w8a8_bitops

    def summary(self) -> dict:
        """The headline figures as plain numbers (JSON-serialisable)."""
        return {
            "bitops": self.total_bitops,
            "gbitops": self.total_bitops / 1e9,
            "macs": self.total_macs,
            "attention_bitops": self.attention_bitops,
            "full_precision_bitops": self.full_precision_bitops,
            "w8a8_bitops": self.w8a8_bitops,
            "share_of_full_precision": self.total_bitops / self.full_precision_bitops,
            "reduction_vs_full_precision": self.reduction_vs_full_precision,
            "share_of_w8a8": self.total_bitops / self.w8a8_bitops,
            "reduction_vs_w8a8": self.reduction_vs_w8a8,
        }

    def to_dict(self) -> dict:
        rows = [{**asdict(row), "bitops": row.bitops} for row in self.rows]
        return {**self.summary(), "architecture": self.architecture, "rows": rows}


def count_operations(config: SamSupernetConfig, arch: SubnetArchitecture) -> list[BitOpsRow]:
    """Every matmul-like operation of the image encoder running `arch`, for one image."""
    vision = config.vision_config
    float_bits = config.float_bits
    hidden = vision.hidden_size if arch.hidden_size is None else arch.hidden_size
    patch, out_channels = vision.patch_size, vision.output_channels
    head_dim = vision.hidden_size // vision.num_attention_heads  # heads keep their width at any feature size
    grid = arch.resolution // patch
    tokens = grid * grid

    def bits(name: str) -> tuple[int, int]:
        weight_bits, activation_bits = arch.bits_of(name)
        return _as_counted(weight_bits, float_bits), _as_counted(activation_bits, float_bits)

    patch_macs = tokens * hidden * vision.num_channels * patch * patch
    # Each row is named like its layer (`arch.bits_of(row.name)` gives its bits, float if not quantized).
    rows = [BitOpsRow(CONV_PATHS["patch_embed"], "conv", patch_macs, *bits(CONV_PATHS["patch_embed"]))]
    for block in arch.kept_blocks:
        prefix = f"layers.{block}"
        heads, mlp_dim = arch.num_heads[block], arch.mlp_dims[block]
        window = vision.window_size if block not in vision.global_attn_indexes else 0
        side = math.ceil(grid / window) * window if window else grid  # windowed blocks pad the grid
        num_windows = (side // window) ** 2 if window else 1
        window_side = window or grid
        window_tokens = window_side * window_side
        padded_tokens = num_windows * window_tokens
        width = heads * head_dim

        qkv_w, qkv_a = bits(f"{prefix}.attn.qkv")
        product_bits = qkv_a if config.quantize_attention_products else _as_counted(FLOAT_BITS, float_bits)
        products = num_windows * heads * window_tokens * window_tokens * head_dim
        rows.append(BitOpsRow(f"{prefix}.attn.qkv", "linear", padded_tokens * hidden * 3 * width, qkv_w, qkv_a))
        rows.append(BitOpsRow(f"{prefix}.attn.query_key", "attention", products, product_bits, product_bits))
        if vision.use_rel_pos:
            rel_pos = 2 * num_windows * heads * window_tokens * window_side * head_dim
            rows.append(BitOpsRow(f"{prefix}.attn.rel_pos", "attention", rel_pos, float_bits, product_bits))
        rows.append(BitOpsRow(f"{prefix}.attn.probs_value", "attention", products, product_bits, product_bits))
        rows.append(BitOpsRow(f"{prefix}.attn.proj", "linear", padded_tokens * width * hidden, *bits(f"{prefix}.attn.proj")))
        rows.append(BitOpsRow(f"{prefix}.mlp.lin1", "linear", tokens * hidden * mlp_dim, *bits(f"{prefix}.mlp.lin1")))
        rows.append(BitOpsRow(f"{prefix}.mlp.lin2", "linear", tokens * mlp_dim * hidden, *bits(f"{prefix}.mlp.lin2")))
    rows.append(BitOpsRow("neck.conv1", "conv", tokens * hidden * out_channels, *bits(CONV_PATHS["neck_conv1"])))
    conv2_macs = tokens * out_channels * out_channels * 9
    rows.append(BitOpsRow("neck.conv2", "conv", conv2_macs, *bits(CONV_PATHS["neck_conv2"])))
    return rows


def _as_counted(bits: int, float_bits: int) -> int:
    return float_bits if is_float_bits(bits) else bits


class BitOpsCounter:
    """The cost function of one supernet configuration: an architecture's BitOPs, without running anything.

    The two references every reduction needs, the full-precision model and the uniform W8A8 model (both at full size;
    W8A8 is priced whether or not 8 bits are among the space's choices), are counted once, when the counter is made;
    each price after that counts the architecture's operations once. The search and extraction price architectures
    here, never through the model.

    Args:
        config (`SamSupernetConfig`): the supernet configuration whose search space the architectures belong to.

    Attributes:
        search_space (`SearchSpace`): the configuration's search space; every priced architecture is checked in it.
        full_precision_bitops (`int`): BitOPs of the full-precision reference.
        w8a8_bitops (`int`): BitOPs of the uniform W8A8 reference.
    """

    def __init__(self, config: SamSupernetConfig):
        self.config = config
        self.search_space = SearchSpace(config)
        full_precision = self.search_space.full_precision()
        eight_bits = (8,) * len(full_precision.layer_names)
        w8a8 = replace(full_precision, weight_bits=eight_bits, activation_bits=eight_bits)
        self.full_precision_bitops = _total(count_operations(config, full_precision))
        self.w8a8_bitops = _total(count_operations(config, w8a8))

    def report(self, arch: SubnetArchitecture) -> BitOpsReport:
        """The BitOPs report of `arch`: per-operation rows, totals and both reductions.

        Raises:
            `ValueError`: if `arch` is not in the configuration's search space (the message names what is wrong).
        """
        self.search_space.validate(arch)
        return BitOpsReport(
            rows=count_operations(self.config, arch),
            full_precision_bitops=self.full_precision_bitops,
            w8a8_bitops=self.w8a8_bitops,
            architecture=arch.to_dict(),
        )

    def bitops(self, arch: SubnetArchitecture) -> int:
        """The BitOPs of `arch` (checked against the search space, as in [`report`])."""
        return self.report(arch).total_bitops


def _total(rows: list[BitOpsRow]) -> int:
    return sum(row.bitops for row in rows)


def count_bitops(config: SamSupernetConfig, arch: SubnetArchitecture) -> BitOpsReport:
    """The BitOPs report of `arch`, in one call: `BitOpsCounter(config).report(arch)`.

    Args:
        config (`SamSupernetConfig`): the supernet configuration.
        arch (`SubnetArchitecture`): the architecture to price; it is checked against the search space first.
    """
    return BitOpsCounter(config).report(arch)


BUDGET_FORMS = (
    "a positive number of BitOPs (an int or float such as 35e9, or a string such as '120G', '1.5T', '900M', "
    "'35e9' or '120 GBitOPs') or a share of the full-precision model such as '5%' (above 0% and at most 100%)"
)
_SI_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BUDGET_PATTERN = re.compile(
    r"(?P<number>[+-]?[0-9.]+(?:e[+-]?[0-9]+)?)\s*(?:(?P<prefix>[kmgtp]?)(?:bit\s*ops|bops)?|(?P<percent>%))"
)


def parse_budget(
    budget: int | float | str, full_precision_bitops: int | None = None, *, name: str | None = None
) -> int:
    """A BitOPs budget as a positive whole number of BitOPs (a fractional budget is rounded down).

    Args:
        budget (`int`, `float` or `str`): a number of BitOPs (`35e9`, any real number type such as `numpy.int64`, or
            a 0-d tensor); a string holding one, with an optional SI prefix (k, M, G, T, P) and unit (`"120G"`,
            `"1.5T"`, `"900M"`, `"35e9"`, `"120 GBitOPs"`); or a share of the full-precision model (`"5%"`, above 0%
            and at most 100%).
        full_precision_bitops (`int`, *optional*): the BitOPs of the full-precision model, which a share refers to.
        name (`str`, *optional*): the caller's argument that holds the budget (`"max_bitops"`); the error then
            starts with it.

    Raises:
        `ValueError`: naming the value and the accepted forms, if the budget is not understood, not positive, a
        share outside (0%, 100%] or a share without `full_precision_bitops`.
    """
    try:
        return _parse_budget(budget, full_precision_bitops)
    except ValueError as error:
        if name is None:
            raise
        raise ValueError(f"`{name}` got {budget!r}: {error}") from None


def _scalar(value):
    """A 0-d tensor or array as the one number it holds; anything else as it is."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def is_budget(value) -> bool:
    """Whether `value` is of a type [`parse_budget`] reads: a real number but not a bool (`numpy.int64` included), a
    string, or a 0-d tensor or array; its value is not checked."""
    value = _scalar(value)
    return isinstance(value, (numbers.Real, str)) and not isinstance(value, bool)


def _parse_budget(budget: int | float | str, full_precision_bitops: int | None) -> int:
    budget = _scalar(budget)
    if not is_budget(budget):
        raise ValueError(f"Budget {budget!r} is not understood; give {BUDGET_FORMS}.")
    if isinstance(budget, str):
        match = _BUDGET_PATTERN.fullmatch(budget.strip().lower())
        try:
            number = Decimal(match["number"]) if match else None
        except InvalidOperation:
            number = None
        if number is None:
            raise ValueError(f"Budget {budget!r} is not understood; give {BUDGET_FORMS}.")
        if match["percent"]:
            if not 0 < number <= 100:
                raise ValueError(f"Budget {budget!r} is a share outside (0%, 100%]; give {BUDGET_FORMS}.")
            if full_precision_bitops is None:
                raise ValueError(
                    f"Budget {budget!r} is a share of the full-precision model, whose BitOPs are not known here; "
                    "give a number of BitOPs instead, such as '120G'."
                )
            value = number * full_precision_bitops / 100
        else:
            value = number * _SI_PREFIXES[match["prefix"]]
    else:
        if not math.isfinite(budget):
            raise ValueError(f"Budget {budget!r} is not a finite number; give {BUDGET_FORMS}.")
        value = Decimal(int(budget)) if isinstance(budget, numbers.Integral) else Decimal(float(budget))
    bitops = math.floor(value)
    if bitops < 1:
        raise ValueError(f"Budget {budget!r} is not a positive number of BitOPs; give {BUDGET_FORMS}.")
    return bitops


def format_bitops(bitops: float, exact: bool = False) -> str:
    """BitOPs with an SI prefix, e.g. `1.79 TBitOPs`; with `exact`, the integer too: `1.79 TBitOPs ("1794100690944")`."""
    text = f"{bitops:.3g} BitOPs"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if bitops >= factor:
            text = f"{bitops / factor:.3g} {prefix}BitOPs"
            break
    return f'{text} ("{int(bitops)}")' if exact else text


def format_budget(bitops: int, decimals: int = 3) -> str:
    """A budget string in GBitOPs that admits `bitops`: rounded *up* at `decimals` decimals, e.g. `"4.106G"`.

    `parse_budget(format_budget(bitops)) >= bitops` always holds, and it exceeds `bitops` by less than
    `10 ** (9 - decimals)` BitOPs, so the budget printed for a tier (on its model card) lets `load_subnet` choose
    that tier; rounding to the nearest value could cut the tier off (a 4.174 G tier printed as "4G" fits none).

    Args:
        bitops (`int`): a positive number of BitOPs.
        decimals (`int`, *optional*, defaults to 3): decimals of the GBitOPs figure, 0 to 9.

    Raises:
        `ValueError`: if `bitops` is not a positive integer or `decimals` is outside 0 to 9.
    """
    if isinstance(bitops, bool) or not isinstance(bitops, int) or bitops < 1:
        raise ValueError(f"`bitops` must be a positive integer, got {bitops!r}.")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 9:
        raise ValueError(f"`decimals` must be an integer from 0 to 9, got {decimals!r}.")
    step = 10 ** (9 - decimals)
    units = -(-bitops // step)  # ceiling division, exact on integers of any size
    whole, fraction = divmod(units, 10**decimals)
    return f"{whole}.{fraction:0{decimals}d}G" if decimals else f"{whole}G"
