"""Configuration of a mixed-precision SAM supernet and of the standalone subnets extracted from it."""

import dataclasses
import types
import typing
import warnings

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import SamConfig

from .architecture import (
    ALLOWED_BITS,
    CONV_PATHS,
    FLOAT_BIT_CHOICES,
    FLOAT_BITS,
    LAYER_PATHS,
    QUANTIZABLE_CONVS,
    QUANTIZABLE_LAYERS,
    SubnetArchitecture,
    layer_name,
)

LORA_MODES = ("shared", "multiplex", "multipath")
BIT_GRANULARITIES = ("layer", "block")
MASK_DECODER_TRAINING = ("full", "frozen")
_LOAD_HINTS = {
    "sam": "a plain SAM becomes a supernet with `SamSupernetForMaskGeneration.from_sam`",
    "sam_supernet": (
        "load the supernet with `SamSupernetForMaskGeneration.from_pretrained` and extract a subnet with its "
        "`extract_subnet(budget)`"
    ),
    "sam_subnet": (
        "load an extracted subnet with `SamSubnetForMaskGeneration.from_pretrained`, or a tiers folder with "
        "`mpsupernet.load_subnet`"
    ),
    "sam_semantic_supernet": (
        "it segments classes without prompts: load it with `SamSupernetForSemanticSegmentation.from_pretrained` (or "
        "`AutoModelForSemanticSegmentation`)"
    ),
    "sam_semantic_subnet": (
        "it segments classes without prompts: load it with `SamSubnetForSemanticSegmentation.from_pretrained`, "
        "`AutoModelForSemanticSegmentation` or `pipeline(\"image-segmentation\", model=...)`"
    ),
}
"""How to load a checkpoint of each model type, for the error of a class given another type."""


_ALLOWED_VALUES = {
    "weight_bit_choices": f"a list of distinct integers from {list(ALLOWED_BITS)}",
    "activation_bit_choices": f"a list of distinct integers from {list(ALLOWED_BITS)}",
    "quantized_layers": f"a list of layer names from {list(QUANTIZABLE_LAYERS + QUANTIZABLE_CONVS)}",
    "float_bits": f"one of {list(FLOAT_BIT_CHOICES)}",
    "lora_mode": f"one of {list(LORA_MODES)}",
    "bit_granularity": f"one of {list(BIT_GRANULARITIES)}",
    "mask_decoder_training": f"one of {list(MASK_DECODER_TRAINING)}",
    "lora_rank": "an integer of at least 1",
    "step_size_min": "a positive number",
    "resolution_choices": "None or a list of distinct integers, multiples of the patch size",
}
"""What the error for a value of the wrong type names as allowed, where the field's type alone does not say it."""

_TYPE_NAMES = {int: "integers", float: "numbers", str: "strings", bool: "True or False", dict: "dicts"}


def _describe_type(annotation) -> str:
    """A field's annotation in words: `list[int] | None` is "a list of integers or None"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(argument) for argument in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (None,)
        return f"a list of {_TYPE_NAMES.get(item, 'values')}"
    singular = {int: "an integer", float: "a number", str: "a string", bool: "True or False", dict: "a dict"}
    return singular.get(annotation, "None" if annotation is type(None) else getattr(annotation, "__name__", "a list"))


def _named_type_errors(cls):
    """Makes a value of the wrong type for a field of `cls` (a `@strict` config) a `ValueError` that names the field,
    the value and what is allowed, as the other checks do; `@strict` alone raises its own error without the allowed
    values. An integer given for a float field (`step_size_min=0`, `lora_alpha=16`) is taken as that float, as
    Python's numbers are. Apply it above `@strict`, to every class (`@strict` on a subclass validates first)."""
    strict_setattr = cls.__setattr__
    annotations = {field.name: field.type for field in dataclasses.fields(cls)}

    def __setattr__(self, name, value):
        annotation = annotations.get(name)
        floats = (annotation, *typing.get_args(annotation))
        if float in floats and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError:
            allowed = _ALLOWED_VALUES.get(name) or _describe_type(annotation)
            raise ValueError(f"`{name}` is {value!r}, of type {type(value).__name__}; allowed: {allowed}.") from None

    cls.__setattr__ = __setattr__
    return cls


