"""`SamSupernetForMaskGeneration`: a transformers SAM turned into an elastic, mixed-precision quantized supernet."""

import dataclasses
import difflib
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import SamModel
from transformers.utils import logging

from . import extraction
from .architecture import SubnetArchitecture, parameter_kind
from .bitops import BitOpsReport, count_bitops
from .configuration_sam_supernet import SamSupernetConfig
from .elastic import ElasticQuantizedConv2d, ElasticSamVisionAttention, ElasticSamVisionEncoder
from .lora import QuantizedLoraLinear
from .quantization import quantizers_restored_on_error
from .modeling_sam_base import SamQuantizedPreTrainedModel
from .modeling_sam_subnet import SamSubnetForMaskGeneration
from .search_space import SearchSpace

logger = logging.get_logger(__name__)

SAM_CONFIG_KEYS_NOT_COPIED = (
    "model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "id2label", "label2id"
)


class SamSupernetPreTrainedModel(SamQuantizedPreTrainedModel):
    """Base class: configuration class, weight initialisation and gradient-checkpointing support."""

    config_class = SamSupernetConfig
    _no_split_modules = ["ElasticSamVisionLayer", "SamTwoWayAttentionBlock"]
    checkpoint_kind = "supernet"

    def _init_own_weights(self, module: nn.Module) -> bool:
        if isinstance(module, QuantizedLoraLinear):
            module.reset_lora_parameters()
            return True
        return False


