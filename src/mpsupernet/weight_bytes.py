"""The weight bytes of a subnet's exported image encoder, priced from the architecture alone.

What a memory-bound device stores and streams per image: every tensor of the QDQ encoder that `export_onnx` writes
(`mpsupernet.export.graphs.VisionEncoderGraph`'s buffers and parameters): each quantized layer's integer codes (one
byte each in the `"int8"` container; half a byte for codes of at most 4 bits in the `"int4"` container), its float32
per-output-channel scales and bias; float layers' float32 weights; the layer norms, relative-position tables, the
position embedding at the subnet's grid, the input's resize matrix below the base resolution and the activation
quantizers' steps. Weights below 8 bits save bytes only in a container that stores them narrower: in int8 containers
a 2-bit and an 8-bit layer weigh the same.
"""

from .architecture import CONV_PATHS, SubnetArchitecture, is_float_bits
from .choices import WEIGHT_CONTAINERS
from .configuration_sam_supernet import SamSupernetConfig
from .search_space import SearchSpace

FLOAT32_BYTES = 4


def _layer_bytes(elements: int, out_features: int, bits: int, weight_container: str, bias: bool = True) -> int:
    """A layer's weight (codes or float32), its scales (quantized only) and its float32 bias."""
    if not bias:  # a float neck convolution stays SAM's bias-free module
        return elements * FLOAT32_BYTES
    if is_float_bits(bits):
        return (elements + out_features) * FLOAT32_BYTES
    code_bytes = (elements + 1) // 2 if weight_container == "int4" and bits <= 4 else elements
    return code_bytes + 2 * out_features * FLOAT32_BYTES


def count_weight_bytes(config: SamSupernetConfig, arch: SubnetArchitecture, weight_container: str = "int8") -> int:
    """Bytes of the weight tensors of `arch`'s exported image encoder (see the module docstring).

    Args:
        config (`SamSupernetConfig`): the supernet configuration.
        arch (`SubnetArchitecture`): the architecture; it is checked against the search space first.
        weight_container (`str`, *optional*, defaults to `"int8"`): as for `export_onnx` (`"int8"` or `"int4"`).

    Raises:
        `ValueError`: naming the value, for an architecture outside the space or an unknown container.
    """
    if weight_container not in WEIGHT_CONTAINERS:
        raise ValueError(f"`weight_container` must be one of {list(WEIGHT_CONTAINERS)}, got {weight_container!r}.")
    SearchSpace(config).validate(arch)
    vision = config.vision_config
    hidden = vision.hidden_size if arch.hidden_size is None else arch.hidden_size
    head_dim = vision.hidden_size // vision.num_attention_heads
    base_grid, grid = vision.image_size // vision.patch_size, arch.resolution // vision.patch_size
    out_channels, patch = vision.output_channels, vision.patch_size

    def weight_bits(name: str) -> int:
        return arch.bits_of(name)[0]

    def plain(name: str) -> bool:
        """Whether the subnet keeps the layer as a plain float module (no quantizer step; SAM's neck has no bias)."""
        return all(is_float_bits(bits) for bits in arch.bits_of(name))

    step = FLOAT32_BYTES  # each activation quantizer stores one step, enabled or not
    total = grid * grid * hidden * FLOAT32_BYTES if vision.use_abs_pos else 0
    if arch.resolution != vision.image_size:  # the antialiased resize of the input, as one float32 matrix
        total += arch.resolution * vision.image_size * FLOAT32_BYTES
    conv_path = CONV_PATHS["patch_embed"]
    total += _layer_bytes(hidden * vision.num_channels * patch * patch, hidden, weight_bits(conv_path), weight_container)
    total += 0 if plain(conv_path) else step
    for block in arch.kept_blocks:
        width, mlp_dim = arch.num_heads[block] * head_dim, arch.mlp_dims[block]
        prefix = f"layers.{block}"
        for name, inputs, outputs in (
            ("attn.qkv", hidden, 3 * width), ("attn.proj", width, hidden), ("mlp.lin1", hidden, mlp_dim),
            ("mlp.lin2", mlp_dim, hidden),
        ):
            layer = f"{prefix}.{name}"
            total += _layer_bytes(inputs * outputs, outputs, weight_bits(layer), weight_container)
            total += 0 if plain(layer) else step
        total += 4 * step + 2 * 2 * hidden * FLOAT32_BYTES  # the four product quantizers, two layer norms
        if vision.use_rel_pos:
            side = base_grid if block in vision.global_attn_indexes else vision.window_size
            total += 2 * (2 * side - 1) * head_dim * FLOAT32_BYTES
    for path, inputs, kernel in ((CONV_PATHS["neck_conv1"], hidden, 1), (CONV_PATHS["neck_conv2"], out_channels, 3)):
        quantized = not plain(path)
        elements = out_channels * inputs * kernel * kernel
        total += _layer_bytes(elements, out_channels, weight_bits(path), weight_container, bias=quantized)
        if quantized:
            total += step
            if kernel > 1 and config.activation_offset and not is_float_bits(arch.bits_of(path)[1]):
                # A padded convolution's input offset folds into a bias map over the whole grid.
                total += out_channels * (grid * grid - 1) * FLOAT32_BYTES
    total += 2 * 2 * out_channels * FLOAT32_BYTES  # the neck's two layer norms
    return total


def check_weight_bytes(max_weight_bytes) -> int:
    """`max_weight_bytes` as an int; refuses what is not a positive whole number of bytes, naming it."""
    if isinstance(max_weight_bytes, bool) or not isinstance(max_weight_bytes, (int, float)) or not (
        max_weight_bytes >= 1 and float(max_weight_bytes).is_integer()
    ):
        raise ValueError(f"`max_weight_bytes` must be a positive whole number of bytes, got {max_weight_bytes!r}.")
    return int(max_weight_bytes)


def weight_bytes_bound(config: SamSupernetConfig, max_weight_bytes) -> int:
    """`max_weight_bytes` checked, and refused when no subnet of the space is that small.

    Raises:
        `ValueError`: naming the value, and for a budget below every subnet, the lightest subnet and its bytes.
    """
    budget = check_weight_bytes(max_weight_bytes)
    space = SearchSpace(config)
    lightest = space.smallest()
    lightest_bytes = count_weight_bytes(config, lightest)
    if budget < lightest_bytes:
        raise ValueError(
            f"`max_weight_bytes` is {budget:,} but no subnet is that small: the lightest weighs {lightest_bytes:,} bytes "
            f"({lightest.to_json()})."
        )
    return budget


__all__ = ["check_weight_bytes", "count_weight_bytes", "weight_bytes_bound"]