def _check_choices(name, values, allowed=None, minimum=None):
    """Validates a non-empty list of distinct ints, optionally within a set or above a minimum."""
    if not values:
        raise ValueError(f"`{name}` must be a non-empty list, got {values!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` must not repeat values, got {values!r}.")
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"`{name}` must hold integers, got {value!r} in {values!r}.")
        if allowed is not None and value not in allowed:
            # A range of widths can hold thousands of values (ViT-B's MLP: 1 to 3072): name its bounds.
            described = (
                f"integers from {allowed.start} to {allowed.stop - 1}" if isinstance(allowed, range) else list(allowed)
            )
            raise ValueError(f"`{name}` has {value}, which is not allowed; allowed values are {described}.")
        if minimum is not None and value < minimum:
            raise ValueError(f"`{name}` has {value}, which is below the minimum {minimum}.")


@_named_type_errors
@strict
class SamQuantizedConfigBase(SamConfig):
    r"""
    What [`SamSupernetConfig`] and [`SamSubnetConfig`] share: the base SAM configuration (every argument of
    `transformers.SamConfig`), the settings the quantized layers run with, and the checks run once per construction.

    Runtime:
        quantize_attention_products (`bool`, *optional*, defaults to `True`):
            Whether the act x act attention products run on operands quantized at the activation bits of the block's
            `qkv` layer. When `False` they run (and count) in float.
        activation_offset (`bool`, *optional*, defaults to `True`):
            Activations use an unsigned grid with a learned offset (LSQ+); otherwise a signed symmetric grid.
        float_bits (`int`, *optional*, defaults to 32):
            The bit-width at which floating-point operations are counted in BitOPs (32 for fp32 deployment, 16 for
            fp16/bf16).
        step_size_min (`float`, *optional*, defaults to 1e-8):
            Lower bound applied to every step size, which must stay positive.
        attention_chunk_elements (`int`, *optional*, defaults to 16777216):
            The most attention scores (`batch * heads x query rows x keys` elements, 2^24 = 64 MiB in float32) the
            image encoder's attention makes at a time, forward and backward: above it, queries are processed in
            chunks of rows, with the same result (`mpsupernet.chunked_attention`). At 1024 px a ViT-B global block
            would otherwise hold `12 x 4096 x 4096` scores; windowed blocks and small resolutions stay whole.

    Provenance (what model cards and the CLI state by default; extracted subnets inherit it):
        base_model_name_or_path (`str`, *optional*):
            The SAM checkpoint the supernet was made from, set by `SamSupernetForMaskGeneration.from_sam`: its Hub
            id, or the name of its local folder (`"embedded-sam"` for the package's embedded SAM).
        training_dataset (`str`, *optional*):
            The name of the dataset the supernet was last trained on, set by `train_supernet` and
            `SupernetTrainer` when the dataset has one (`mpsupernet.data.dataset_name`).

    Subclasses fill their defaults in `_fill_defaults` and extend `check_settings`. The checks are deliberately not
    named `validate_*`: `@strict` runs such methods after `__init__` on its own, which ran every check twice and
    wrapped its `ValueError`; they run once, from `__post_init__`, and again before `save_pretrained` writes.
    """

    quantize_attention_products: bool = True
    activation_offset: bool = True
    float_bits: int = FLOAT_BITS
    step_size_min: float = 1e-8
    attention_chunk_elements: int = 2**24
    base_model_name_or_path: str | None = None
    training_dataset: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._fill_defaults()
        self.check_settings()

    def _fill_defaults(self) -> None:
        """Sets the fields left as `None` from the base SAM; nothing to fill here."""

    def check_settings(self) -> None:
        """Raises a `ValueError` that names the offending value if a runtime setting is invalid."""
        if self.float_bits not in FLOAT_BIT_CHOICES:
            raise ValueError(f"`float_bits` is {self.float_bits}; allowed: {list(FLOAT_BIT_CHOICES)}.")
        if not self.step_size_min > 0:
            raise ValueError(f"`step_size_min` must be positive, got {self.step_size_min}.")
        if not self.attention_chunk_elements >= 1:
            raise ValueError(
                "`attention_chunk_elements` must be a positive number of elements, got "
                f"{self.attention_chunk_elements}."
            )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As `PreTrainedConfig.get_config_dict`, refusing a checkpoint of another model type.

        transformers only warns about another `model_type`, then fails on the weights with a long load report; a
        supernet, a subnet and a plain SAM are told apart by their `model_type` before any weight is read.

        Raises:
            `ValueError`: if the checkpoint's `model_type` is not this class's, naming the checkpoint, its type and
            the way to load it.
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found is not None and found != cls.model_type:
            subfolder = kwargs.get("subfolder") or ""
            where = f"{pretrained_model_name_or_path}/{subfolder}" if subfolder else str(pretrained_model_name_or_path)
            how = _LOAD_HINTS.get(found, "it is not a checkpoint of mpsupernet")
            raise ValueError(
                f"{where!r} holds a `{found}` checkpoint, not a `{cls.model_type}` one: {how}."
            )
        return config_dict, kwargs

    def save_pretrained(self, save_directory, **kwargs):
        """As `PreTrainedConfig.save_pretrained`, after checking the settings again (they may have been edited)."""
        self.check_settings()
        return super().save_pretrained(save_directory, **kwargs)

    def to_sam_config(self) -> SamConfig:
        """The plain `SamConfig` of the base model, without the supernet or subnet settings."""
        return SamConfig(
            vision_config=self.vision_config.to_dict(),
            prompt_encoder_config=self.prompt_encoder_config.to_dict(),
            mask_decoder_config=self.mask_decoder_config.to_dict(),
            initializer_range=self.initializer_range,
        )