class SamSupernetForMaskGeneration(SamSupernetPreTrainedModel):
    """A mixed-precision quantized SAM supernet with quantization-aware LoRA.

    The model holds a transformers `SamModel` (`self.sam`) whose image encoder is replaced by an
    [`ElasticSamVisionEncoder`]; the prompt encoder and mask decoder are SAM's own. Base weights are frozen; the
    adapters, the quantizers' step sizes and (by default) the mask decoder train. One subnet is active at a time:
    choose it with [`set_subnet`], from [`sample_subnet`], [`largest_subnet`], [`smallest_subnet`] or
    [`full_precision_subnet`]; [`forward`] then computes what that subnet computes.

    Build one from a SAM checkpoint with [`from_sam`]; save and load it with `save_pretrained` / `from_pretrained`.

    Args:
        config ([`SamSupernetConfig`]): the base SAM configuration plus the supernet settings.
    """

    subnet_class = SamSubnetForMaskGeneration
    """The class `extract_subnet` returns."""

    def __init__(self, config: SamSupernetConfig):
        super().__init__(config)
        self.search_space = SearchSpace(config)
        self.post_init()
        self.freeze_base_model()
        self.set_subnet(self.search_space.full_precision())

    # --- building -----------------------------------------------------------------------------------------------------
    @classmethod
    def from_sam(cls, sam: SamModel | str | os.PathLike, sam_kwargs: dict | None = None, **config_overrides):
        """Converts a SAM checkpoint into a supernet.

        Args:
            sam (`SamModel`, `str` or `os.PathLike`): a loaded `SamModel`, or anything `SamModel.from_pretrained`
                accepts (a Hub repo id such as `"facebook/sam-vit-base"`, or a local folder).
            sam_kwargs (`dict`, *optional*): extra arguments for `SamModel.from_pretrained` (`revision`, `token`, ...).
            config_overrides: [`SamSupernetConfig`] arguments (search space, LoRA, quantizers), and
                `attn_implementation` (`"sdpa"` or `"eager"`).

        The base weights are copied as they are, then MLP units and attention heads (and, when the feature size is
        elastic, the channels of the residual stream) are reordered by importance (which leaves the full model's
        output unchanged) so that narrower subnets keep the most important ones, and the weight quantizers' step
        sizes are initialised from the weights. `config.base_model_name_or_path` records where the checkpoint came
        from (see [`sam_source_name`]), for model cards.
        """
        attn_implementation = config_overrides.pop("attn_implementation", None)
        _check_config_overrides(config_overrides, cls.config_class)
        if not isinstance(sam, SamModel):
            sam = SamModel.from_pretrained(sam, **(sam_kwargs or {}))
        attn_implementation = attn_implementation or sam.config._attn_implementation
        base = {k: v for k, v in sam.config.to_dict().items() if k not in SAM_CONFIG_KEYS_NOT_COPIED}
        config_overrides.setdefault("base_model_name_or_path", sam_source_name(sam))
        config = cls.config_class(**{**base, **config_overrides})
        config._attn_implementation = attn_implementation
        model = cls(config)
        model.to(dtype=sam.dtype)
        incompatible = model.sam.load_state_dict(model._base_weights(sam), strict=False)
        if incompatible.unexpected_keys:
            raise ValueError(f"The SAM checkpoint has weights the supernet cannot place: {incompatible.unexpected_keys}.")
        missing_base = [key for key in incompatible.missing_keys if parameter_kind(key) is None]
        if missing_base:
            raise ValueError(f"The SAM checkpoint lacks weights the supernet needs: {missing_base}.")
        model.reorder_by_importance()
        model.initialize_weight_quantizers()
        model.set_subnet(model.search_space.full_precision())
        return model

    def _make_vision_encoder(self, config: SamSupernetConfig) -> ElasticSamVisionEncoder:
        return ElasticSamVisionEncoder(config)

    def _base_weights(self, sam: SamModel) -> dict[str, torch.Tensor]:
        """The weights of `sam` that `from_sam` copies into `self.sam`: all of them, as they are."""
        return sam.state_dict()

    def subnet_config_kwargs(self) -> dict:
        """Settings of this supernet's config that its extracted subnets' configs carry besides the shared ones."""
        return {}

    def _after_loading(self) -> None:
        """Loading replaces the parameter objects, so the base weights are frozen again afterwards."""
        self.freeze_base_model()
        self.set_subnet(self.search_space.full_precision())

    @torch.no_grad()
    def reorder_by_importance(self) -> None:
        """Sorts MLP hidden units and attention heads of every block by importance, most important first.

        Importance of an MLP unit: the product of the L2 norms of its `lin1` row and `lin2` column; of a head: the
        L2 norm of its q, k, v rows times that of its `proj` columns. When the search space has smaller feature sizes
        (`hidden_size_choices`), the channels of the residual stream are sorted too (see `_reorder_channels`).
        Permuting units, heads and channels consistently leaves the full model's function unchanged. Runs once: the
        config remembers it.
        """
        if self.config.importance_reordered:
            return
        encoder = self.sam.vision_encoder
        for layer in encoder.layers:
            _reorder_mlp(layer.mlp)
            _reorder_heads(layer.attn)
        if len(self.config.hidden_size_choices) > 1:
            _reorder_channels(encoder)
        self.config.importance_reordered = True

    @torch.no_grad()
    def initialize_weight_quantizers(self) -> None:
        """Sets every weight quantizer's step sizes, for every bit-width, from the current merged weights."""
        for module in self.modules():
            if isinstance(module, (QuantizedLoraLinear, ElasticQuantizedConv2d)):
                module.initialize_weight_quantizer()

    def freeze_base_model(self) -> None:
        """Freezes SAM's own weights; adapters, step sizes and (per the config) the mask decoder stay trainable."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(parameter_kind(name) is not None)
        if self.config.mask_decoder_training == "full":
            self.sam.mask_decoder.requires_grad_(True)

    @torch.no_grad()
    def calibrate_quantizers(
        self,
        pixel_values: torch.Tensor,
        activation_bits: tuple[int, ...] | None = None,
        weight_bits: int | None = None,
    ) -> None:
        """Sets the activation step sizes of every quantizer from one batch of images.

        Each activation step is otherwise set from the first tensor it quantizes. The full-size subnet runs once per
        activation bit-width, with its weights at `weight_bits` (default: the highest). Steps that are already set
        are kept. Extraction needs the steps of every activation bit-width a subnet uses.

        Args:
            pixel_values (`torch.Tensor`): calibration images, as the processor makes them.
            activation_bits (`tuple[int]`, *optional*): the bit-widths to calibrate; defaults to all of them.
            weight_bits (`int`, *optional*): the weight bit-width the calibration runs at.

        Raises:
            `TypeError`: if `pixel_values` is not a `torch.Tensor` (as transformers models, this takes no numpy).
            `ValueError`: if a bit-width is not among the search space's choices, or if a step would be set from
            non-finite values (a NaN pixel); the quantizers are then left exactly as they were.
        """
        if not isinstance(pixel_values, torch.Tensor):
            kind = type(pixel_values)
            raise TypeError(
                f"`pixel_values` must be a torch.Tensor of shape (batch, 3, height, width), as "
                f"`SamProcessor(images, return_tensors=\"pt\")` gives; got {kind.__module__}.{kind.__qualname__}."
            )
        was_training = self.training
        self.eval()
        try:
            with quantizers_restored_on_error(self):
                for bits in activation_bits or self.search_space.activation_bit_choices:
                    with self.using_subnet(self.search_space.largest(weight_bits, bits)):
                        self.get_image_embeddings(pixel_values)
        finally:
            self.train(was_training)

    # --- the active subnet ----------------------------------------------------------------------------------------
    def set_subnet(self, arch: SubnetArchitecture | dict | str) -> None:
        """Activates an architecture (a `SubnetArchitecture`, its `to_dict()` or `to_json()`), after checking it."""
        arch = SubnetArchitecture.coerce(arch)
        self.search_space.validate(arch)
        self.sam.vision_encoder.set_active(arch)
        self.active_subnet = arch

    @contextmanager
    def using_subnet(self, arch: SubnetArchitecture | dict) -> Iterator[SubnetArchitecture]:
        """Activates `arch` for the `with` block, then restores the subnet that was active before (even on error).

        Example: `with supernet.using_subnet(supernet.smallest_subnet()): supernet(**inputs)`.

        Yields:
            `SubnetArchitecture`: the architecture activated.
        """
        previous = self.active_subnet
        self.set_subnet(arch)
        try:
            yield self.active_subnet
        finally:
            self.set_subnet(previous)

    def sample_subnet(self, seed: int | random.Random | None = None, **bit_choices) -> SubnetArchitecture:
        """A random architecture of the search space (not activated; pass it to `set_subnet`).

        Args:
            seed (`int` or `random.Random`, *optional*): for a reproducible draw.
            bit_choices: `weight_bit_choices=` / `activation_bit_choices=` to restrict the bit-widths drawn.
        """
        return self.search_space.sample(seed, **bit_choices)

    def largest_subnet(self) -> SubnetArchitecture:
        """Full resolution, depth and width at the highest quantized bit-widths."""
        return self.search_space.largest()

    def smallest_subnet(self) -> SubnetArchitecture:
        """Lowest resolution, depth and width at the lowest bit-widths."""
        return self.search_space.smallest()

    def full_precision_subnet(self) -> SubnetArchitecture:
        """The largest subnet with every layer in float: the base SAM (plus its adapters)."""
        return self.search_space.full_precision()

    def bitops_report(self, arch: SubnetArchitecture | dict | None = None) -> BitOpsReport:
        """The BitOPs report of `arch` (default: the active subnet), counted analytically (see `mpsupernet.bitops`).

        The same name and report as `SamSubnetForMaskGeneration.bitops_report()`: the subnet extracted for `arch`
        reports the same rows and totals.
        """
        return count_bitops(self.config, self.active_subnet if arch is None else SubnetArchitecture.coerce(arch))

    def extract_subnet(
        self,
        budget: int | float | str | None = None,
        pareto_front=None,
        save_directory: str | os.PathLike | None = None,
        *,
        max_latency_ms: float | None = None,
        latency_model=None,
    ):
        """Extracts the subnet to use under a BitOPs budget as a standalone `SamSubnetForMaskGeneration`.

        The architecture comes from `pareto_front` (or, if not given, from a `pareto_front` attribute of this model,
        as the search leaves it): its best entry under the budget. Without a front the choice is cost-only: the
        first architecture that fits the budget on a greedy descent from the full-precision model that lowers bits
        first, then MLP width, heads, depth and resolution (see `mpsupernet.extraction.select_architecture`).

        Args:
            budget (`int`, `float` or `str`): BitOPs of the image encoder per image: a number, a string such as
                `"120G"`, `"1.5T"`, `"900M"`, `"35e9"`, or a share of the full-precision model such as `"5%"`. An
                architecture (`SubnetArchitecture` or its dict) is also accepted and extracted as it is, as
                `mpsupernet.extract_subnet` does.
            pareto_front (`mpsupernet.search.ParetoFront`, *optional*): evaluated architectures to choose from.
            save_directory (`str` or `os.PathLike`, *optional*): where to `save_pretrained` the subnet; nothing is
                written if the budget is rejected.
            max_latency_ms (`float`, *optional*): instead of `budget`, a latency budget in milliseconds as
                `latency_model` predicts them (see `mpsupernet.extraction.select_architecture_under_latency`).
            latency_model (`mpsupernet.LatencyModel`, *optional*): prices `max_latency_ms`.

        Returns:
            `SamSubnetForMaskGeneration`: the subnet, with `config.bitops` at most the budget.

        Raises:
            `ValueError`: if the budget is not understood, or is below the smallest subnet's BitOPs (named).
        """
        front = pareto_front if pareto_front is not None else getattr(self, "pareto_front", None)
        if (budget is None) == (max_latency_ms is None):
            raise ValueError(
                f"Give one budget: `budget` (BitOPs) or `max_latency_ms` (with `latency_model`); got budget={budget!r}, "
                f"max_latency_ms={max_latency_ms!r}."
            )
        if max_latency_ms is not None:
            if latency_model is None:
                raise ValueError(
                    f"`max_latency_ms` is {max_latency_ms!r} but no `latency_model` prices latency; fit one with "
                    "`mpsupernet.fit_latency_model(supernet)`."
                )
            budget = extraction.select_architecture_under_latency(self, max_latency_ms, latency_model, front)
        subnet = extraction.extract_subnet(self, budget, pareto_front=front)
        if save_directory is not None:
            subnet.save_pretrained(save_directory)
        return subnet


def _check_config_overrides(overrides: dict, config_class: type = SamSupernetConfig) -> None:
    """Refuses `from_sam` overrides that are not fields of `config_class`: a config keeps unknown arguments as
    attributes, so a misspelled option (`weight_bits_choices`) would otherwise change nothing, silently."""
    fields = [field.name for field in dataclasses.fields(config_class)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        matches = {name: difflib.get_close_matches(name, fields, 1) for name in unknown}
        hints = "".join(f" ({name!r}: did you mean {match[0]!r}?)" for name, match in matches.items() if match)
        raise ValueError(
            f"`from_sam` got {unknown}, which are not `{config_class.__name__}` arguments{hints}; allowed: the "
            f"`{config_class.__name__}` fields {fields} and `attn_implementation`."
        )


def load_supernet(
    supernet: "str | os.PathLike | SamSupernetForMaskGeneration", seed: int = 0
) -> SamSupernetForMaskGeneration:
    """A supernet from what the CLI and `run_search` accept: a supernet, a shipped SAM's name or a saved supernet.

    Args:
        supernet (`str`, `os.PathLike` or `SamSupernetForMaskGeneration`): a supernet (returned as it is); the name
            of a SAM shipped in the package (`mpsupernet.pretrained.SHIPPED_SAM_NAMES`; a folder of that name here is
            read as the folder), which becomes a new supernet with the default configuration; or a folder or Hub id of
            a saved supernet (`SamSupernetForMaskGeneration.from_pretrained`).
        seed (`int`, *optional*, defaults to 0): seeds the new supernet's adapters, which are initialised from
            torch's global generator (seeded per process at random otherwise).

    Raises:
        `TypeError`: for any other type. `OSError`: from `from_pretrained`, for a folder or Hub id that cannot be read.
    """
    from transformers import set_seed

    from .pretrained import load_sam, shipped_sam_name

    if isinstance(supernet, SamSupernetForMaskGeneration):
        return supernet
    if not isinstance(supernet, (str, os.PathLike)):
        raise TypeError(
            "A supernet is a SamSupernetForMaskGeneration, a shipped SAM's name, a folder or a Hub repo id, got "
            f"{type(supernet).__name__}: {supernet!r}."
        )
    name = shipped_sam_name(supernet)
    if name is None:
        return SamSupernetForMaskGeneration.from_pretrained(supernet)
    set_seed(seed)
    return SamSupernetForMaskGeneration.from_sam(load_sam(name))


def sam_source_name(sam: SamModel) -> str | None:
    """Where a loaded `SamModel` came from, as model cards name it: the Hub id it was loaded from, or the name of its
    local folder (`"embedded-sam"` for the package's embedded SAM); `None` for a model built in memory."""
    source = sam.config._name_or_path
    if not source:
        return None
    return Path(source).name if Path(source).is_dir() else source


def _reorder_mlp(mlp) -> None:
    lin1, lin2 = mlp.lin1, mlp.lin2
    importance = lin1.weight.norm(dim=1) * lin2.weight.norm(dim=0)
    order = torch.argsort(importance, descending=True)
    lin1.weight.copy_(lin1.weight[order])
    if lin1.bias is not None:
        lin1.bias.copy_(lin1.bias[order])
    lin2.weight.copy_(lin2.weight[:, order])


def _reorder_heads(attn: ElasticSamVisionAttention) -> None:
    heads, head_dim = attn.num_attention_heads, attn.head_dim
    qkv = attn.qkv.weight.view(3, heads, head_dim, -1)
    proj_columns = attn.proj.weight.view(attn.proj.out_features, heads, head_dim)
    importance = qkv.pow(2).sum(dim=(0, 2, 3)).sqrt() * proj_columns.pow(2).sum(dim=(0, 2)).sqrt()
    order = torch.argsort(importance, descending=True)
    qkv.copy_(qkv[:, order])
    if attn.qkv.bias is not None:
        qkv_bias = attn.qkv.bias.view(3, heads, head_dim)
        qkv_bias.copy_(qkv_bias[:, order])
    proj_columns.copy_(proj_columns[:, order])


def _reorder_channels(encoder: ElasticSamVisionEncoder) -> None:
    """Sorts the channels of the residual stream by importance, most important first, in every tensor that holds them.

    A channel's importance is the L2 norm of every weight that writes it or reads it: its patch-embedding filter,
    its row of every `proj` and `lin2`, its column of every `qkv` and `lin1` scaled by the layer-norm gain in front,
    and its column of the neck's first convolution. Layer norms normalise over all channels, so a consistent
    permutation of the stream (patch embedding, position embedding, layer norms, every Linear that reads or writes
    it, the neck's input) leaves the model's function unchanged.
    """
    patch = encoder.patch_embed.projection
    conv1 = encoder.neck.conv1
    importance = patch.weight.flatten(1).pow(2).sum(1) + conv1.weight.transpose(0, 1).flatten(1).pow(2).sum(1)
    for layer in encoder.layers:
        attn, mlp = layer.attn, layer.mlp
        importance += (attn.qkv.weight * layer.layer_norm1.weight).pow(2).sum(0) + attn.proj.weight.pow(2).sum(1)
        importance += (mlp.lin1.weight * layer.layer_norm2.weight).pow(2).sum(0) + mlp.lin2.weight.pow(2).sum(1)
    order = torch.argsort(importance, descending=True)

    def permute(tensor: torch.Tensor | None, dim: int) -> None:
        if tensor is not None:
            tensor.copy_(tensor.index_select(dim, order))

    permute(patch.weight, 0)
    permute(patch.bias, 0)
    permute(encoder.pos_embed, 3)
    permute(conv1.weight, 1)
    for layer in encoder.layers:
        for norm in (layer.layer_norm1, layer.layer_norm2):
            permute(norm.weight, 0)
            permute(norm.bias, 0)
        for linear in (layer.attn.qkv, layer.mlp.lin1):
            permute(linear.weight, 1)
            permute(linear.lora_A, 2)
        for linear in (layer.attn.proj, layer.mlp.lin2):
            permute(linear.weight, 0)
            permute(linear.bias, 0)
            permute(linear.lora_B, 1)


__all__ = ["SamSupernetForMaskGeneration", "SamSupernetPreTrainedModel", "load_supernet"]
