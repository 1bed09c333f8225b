"""The vocabulary every stage shares: bit-widths, quantizable layers and the subnet architecture.

A `SubnetArchitecture` is the one value that every stage passes around: the model runs it, `bitops` prices it, the
search ranks it, extraction freezes it and the model card prints it. This module imports nothing of the package, so
that the configuration, the quantizers and the search space can all build on it.
"""

import json
from dataclasses import dataclass

FLOAT_BITS = 32
"""The bit-width that means "not quantized": a layer set to it runs in floating point."""

FLOAT_BIT_CHOICES = (16, FLOAT_BITS)
"""The float bit-widths at which BitOPs may count floating-point operations (fp16/bf16 or fp32 deployment)."""

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8)
"""The integer bit-widths a quantized layer may run at (besides `FLOAT_BITS`)."""

QUANTIZABLE_LAYERS = ("qkv", "proj", "lin1", "lin2")
"""The Linears of an encoder block that may be quantized, by short name."""

LAYER_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "lin1": "mlp.lin1", "lin2": "mlp.lin2"}
"""Where each quantizable Linear sits inside an encoder block."""

CONV_PATHS = {"patch_embed": "patch_embed.projection", "neck_conv1": "neck.conv1", "neck_conv2": "neck.conv2"}
"""The convolutions of the image encoder that may be quantized, by short name, and where each sits in the encoder:
the patch embedding (before the blocks) and the neck's two convolutions (after them). Their layer names in an
architecture are these paths."""

QUANTIZABLE_CONVS = tuple(CONV_PATHS)
"""The short names of the quantizable convolutions (`quantized_layers` may list them beside the Linears)."""


def is_float_bits(bits: int) -> bool:
    """Whether a bit-width means "not quantized".

    Any bit-width of 16 and more runs in floating point (`FLOAT_BITS` = 32 is the one the package writes; 16 is
    accepted so that fp16/bf16 layers read naturally); 2 to 8 bits run on an integer grid.
    """
    return bits >= 16


def parameter_kind(name: str) -> str | None:
    """What a supernet parameter is, from its name: `"adapter"` (a LoRA matrix, `lora_A` / `lora_B`), `"quantizer"`
    (a quantizer's step size or offset), or `None` for a weight of the base SAM.

    Adapters and quantizer parameters are what the supernet adds to SAM, and what it trains besides the mask decoder.
    """
    if "lora_" in name:
        return "adapter"
    if "quantizer." in name:
        return "quantizer"
    return None


def layer_name(block: int, kind: str) -> str:
    """The name of a quantizable layer inside the vision encoder: `layer_name(3, "lin1") == "layers.3.mlp.lin1"`."""
    return f"layers.{block}.{LAYER_PATHS[kind]}"