@_named_type_errors
@strict
class SamSupernetConfig(SamQuantizedConfigBase):
    r"""
    Configuration of a [`SamSupernetForMaskGeneration`]: the configuration of the base SAM (every argument of
    `transformers.SamConfig`, from which this class inherits) plus the search space, the quantizers, the LoRA adapters
    and the progressive bit-width schedule. Lists left as `None` get defaults that scale with the base SAM.

    Search space:
        resolution_choices (`list[int]`, *optional*):
            Input resolutions a subnet may run at, each a multiple of the patch size and at most the base
            `image_size`. Defaults to the base size, 3/4 of it and 1/2 of it (1024/768/512 for ViT-B).
        skippable_blocks (`list[int]`, *optional*):
            Encoder blocks that elastic depth may drop, in the order they are dropped: a subnet of depth
            `num_hidden_layers - k` skips the first `k` of them. Global-attention blocks cannot be skipped. Defaults
            to the windowed blocks that directly precede a global block, deepest first (ViT-B: 10, 7, 4, 1).
        mlp_dim_choices (`list[int]`, *optional*):
            MLP hidden sizes a block may keep (the first `mlp_dim` units after importance reordering). Defaults to
            100%, 75% and 50% of the base `mlp_dim`.
        num_heads_choices (`list[int]`, *optional*):
            Numbers of attention heads a block may keep. Defaults to 100%, 75% and 50% of the base head count.
        hidden_size_choices (`list[int]`, *optional*):
            Feature sizes (embedding widths) a subnet may keep: the first `hidden_size` channels of the residual
            stream in every block, the patch embedding's output and the neck's input (channels are sorted by
            importance when the supernet is built; heads keep their width). Defaults to the base `hidden_size` only:
            the operator is off unless smaller widths are listed (e.g. `[768, 640, 512]` for ViT-B).
        weight_bit_choices (`list[int]`, *optional*, defaults to `[2, 3, 4, 6, 8]`):
            Weight bit-widths of the quantized layers. Each layer may also be set to 32 (float, not quantized).
        activation_bit_choices (`list[int]`, *optional*, defaults to `[4, 6, 8]`):
            Activation bit-widths of the quantized layers (inputs of the quantized Linears and of the attention
            products). Each layer may also be set to 32.
        bit_granularity (`str`, *optional*, defaults to `"layer"`):
            `"layer"`: every quantized layer has its own bit-widths; `"block"`: all quantized layers of an encoder
            block share them.
        quantized_layers (`list[str]`, *optional*,
            defaults to `["qkv", "proj", "lin1", "lin2", "patch_embed", "neck_conv1", "neck_conv2"]`):
            Which layers are quantized: Linears of each encoder block (`"qkv"`, `"proj"`, `"lin1"`, `"lin2"`) and
            convolutions of the encoder (`"patch_embed"`, `"neck_conv1"`, `"neck_conv2"`). The others and the mask
            decoder stay at full precision. A configuration saved before the convolutions could be quantized lists
            only Linears, so it keeps them in float.
        quantize_attention_products (`bool`, *optional*, defaults to `True`):
            Whether the act x act attention products (queries x keys, probabilities x values) run on fake-quantized
            operands at the activation bits of the block's `qkv` layer. When `False` they run (and count) in float.
        float_bits (`int`, *optional*, defaults to 32):
            The bit-width at which floating-point operations are counted in BitOPs (32 for fp32 deployment, 16 for
            fp16/bf16).

    Quantizers:
        activation_offset (`bool`, *optional*, defaults to `True`):
            Activations use an unsigned grid with a learned offset (LSQ+); otherwise a signed symmetric grid.
        step_size_min (`float`, *optional*, defaults to 1e-8):
            Lower bound applied to every learned step size, which must stay positive.
        attention_chunk_elements (`int`, *optional*, defaults to 16777216):
            The most attention scores the image encoder's attention makes at a time (see `SamQuantizedConfigBase`).

    LoRA:
        lora_rank (`int`, *optional*, defaults to 8):
            Rank of every adapter.
        lora_alpha (`float`, *optional*, defaults to 16.0):
            Adapter scaling numerator: the adapter adds `lora_alpha / lora_rank * B @ A` to the frozen weight before
            it is quantized.
        lora_mode (`str`, *optional*, defaults to `"multiplex"`):
            `"shared"`: one adapter per layer for every subnet; `"multiplex"`: one adapter per weight bit-width,
            chosen by the active bit-width; `"multipath"`: a shared adapter plus one per weight bit-width, summed.
            A float (32-bit) layer uses the adapter of the highest weight bit-width.
        mask_decoder_training (`str`, *optional*, defaults to `"full"`):
            `"full"` trains every mask-decoder weight; `"frozen"` keeps it fixed.

    Progressive bit-widths:
        progressive_bits_schedule (`list[list]`, *optional*):
            Pairs `[fraction_of_training, [bits, ...]]`: from that fraction of training on, those weight and
            activation bit-widths are enabled. The first pair must start at 0.0. Defaults to the higher half of the
            bit choices from the start, then each lower bit-width added at evenly spaced fractions up to 0.5.

    Supernet state:
        importance_reordered (`bool`, *optional*, defaults to `False`):
            Set by [`SamSupernetForMaskGeneration.from_sam`] once MLP units and heads have been reordered by importance,
            so that loading the supernet again does not reorder twice.
    """

    model_type = "sam_supernet"

    resolution_choices: list[int] | None = None
    skippable_blocks: list[int] | None = None
    mlp_dim_choices: list[int] | None = None
    num_heads_choices: list[int] | None = None
    hidden_size_choices: list[int] | None = None
    weight_bit_choices: list[int] | None = None
    activation_bit_choices: list[int] | None = None
    bit_granularity: str = "layer"
    quantized_layers: list[str] | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_mode: str = "multiplex"
    mask_decoder_training: str = "full"
    progressive_bits_schedule: list | None = None
    importance_reordered: bool = False

    def _fill_defaults(self) -> None:
        vision = self.vision_config
        image_size, patch_size = vision.image_size, vision.patch_size
        if self.resolution_choices is None:
            self.resolution_choices = sorted(
                {image_size, _round_to(image_size * 3 // 4, patch_size), _round_to(image_size // 2, patch_size)},
                reverse=True,
            )
        if self.skippable_blocks is None:
            windowed = [i for i in range(vision.num_hidden_layers) if i not in vision.global_attn_indexes]
            self.skippable_blocks = sorted((i for i in windowed if i + 1 in vision.global_attn_indexes), reverse=True)
        if self.mlp_dim_choices is None:
            self.mlp_dim_choices = sorted({max(1, round(vision.mlp_dim * r)) for r in (1.0, 0.75, 0.5)}, reverse=True)
        if self.num_heads_choices is None:
            heads = vision.num_attention_heads
            self.num_heads_choices = sorted({max(1, round(heads * r)) for r in (1.0, 0.75, 0.5)}, reverse=True)
        if self.hidden_size_choices is None:
            self.hidden_size_choices = [vision.hidden_size]
        if self.weight_bit_choices is None:
            self.weight_bit_choices = [2, 3, 4, 6, 8]
        if self.activation_bit_choices is None:
            self.activation_bit_choices = [4, 6, 8]
        if self.quantized_layers is None:
            self.quantized_layers = list(QUANTIZABLE_LAYERS + QUANTIZABLE_CONVS)
        if self.progressive_bits_schedule is None:
            self.progressive_bits_schedule = default_progressive_schedule(
                sorted(set(self.weight_bit_choices) | set(self.activation_bit_choices))
            )

    def check_settings(self) -> None:
        """Raises a `ValueError` that names the offending value if the search space or a setting is invalid."""
        self.check_search_space()
        super().check_settings()

    def check_search_space(self) -> None:
        """Raises a `ValueError` that names the offending value if the search space or a supernet setting is invalid."""
        vision = self.vision_config
        patch_size = vision.patch_size
        _check_choices("resolution_choices", self.resolution_choices, minimum=patch_size)
        for resolution in self.resolution_choices:
            if resolution % patch_size or resolution > vision.image_size:
                raise ValueError(
                    f"`resolution_choices` has {resolution}; every resolution must be a multiple of the patch size "
                    f"{patch_size} and at most the base image size {vision.image_size}."
                )
        if len(set(self.skippable_blocks)) != len(self.skippable_blocks):
            raise ValueError(f"`skippable_blocks` must not repeat blocks, got {self.skippable_blocks!r}.")
        windowed = [i for i in range(vision.num_hidden_layers) if i not in vision.global_attn_indexes]
        for block in self.skippable_blocks:
            if block not in windowed:
                raise ValueError(
                    f"`skippable_blocks` has {block}; only windowed blocks can be skipped: {windowed} "
                    f"(global-attention blocks {list(vision.global_attn_indexes)} always stay)."
                )
        _check_choices("mlp_dim_choices", self.mlp_dim_choices, allowed=range(1, vision.mlp_dim + 1))
        _check_choices("num_heads_choices", self.num_heads_choices, allowed=range(1, vision.num_attention_heads + 1))
        _check_choices("hidden_size_choices", self.hidden_size_choices, allowed=range(1, vision.hidden_size + 1))
        _check_choices("weight_bit_choices", self.weight_bit_choices, allowed=ALLOWED_BITS)
        _check_choices("activation_bit_choices", self.activation_bit_choices, allowed=ALLOWED_BITS)
        allowed_layers = QUANTIZABLE_LAYERS + QUANTIZABLE_CONVS
        for name in self.quantized_layers:
            if name not in allowed_layers:
                raise ValueError(f"`quantized_layers` has {name!r}; allowed layer names are {list(allowed_layers)}.")
        if self.bit_granularity not in BIT_GRANULARITIES:
            raise ValueError(f"`bit_granularity` is {self.bit_granularity!r}; allowed: {list(BIT_GRANULARITIES)}.")
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"`lora_mode` is {self.lora_mode!r}; allowed: {list(LORA_MODES)}.")
        if self.mask_decoder_training not in MASK_DECODER_TRAINING:
            raise ValueError(
                f"`mask_decoder_training` is {self.mask_decoder_training!r}; allowed: {list(MASK_DECODER_TRAINING)}."
            )
        if self.lora_rank < 1:
            raise ValueError(f"`lora_rank` must be at least 1, got {self.lora_rank}.")
        validate_progressive_schedule(
            self.progressive_bits_schedule, set(self.weight_bit_choices) | set(self.activation_bit_choices)
        )


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def default_progressive_schedule(bit_choices: list[int]) -> list:
    """High bit-widths first, then each lower one enabled at evenly spaced fractions of training up to one half."""
    bits = sorted(bit_choices, reverse=True)
    start = max(1, (len(bits) + 1) // 2)
    schedule = [[0.0, bits[:start]]]
    remaining = bits[start:]
    for index, bit in enumerate(remaining):
        schedule.append([round(0.5 * (index + 1) / len(remaining), 4), [bit]])
    return schedule


def validate_progressive_schedule(schedule, allowed_bits: set[int]) -> None:
    """Checks a progressive bit-width schedule: `[[fraction, [bits, ...]], ...]`, fractions rising from 0.0."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError(f"`progressive_bits_schedule` must be a non-empty list of [fraction, [bits]], got {schedule!r}.")
    previous = -1.0
    for entry in schedule:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], (list, tuple))):
            raise ValueError(f"`progressive_bits_schedule` entry {entry!r} is not of the form [fraction, [bits, ...]].")
        fraction, bits = entry
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0 or fraction <= previous:
            raise ValueError(
                f"`progressive_bits_schedule` fraction {fraction!r} must be in [0, 1] and larger than the one before."
            )
        for bit in bits:
            if bit not in allowed_bits:
                raise ValueError(
                    f"`progressive_bits_schedule` enables {bit} bits, which is not among the bit choices "
                    f"{sorted(allowed_bits)}."
                )
        previous = fraction
    if schedule[0][0] != 0.0:
        raise ValueError(f"`progressive_bits_schedule` must start at fraction 0.0, got {schedule[0][0]!r}.")


@_named_type_errors
@strict
class SamSubnetConfig(SamQuantizedConfigBase):
    r"""
    Configuration of a [`SamSubnetForMaskGeneration`]: one architecture of a supernet, extracted as a standalone
    model. It holds the configuration of the base SAM the supernet was built from (every argument of
    `transformers.SamConfig`: the vision configuration keeps the base depth, heads, MLP width and image size), the
    architecture that says what of it is kept, and the settings the quantized layers run with. Every shape of the
    model follows from these, so transformers can build it before loading its weights.

    Subnet:
        architecture (`dict`, *optional*):
            The architecture, as `SubnetArchitecture.to_dict()` writes it: `resolution`, `skipped_blocks`,
            `num_heads` and `mlp_dims` per block of the base model (blocks keep their base numbering), optionally
            `hidden_size` (the feature size kept; the base width if absent), and `weight_bits` / `activation_bits`
            per quantized layer (`"layers.3.mlp.lin1"`, `"patch_embed.projection"`, `"neck.conv1"`; 32 means float,
            and a layer not listed is float). Defaults to the base model itself: every block at full width, in float.
        bitops (`int`, *optional*):
            BitOPs of the image encoder for one image (see `mpsupernet.bitops`), set by extraction.
        bitops_report (`dict`, *optional*):
            `BitOpsReport.summary()` of the architecture in the supernet it was extracted from; it keeps the two
            references (`full_precision_bitops`, `w8a8_bitops`) that the reductions are measured against.

    Runtime (as in [`SamSupernetConfig`]):
        quantize_attention_products (`bool`, *optional*, defaults to `True`):
            Whether the act×act attention products run on operands quantized at the activation bits of the block's
            `qkv` layer.
        activation_offset (`bool`, *optional*, defaults to `True`):
            Activations use an unsigned grid with a learned offset (LSQ+); otherwise a signed symmetric grid.
        float_bits (`int`, *optional*, defaults to 32):
            The bit-width at which floating-point operations are counted in BitOPs (32 or 16).
        step_size_min (`float`, *optional*, defaults to 1e-8):
            Lower bound applied to every step size, as in the supernet.
        attention_chunk_elements (`int`, *optional*, defaults to 16777216):
            The most attention scores the image encoder's attention makes at a time, as in the supernet.
    """

    model_type = "sam_subnet"

    architecture: dict | None = None
    bitops: int | None = None
    bitops_report: dict | None = None

    def _fill_defaults(self) -> None:
        if self.architecture is None:
            vision = self.vision_config
            blocks = vision.num_hidden_layers
            self.architecture = {
                "resolution": vision.image_size,
                "depth": blocks,
                "skipped_blocks": [],
                "num_heads": [vision.num_attention_heads] * blocks,
                "mlp_dims": [vision.mlp_dim] * blocks,
                "weight_bits": {},
                "activation_bits": {},
            }

    def subnet_architecture(self) -> SubnetArchitecture:
        """`architecture` as a `SubnetArchitecture`."""
        return SubnetArchitecture.from_dict(self.architecture)

    def check_settings(self) -> None:
        """Raises a `ValueError` naming the offending value if the architecture or a setting is invalid."""
        self.check_architecture()
        super().check_settings()

    def check_architecture(self) -> None:
        """Raises a `ValueError` naming the offending value if the architecture does not fit the base SAM.

        Named `validate_architecture` before 0.1: that name is transformers' own `@strict` hook on every config, so
        it is not kept as an alias.
        """
        vision = self.vision_config
        arch = self.subnet_architecture()
        blocks = vision.num_hidden_layers
        if len(arch.num_heads) != blocks or len(arch.mlp_dims) != blocks:
            raise ValueError(
                f"The architecture gives {len(arch.num_heads)} head counts and {len(arch.mlp_dims)} MLP widths; the "
                f"base model has {blocks} blocks and needs one of each per block."
            )
        patch_size = vision.patch_size
        if arch.resolution % patch_size or not patch_size <= arch.resolution <= vision.image_size:
            raise ValueError(
                f"The architecture's resolution is {arch.resolution}; it must be a multiple of the patch size "
                f"{patch_size} between {patch_size} and the base image size {vision.image_size}."
            )
        windowed = [i for i in range(blocks) if i not in vision.global_attn_indexes]
        if len(set(arch.skipped_blocks)) != len(arch.skipped_blocks) or not set(arch.skipped_blocks) <= set(windowed):
            raise ValueError(
                f"The architecture skips blocks {list(arch.skipped_blocks)}; only distinct windowed blocks can be "
                f"skipped: {windowed}."
            )
        for field, values, largest in (
            ("num_heads", arch.num_heads, vision.num_attention_heads),
            ("mlp_dims", arch.mlp_dims, vision.mlp_dim),
        ):
            for block, value in enumerate(values):
                if not 1 <= value <= largest:
                    raise ValueError(f"`{field}` of block {block} is {value}; allowed: 1 to {largest}.")
        if arch.hidden_size is not None and not 1 <= arch.hidden_size <= vision.hidden_size:
            raise ValueError(f"`hidden_size` is {arch.hidden_size}; allowed: 1 to {vision.hidden_size}.")
        layer_names = {layer_name(block, kind) for block in range(blocks) for kind in LAYER_PATHS}
        layer_names |= set(CONV_PATHS.values())
        allowed_bits = ALLOWED_BITS + (FLOAT_BITS,)
        for name, weight_bits, activation_bits in zip(arch.layer_names, arch.weight_bits, arch.activation_bits):
            if name not in layer_names:
                raise ValueError(
                    f"The architecture sets bits for {name!r}, which is not a quantizable layer of this "
                    f"{blocks}-block model (names look like 'layers.0.attn.qkv', 'layers.0.mlp.lin2', 'neck.conv1')."
                )
            for field, bits in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
                if bits not in allowed_bits:
                    raise ValueError(f"`{field}` of {name} is {bits}; allowed: {list(allowed_bits)}.")
        reported = (self.bitops_report or {}).get("bitops", self.bitops)
        if self.bitops is not None and reported != self.bitops:
            raise ValueError(
                f"`bitops` is {self.bitops} but `bitops_report` says {reported!r}; they must describe the same "
                "architecture."
            )
