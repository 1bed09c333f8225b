"""An integer encoding of `SubnetArchitecture`, the genotype the evolutionary search works on."""

from collections.abc import Sequence

import numpy as np

from ..architecture import SubnetArchitecture
from ..search_space import SearchSpace


class ArchitectureEncoding:
    """A `SubnetArchitecture` as a vector of integer choice indices, the genotype the evolutionary search works on.

    Genes, in order: resolution, depth, attention heads per block, MLP width per block, then weight bits and activation
    bits per quantized layer (per bit unit under `bit_granularity="block"`: an encoder block, or a convolution, so that
    every genotype is a valid architecture), and last the feature size. Each gene is an index into the search space's
    choices, which are sorted from largest to smallest: index 0 is the largest (or highest-bit) choice, and a larger
    index never costs more BitOPs. That order lets pymoo's numeric operators (SBX, polynomial mutation) make children
    whose cost is near their parents'.

    `decode` returns canonical architectures (`SearchSpace.canonical`), so the genes of skipped blocks do not matter;
    `canonicalize` rewrites a genotype to the canonical one, which makes equal architectures equal genotypes.
    The float bit-width (32) is not a search choice: the full-precision model cannot be encoded.

    Args:
        space (`SearchSpace`): the search space to encode.
    """

    def __init__(self, space: SearchSpace):
        self.space = space
        self.per_block_bits = space.config.bit_granularity == "block"
        # Blocks without quantized layers have no bits to choose.
        self.bit_blocks = tuple(sorted(set(space.layer_blocks)))
        unit_names = dict(zip(space.layer_blocks, space.layer_names))
        bit_units = (
            [f"block {unit}" if unit < space.num_blocks else unit_names[unit] for unit in self.bit_blocks]
            if self.per_block_bits
            else list(space.layer_names)
        )
        blocks = range(space.num_blocks)
        self.gene_names = tuple(
            ["resolution", "depth"]
            + [f"num_heads of block {block}" for block in blocks]
            + [f"mlp_dim of block {block}" for block in blocks]
            + [f"weight_bits of {unit}" for unit in bit_units]
            + [f"activation_bits of {unit}" for unit in bit_units]
            + ["hidden_size"]
        )
        self.gene_choices = tuple(
            [space.resolution_choices, space.depth_choices]
            + [space.num_heads_choices] * space.num_blocks
            + [space.mlp_dim_choices] * space.num_blocks
            + [space.weight_bit_choices] * len(bit_units)
            + [space.activation_bit_choices] * len(bit_units)
            + [space.hidden_size_choices]
        )
        self.num_bit_units = len(bit_units)

    @property
    def num_genes(self) -> int:
        return len(self.gene_names)

    @property
    def lower(self) -> np.ndarray:
        """Lowest index of every gene (all zeros)."""
        return np.zeros(self.num_genes, dtype=int)

    @property
    def upper(self) -> np.ndarray:
        """Highest index of every gene."""
        return np.array([len(choices) - 1 for choices in self.gene_choices], dtype=int)

    def encode(self, arch: SubnetArchitecture) -> np.ndarray:
        """The genotype of `arch` (canonicalised and checked against the space first)."""
        self.space.validate(arch)
        arch = self.space.canonical(arch)
        if self.per_block_bits:
            first_layer = {block: self.space.layer_blocks.index(block) for block in self.bit_blocks}
            weight_bits = [arch.weight_bits[first_layer[block]] for block in self.bit_blocks]
            activation_bits = [arch.activation_bits[first_layer[block]] for block in self.bit_blocks]
        else:
            weight_bits, activation_bits = list(arch.weight_bits), list(arch.activation_bits)
        values = (
            [arch.resolution, arch.depth]
            + list(arch.num_heads)
            + list(arch.mlp_dims)
            + weight_bits
            + activation_bits
            + [self.space.hidden_size_of(arch)]
        )
        genes = []
        for name, choices, value in zip(self.gene_names, self.gene_choices, values):
            if value not in choices:
                raise ValueError(
                    f"The {name} is {value}, which is not a search choice ({list(choices)}); the full-precision "
                    "(32-bit) model is outside the search."
                )
            genes.append(choices.index(value))
        return np.array(genes, dtype=int)

    def decode(self, genes: Sequence[int] | np.ndarray) -> SubnetArchitecture:
        """The canonical architecture of a genotype; raises a `ValueError` naming a gene out of its range."""
        genes = np.asarray(genes)
        if genes.shape != (self.num_genes,):
            raise ValueError(
                f"A genotype of this space has {self.num_genes} genes, got an array of shape {genes.shape}."
            )
        if not np.array_equal(genes, np.round(genes)):
            raise ValueError(f"Genes must be integer choice indices, got {genes.tolist()}.")
        values = []
        for name, choices, gene in zip(self.gene_names, self.gene_choices, genes.astype(int).tolist()):
            if not 0 <= gene < len(choices):
                raise ValueError(
                    f"The gene of the {name} is {gene}; allowed: 0 to {len(choices) - 1} (for {list(choices)})."
                )
            values.append(choices[gene])
        space, num_blocks, units = self.space, self.space.num_blocks, self.num_bit_units
        resolution, depth = values[0], values[1]
        num_heads = tuple(values[2 : 2 + num_blocks])
        mlp_dims = tuple(values[2 + num_blocks : 2 + 2 * num_blocks])
        weight_bits = values[2 + 2 * num_blocks : 2 + 2 * num_blocks + units]
        activation_bits = values[2 + 2 * num_blocks + units : 2 + 2 * num_blocks + 2 * units]
        hidden_size = values[-1]
        if self.per_block_bits:
            unit_of_block = {block: unit for unit, block in enumerate(self.bit_blocks)}
            weight_bits = [weight_bits[unit_of_block[block]] for block in space.layer_blocks]
            activation_bits = [activation_bits[unit_of_block[block]] for block in space.layer_blocks]
        arch = SubnetArchitecture(
            resolution=resolution,
            skipped_blocks=space.skipped_blocks(depth),
            num_heads=num_heads,
            mlp_dims=mlp_dims,
            layer_names=space.layer_names,
            weight_bits=tuple(weight_bits),
            activation_bits=tuple(activation_bits),
            hidden_size=hidden_size,
        )
        arch = space.canonical(arch)
        space.validate(arch)
        return arch

    def canonicalize(self, genes: Sequence[int] | np.ndarray) -> np.ndarray:
        """The genotype of the canonical architecture that `genes` decodes to."""
        return self.encode(self.decode(genes))
