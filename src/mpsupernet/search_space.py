"""The search space that makes, checks, samples, mutates and crosses subnet architectures.

The architecture itself, `SubnetArchitecture`, lives in `mpsupernet.architecture`.
"""

import random
from dataclasses import replace

from .architecture import CONV_PATHS, FLOAT_BITS, LAYER_PATHS, SubnetArchitecture, layer_name
from .configuration_sam_supernet import SamSupernetConfig


class SearchSpace:
    """The set of subnet architectures a `SamSupernetConfig` allows.

    Args:
        config (`SamSupernetConfig`): the supernet configuration that defines the choices.

    Attributes:
        layer_names (`tuple[str]`): the quantized layers: the Linears of every block, block by block, then the
            quantized convolutions (patch embedding, neck).
        layer_blocks (`tuple[int]`): the bit unit of each layer, which `bit_granularity="block"` gives one pair of
            bit-widths: its encoder block for a Linear; for a convolution a unit of its own, numbered after the blocks
            (`num_blocks`, `num_blocks + 1`, ...), which no depth ever skips.
        hidden_size_choices (`tuple[int]`): the feature sizes, largest first. An architecture at the base model's
            width says so with `hidden_size=None`.
    """

    def __init__(self, config: SamSupernetConfig):
        vision = config.vision_config
        self.config = config
        self.num_blocks = vision.num_hidden_layers
        self.global_blocks = tuple(vision.global_attn_indexes)
        self.skippable_blocks = tuple(config.skippable_blocks)
        self.resolution_choices = tuple(sorted(config.resolution_choices, reverse=True))
        self.depth_choices = tuple(range(self.num_blocks, self.num_blocks - len(self.skippable_blocks) - 1, -1))
        self.num_heads_choices = tuple(sorted(config.num_heads_choices, reverse=True))
        self.mlp_dim_choices = tuple(sorted(config.mlp_dim_choices, reverse=True))
        self.weight_bit_choices = tuple(sorted(config.weight_bit_choices, reverse=True))
        self.activation_bit_choices = tuple(sorted(config.activation_bit_choices, reverse=True))
        self.base_hidden_size = vision.hidden_size
        self.hidden_size_choices = tuple(sorted(config.hidden_size_choices, reverse=True))
        linears = tuple(
            layer_name(block, kind)
            for block in range(self.num_blocks)
            for kind in LAYER_PATHS
            if kind in config.quantized_layers
        )
        convs = tuple(path for kind, path in CONV_PATHS.items() if kind in config.quantized_layers)
        self.layer_names = linears + convs
        self.layer_blocks = tuple(int(name.split(".")[1]) for name in linears) + tuple(
            range(self.num_blocks, self.num_blocks + len(convs))
        )
        self.num_linears = len(linears)

    # --- structure -------------------------------------------------------------------------------------------------
    def skipped_blocks(self, depth: int) -> tuple[int, ...]:
        """The blocks a subnet of this depth skips."""
        return self.skippable_blocks[: self.num_blocks - depth]

    def hidden_size_of(self, arch: SubnetArchitecture) -> int:
        """The feature size `arch` runs at (`None` stands for the base model's width)."""
        return self.base_hidden_size if arch.hidden_size is None else arch.hidden_size

    def _hidden_size_value(self, hidden_size: int) -> int | None:
        """How an architecture writes a feature size: `None` for the base model's width."""
        return None if hidden_size == self.base_hidden_size else hidden_size

    # --- making ----------------------------------------------------------------------------------------------------
    def uniform(
        self,
        resolution: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        weight_bits: int,
        activation_bits: int,
        hidden_size: int | None = None,
    ) -> SubnetArchitecture:
        """The architecture with the same heads, MLP width and bit-widths everywhere (in canonical form).

        `hidden_size` defaults to the largest feature size choice.

        Raises:
            `ValueError`: naming the first value that is not among the space's choices (bit-widths may also be 32,
                float).
        """
        layers = len(self.layer_names)
        hidden_size = self.hidden_size_choices[0] if hidden_size is None else hidden_size
        for name, value, allowed in (
            ("resolution", resolution, self.resolution_choices),
            ("depth", depth, self.depth_choices),
            ("num_heads", num_heads, self.num_heads_choices),
            ("mlp_dim", mlp_dim, self.mlp_dim_choices),
            ("weight_bits", weight_bits, self.weight_bit_choices + (FLOAT_BITS,)),
            ("activation_bits", activation_bits, self.activation_bit_choices + (FLOAT_BITS,)),
            ("hidden_size", hidden_size, self.hidden_size_choices),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` {value!r} is not in the search space; allowed: {sorted(allowed)}.")
        return self.canonical(
            SubnetArchitecture(
                resolution=resolution,
                skipped_blocks=self.skipped_blocks(depth),
                num_heads=(num_heads,) * self.num_blocks,
                mlp_dims=(mlp_dim,) * self.num_blocks,
                layer_names=self.layer_names,
                weight_bits=(weight_bits,) * layers,
                activation_bits=(activation_bits,) * layers,
                hidden_size=self._hidden_size_value(hidden_size),
            )
        )

    def largest(self, weight_bits: int | None = None, activation_bits: int | None = None) -> SubnetArchitecture:
        """Full resolution, depth and width, at the highest bit-widths (or the ones given, 32 for float).

        Raises:
            `ValueError`: if a bit-width given is not among the space's choices (nor 32).
        """
        return self.uniform(
            self.resolution_choices[0],
            self.depth_choices[0],
            self.num_heads_choices[0],
            self.mlp_dim_choices[0],
            self.weight_bit_choices[0] if weight_bits is None else weight_bits,
            self.activation_bit_choices[0] if activation_bits is None else activation_bits,
        )

    def full_precision(self) -> SubnetArchitecture:
        """The largest subnet with every layer in float: the base SAM itself."""
        return self.largest(FLOAT_BITS, FLOAT_BITS)

    def smallest(self, weight_bits: int | None = None, activation_bits: int | None = None) -> SubnetArchitecture:
        """Lowest resolution, depth, width and feature size, at the lowest bit-widths (or the ones given, 32 for float).

        Raises:
            `ValueError`: if a bit-width given is not among the space's choices (nor 32).
        """
        return self.uniform(
            self.resolution_choices[-1],
            self.depth_choices[-1],
            self.num_heads_choices[-1],
            self.mlp_dim_choices[-1],
            self.weight_bit_choices[-1] if weight_bits is None else weight_bits,
            self.activation_bit_choices[-1] if activation_bits is None else activation_bits,
            self.hidden_size_choices[-1],
        )

    def sample(
        self,
        rng: random.Random | int | None = None,
        weight_bit_choices: tuple[int, ...] | None = None,
        activation_bit_choices: tuple[int, ...] | None = None,
    ) -> SubnetArchitecture:
        """Draws an architecture uniformly per dimension.

        The draws of the encoder blocks, resolution and depth come first, in the order they always had, then those
        of the convolutions' bits and, when there is more than one choice, of the feature size: a given seed draws
        the same blocks whether or not the convolutions are quantized or the feature size is elastic.

        Args:
            rng (`random.Random` or `int`, *optional*): a generator, or a seed for a new one.
            weight_bit_choices, activation_bit_choices (`tuple[int]`, *optional*): restrict the bit-widths drawn
                (the progressive schedule enables low bit-widths late).
        """
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        weight_choices = tuple(weight_bit_choices or self.weight_bit_choices)
        activation_choices = tuple(activation_bit_choices or self.activation_bit_choices)
        num_heads = tuple(rng.choice(self.num_heads_choices) for _ in range(self.num_blocks))
        mlp_dims = tuple(rng.choice(self.mlp_dim_choices) for _ in range(self.num_blocks))
        linear_units = self.layer_blocks[: self.num_linears]
        weight_bits, activation_bits = self._sample_bits(
            rng, weight_choices, activation_choices, linear_units, self.num_blocks
        )
        resolution = rng.choice(self.resolution_choices)
        skipped_blocks = self.skipped_blocks(rng.choice(self.depth_choices))
        conv_units = tuple(range(len(self.layer_names) - self.num_linears))
        conv_weight_bits, conv_activation_bits = self._sample_bits(
            rng, weight_choices, activation_choices, conv_units, len(conv_units)
        )
        hidden_size = rng.choice(self.hidden_size_choices) if len(self.hidden_size_choices) > 1 else None
        arch = SubnetArchitecture(
            resolution=resolution,
            skipped_blocks=skipped_blocks,
            num_heads=num_heads,
            mlp_dims=mlp_dims,
            layer_names=self.layer_names,
            weight_bits=weight_bits + conv_weight_bits,
            activation_bits=activation_bits + conv_activation_bits,
            hidden_size=None if hidden_size is None else self._hidden_size_value(hidden_size),
        )
        return self.canonical(arch)

    def _sample_bits(self, rng, weight_choices, activation_choices, units: tuple[int, ...], num_units: int):
        """Bits of layers whose bit units are `units`, each in `range(num_units)`: the Linears' blocks (`num_units`
        = `num_blocks`, drawn per block as they always were) or the convolutions (one unit each)."""
        if self.config.bit_granularity == "block":
            per_unit_w = [rng.choice(weight_choices) for _ in range(num_units)]
            per_unit_a = [rng.choice(activation_choices) for _ in range(num_units)]
            return tuple(per_unit_w[unit] for unit in units), tuple(per_unit_a[unit] for unit in units)
        return tuple(rng.choice(weight_choices) for _ in units), tuple(rng.choice(activation_choices) for _ in units)

    def mutate(self, arch: SubnetArchitecture, rng: random.Random, probability: float = 0.1) -> SubnetArchitecture:
        """Redraws each gene of `arch` with the given probability (bits per block under block granularity)."""
        fresh = self.sample(rng)
        return self.crossover(arch, fresh, rng, take_second=probability)

    def crossover(
        self, first: SubnetArchitecture, second: SubnetArchitecture, rng: random.Random, take_second: float = 0.5
    ) -> SubnetArchitecture:
        """Takes each gene from `second` with probability `take_second`, else from `first`."""

        def pick(a, b):
            return b if rng.random() < take_second else a

        def pick_each(a, b):
            return tuple(pick(x, y) for x, y in zip(a, b))

        if self.config.bit_granularity == "block":
            num_units = self.num_blocks + len(self.layer_names) - self.num_linears
            from_second = [rng.random() < take_second for _ in range(num_units)]
            weight_bits = tuple(
                (b if from_second[block] else a)
                for a, b, block in zip(first.weight_bits, second.weight_bits, self.layer_blocks)
            )
            activation_bits = tuple(
                (b if from_second[block] else a)
                for a, b, block in zip(first.activation_bits, second.activation_bits, self.layer_blocks)
            )
        else:
            weight_bits = pick_each(first.weight_bits, second.weight_bits)
            activation_bits = pick_each(first.activation_bits, second.activation_bits)
        child = SubnetArchitecture(
            resolution=pick(first.resolution, second.resolution),
            skipped_blocks=pick(first.skipped_blocks, second.skipped_blocks),
            num_heads=pick_each(first.num_heads, second.num_heads),
            mlp_dims=pick_each(first.mlp_dims, second.mlp_dims),
            layer_names=self.layer_names,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            hidden_size=pick(first.hidden_size, second.hidden_size),
        )
        return self.canonical(child)

    def canonical(self, arch: SubnetArchitecture) -> SubnetArchitecture:
        """Sets the per-block values of skipped blocks to the largest choices and writes the base model's feature size
        as `None`, so equal subnets compare equal."""
        if arch.hidden_size == self.base_hidden_size:
            arch = replace(arch, hidden_size=None)
        skipped = set(arch.skipped_blocks)
        if not skipped:
            return arch
        top_w, top_a = self.weight_bit_choices[0], self.activation_bit_choices[0]
        return replace(
            arch,
            num_heads=tuple(self.num_heads_choices[0] if b in skipped else h for b, h in enumerate(arch.num_heads)),
            mlp_dims=tuple(self.mlp_dim_choices[0] if b in skipped else m for b, m in enumerate(arch.mlp_dims)),
            weight_bits=tuple(
                top_w if block in skipped else bits for bits, block in zip(arch.weight_bits, self.layer_blocks)
            ),
            activation_bits=tuple(
                top_a if block in skipped else bits for bits, block in zip(arch.activation_bits, self.layer_blocks)
            ),
        )

    # --- checking --------------------------------------------------------------------------------------------------
    def validate(self, arch: SubnetArchitecture) -> None:
        """Raises a `ValueError` naming the first value of `arch` that the space does not allow."""
        if arch.resolution not in self.resolution_choices:
            raise ValueError(
                f"Resolution {arch.resolution} is not in the search space; allowed: {list(self.resolution_choices)}."
            )
        if arch.layer_names != self.layer_names:
            raise ValueError(
                f"The architecture quantizes layers {list(arch.layer_names)}; this space quantizes "
                f"{list(self.layer_names)}."
            )
        self._check_per_item("num_heads", arch.num_heads, self.num_heads_choices, self.num_blocks, "block")
        self._check_per_item("mlp_dims", arch.mlp_dims, self.mlp_dim_choices, self.num_blocks, "block")
        if self.hidden_size_of(arch) not in self.hidden_size_choices:
            raise ValueError(
                f"Feature size (hidden_size) {self.hidden_size_of(arch)} is not in the search space; allowed: "
                f"{list(self.hidden_size_choices)}."
            )
        if arch.skipped_blocks != self.skipped_blocks(arch.num_blocks - len(arch.skipped_blocks)):
            allowed = [list(self.skipped_blocks(depth)) for depth in self.depth_choices]
            raise ValueError(
                f"Skipped blocks {list(arch.skipped_blocks)} are not in the search space; blocks are skipped in the "
                f"order {list(self.skippable_blocks)}, so the allowed sets are {allowed}."
            )
        allowed_w = self.weight_bit_choices + (FLOAT_BITS,)
        allowed_a = self.activation_bit_choices + (FLOAT_BITS,)
        self._check_per_item("weight_bits", arch.weight_bits, allowed_w, len(self.layer_names), "layer")
        self._check_per_item("activation_bits", arch.activation_bits, allowed_a, len(self.layer_names), "layer")
        if self.config.bit_granularity == "block":
            for bits_name in ("weight_bits", "activation_bits"):
                per_block = {}
                for name, block, bits in zip(self.layer_names, self.layer_blocks, getattr(arch, bits_name)):
                    if per_block.setdefault(block, bits) != bits:
                        raise ValueError(
                            f"`{bits_name}` of {name} is {bits} but {per_block[block]} elsewhere in block {block}; "
                            "with bit_granularity='block' all quantized layers of a block share their bit-widths."
                        )

    def _check_per_item(self, field, values, allowed, length, unit):
        if len(values) != length:
            raise ValueError(f"`{field}` has {len(values)} entries; this space needs one per {unit}: {length}.")
        for position, value in enumerate(values):
            if value not in allowed:
                where = self.layer_names[position] if unit == "layer" else f"block {position}"
                raise ValueError(f"`{field}` of {where} is {value!r}; allowed: {sorted(allowed)}.")


__all__ = ["SearchSpace"]