@dataclass(frozen=True)
class SubnetArchitecture:
    """An immutable, hashable subnet architecture.

    Args:
        resolution (`int`): input resolution in pixels.
        skipped_blocks (`tuple[int]`): encoder blocks the subnet drops (a prefix of `config.skippable_blocks`).
        num_heads (`tuple[int]`): attention heads kept, per encoder block.
        mlp_dims (`tuple[int]`): MLP hidden units kept, per encoder block.
        layer_names (`tuple[str]`): the quantized layers, named inside the vision encoder
            (`"layers.0.attn.qkv"`, `"patch_embed.projection"`, `"neck.conv1"`); the bit-width tuples follow this
            order.
        weight_bits (`tuple[int]`): weight bits per quantized layer (32 = float).
        activation_bits (`tuple[int]`): input-activation bits per quantized layer (32 = float).
        hidden_size (`int`, *optional*): the feature size (embedding width) kept: the first `hidden_size` channels of
            the residual stream, in every block, the patch embedding's output and the neck's input. `None` (the
            default) keeps the base model's full width; `to_dict` then leaves the key out, so architectures written
            before the feature size existed read back unchanged.

    Per-block values of skipped blocks carry no meaning; `SearchSpace.canonical` sets them to the largest choices so
    that equal subnets compare equal.
    """

    resolution: int
    skipped_blocks: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_dims: tuple[int, ...]
    layer_names: tuple[str, ...]
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    hidden_size: int | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.num_heads)

    @property
    def depth(self) -> int:
        """Number of encoder blocks kept."""
        return self.num_blocks - len(self.skipped_blocks)

    @property
    def kept_blocks(self) -> tuple[int, ...]:
        return tuple(block for block in range(self.num_blocks) if block not in self.skipped_blocks)

    def keeps_layer(self, layer_name: str) -> bool:
        """Whether the subnet runs a quantized layer: a convolution always, a block's Linear when the block is kept."""
        if not layer_name.startswith("layers."):
            return True
        return int(layer_name.split(".")[1]) in self.kept_blocks

    def bits_of(self, layer_name: str) -> tuple[int, int]:
        """`(weight_bits, activation_bits)` of a quantized layer, or float if the layer is not quantized."""
        if layer_name not in self.layer_names:
            return FLOAT_BITS, FLOAT_BITS
        index = self.layer_names.index(layer_name)
        return self.weight_bits[index], self.activation_bits[index]

    def to_dict(self) -> dict:
        """A JSON-serialisable description, with bit-widths keyed by the quantized layer's name.

        `hidden_size` is written only when the architecture narrows the feature size.
        """
        width = {} if self.hidden_size is None else {"hidden_size": self.hidden_size}
        return {
            "resolution": self.resolution,
            **width,
            "depth": self.depth,
            "skipped_blocks": list(self.skipped_blocks),
            "num_heads": list(self.num_heads),
            "mlp_dims": list(self.mlp_dims),
            "weight_bits": dict(zip(self.layer_names, self.weight_bits)),
            "activation_bits": dict(zip(self.layer_names, self.activation_bits)),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def coerce(cls, arch) -> "SubnetArchitecture":
        """`arch` as a `SubnetArchitecture`: one already, its `to_dict()`, or its `to_json()`.

        Raises:
            `TypeError`: for anything else (`None`, a number, ...), naming what was given and what is allowed.
            `ValueError`: for a string that is not JSON, or a dict that is not an architecture (see `from_dict`).
        """
        if isinstance(arch, cls):
            return arch
        if isinstance(arch, str):
            try:
                arch = json.loads(arch)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"An architecture string must be `SubnetArchitecture.to_json()`'s output: {error}."
                ) from None
        if isinstance(arch, dict):
            return cls.from_dict(arch)
        raise TypeError(
            f"An architecture must be a SubnetArchitecture, its to_dict() or its to_json(), got {type(arch).__name__}: "
            f"{arch!r}."
        )

    @classmethod
    def from_dict(cls, data: dict) -> "SubnetArchitecture":
        """Reads `to_dict`'s output back; raises a `ValueError` naming a missing, unknown or malformed field.

        Whether the values are in a given search space is checked by `SearchSpace.validate`.
        """
        if not isinstance(data, dict):
            raise ValueError(f"An architecture must be a dict, got {type(data).__name__}: {data!r}.")
        required = ("resolution", "skipped_blocks", "num_heads", "mlp_dims", "weight_bits", "activation_bits")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"The architecture dict lacks {missing}; it needs {list(required)}.")
        optional = ("depth", "hidden_size")
        unknown = sorted(set(data) - set(required) - set(optional))
        if unknown:
            raise ValueError(f"The architecture dict has unknown keys {unknown}; allowed: {list(required + optional)}.")
        for key in ("skipped_blocks", "num_heads", "mlp_dims"):
            if not isinstance(data[key], (list, tuple)) or not all(_is_int(v) for v in data[key]):
                raise ValueError(f"`{key}` must be a list of integers, got {data[key]!r}.")
        for key in ("resolution", "hidden_size"):
            if key in data and not _is_int(data[key]):
                raise ValueError(f"`{key}` must be an integer, got {data[key]!r}.")
        weight_bits, activation_bits = data["weight_bits"], data["activation_bits"]
        for key, value in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
            if not isinstance(value, dict) or not all(_is_int(v) for v in value.values()):
                raise ValueError(f"`{key}` must map layer names to integer bit-widths, got {value!r}.")
        if list(weight_bits) != list(activation_bits):
            raise ValueError(
                f"`weight_bits` and `activation_bits` must name the same layers in the same order; got "
                f"{list(weight_bits)} and {list(activation_bits)}."
            )
        arch = cls(
            resolution=data["resolution"],
            skipped_blocks=tuple(data["skipped_blocks"]),
            num_heads=tuple(data["num_heads"]),
            mlp_dims=tuple(data["mlp_dims"]),
            layer_names=tuple(weight_bits),
            weight_bits=tuple(weight_bits.values()),
            activation_bits=tuple(activation_bits.values()),
            hidden_size=data.get("hidden_size"),
        )
        if "depth" in data and data["depth"] != arch.depth:
            raise ValueError(
                f"`depth` is {data['depth']!r} but {len(arch.num_heads)} blocks less {len(arch.skipped_blocks)} "
                f"skipped make {arch.depth}."
            )
        return arch


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "ALLOWED_BITS",
    "CONV_PATHS",
    "FLOAT_BITS",
    "FLOAT_BIT_CHOICES",
    "LAYER_PATHS",
    "QUANTIZABLE_CONVS",
    "QUANTIZABLE_LAYERS",
    "SubnetArchitecture",
    "is_float_bits",
    "layer_name",
    "parameter_kind",
]
