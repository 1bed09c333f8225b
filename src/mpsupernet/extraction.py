"""Freezing one architecture of a supernet into a standalone, quantized subnet, and choosing it under a budget.

[`extract_subnet`] turns an architecture into a [`SamSubnetForMaskGeneration`]: LoRA adapters are merged, weights are
quantized with the supernet's own step sizes into integer codes and packed, skipped blocks and dropped heads and MLP
units are cut away, and the activation quantizers keep their steps at the chosen bit-widths. [`select_architecture`]
picks the architecture for a BitOPs budget, from a Pareto front when there is one.
"""

from collections.abc import Iterator

import torch

from .bitops import BitOpsCounter, format_bitops, is_budget, parse_budget
from .architecture import CONV_PATHS, FLOAT_BITS, SubnetArchitecture, is_float_bits
from .elastic import ElasticQuantizedConv2d
from .lora import QuantizedLoraLinear
from .modeling_sam_subnet import SamSubnetForMaskGeneration
from .subnet_layers import QuantizedLinear
from .packing import pack_codes
from .quantization import LsqQuantizer, quantizers_restored_on_error
from .search_space import SearchSpace

BIT_LADDERS = ("weight_bits", "activation_bits")
DESCENT_ORDER = ("mlp_dim", "num_heads", "hidden_size", "depth", "resolution")


@torch.no_grad()
def extract_subnet(
    supernet, arch_or_budget: SubnetArchitecture | dict | int | float | str, pareto_front=None
) -> SamSubnetForMaskGeneration:
    """Extracts one architecture of a supernet as a standalone [`SamSubnetForMaskGeneration`].

    Takes what `SamSupernetForMaskGeneration.extract_subnet` takes: an architecture, extracted as it is, or a BitOPs
    budget, for which [`select_architecture`] chooses the architecture (from `pareto_front` if given).

    Each quantized Linear's weight is the supernet's: the LoRA adapters of its weight bit-width merged in
    (`QuantizedLoraLinear.merged_weight`), quantized with the layer's own step sizes, so that the subnet's dequantized
    weight equals the supernet's fake-quantized weight exactly; the codes are packed at their bit-width. Float layers
    keep their merged float weight. The patch embedding and neck convolutions are stored the same way (packed codes
    where quantized), cut, with the position embedding and the layer norms, to the architecture's feature size. The
    activation and attention-product quantizers keep their step (and offset) at the architecture's bits. The rest of
    the neck, the prompt encoder and the mask decoder are copied.

    Args:
        supernet (`SamSupernetForMaskGeneration`): the trained supernet; its active subnet is left as it was.
        arch_or_budget (`SubnetArchitecture`, `dict`, `int`, `float` or `str`): the architecture (checked against the
            supernet's search space), or a budget as `mpsupernet.bitops.parse_budget` reads it (`"120G"`, `"5%"`).
        pareto_front (`mpsupernet.search.ParetoFront`, *optional*): with a budget, evaluated architectures to
            choose from.

    Raises:
        `ValueError`: if the architecture is not in the search space, if the budget is not understood or too small,
        or if an activation quantizer it needs was never calibrated at its bit-width (the supernet never ran at
        those bits).
        `TypeError`: if `arch_or_budget` is neither an architecture nor a budget.
    """
    # One counter prices everything below: the references are counted once per call.
    counter = BitOpsCounter(supernet.config)
    arch = arch_or_budget
    if isinstance(arch, dict):
        arch = SubnetArchitecture.from_dict(arch)
    elif is_budget(arch):
        arch = select_architecture(counter, arch, pareto_front)
    elif not isinstance(arch, SubnetArchitecture):
        raise TypeError(
            f"`extract_subnet` takes an architecture (SubnetArchitecture or dict) or a BitOPs budget (a number or a "
            f"str such as '120G' or '5%'), got {type(arch).__name__}: {arch!r}."
        )
    with quantizers_restored_on_error(supernet), supernet.using_subnet(arch):
        return _extract_active_subnet(supernet, arch, counter)


def _extract_active_subnet(supernet, arch: SubnetArchitecture, counter: BitOpsCounter) -> SamSubnetForMaskGeneration:
    source_config = supernet.config
    report = counter.report(arch)
    config = supernet.subnet_class.config_class(
        vision_config=source_config.vision_config.to_dict(),
        prompt_encoder_config=source_config.prompt_encoder_config.to_dict(),
        mask_decoder_config=source_config.mask_decoder_config.to_dict(),
        initializer_range=source_config.initializer_range,
        architecture=arch.to_dict(),
        bitops=report.total_bitops,
        bitops_report=report.summary(),
        quantize_attention_products=source_config.quantize_attention_products,
        activation_offset=source_config.activation_offset,
        float_bits=source_config.float_bits,
        step_size_min=source_config.step_size_min,
        attention_chunk_elements=source_config.attention_chunk_elements,
        base_model_name_or_path=source_config.base_model_name_or_path,
        training_dataset=source_config.training_dataset,
        **supernet.subnet_config_kwargs(),
    )
    config._attn_implementation = source_config._attn_implementation
    subnet = supernet.subnet_class(config).to(device=supernet.device, dtype=supernet.dtype).eval()

    encoder, target_encoder = supernet.sam.vision_encoder, subnet.sam.vision_encoder
    hidden = counter.search_space.hidden_size_of(arch)
    # The blocks, the position embedding and the convolutions are cut to the architecture below; the rest is shared.
    cut = ("vision_encoder.layers.", "vision_encoder.pos_embed", *(f"vision_encoder.{p}." for p in CONV_PATHS.values()))
    shared = {key: value for key, value in supernet.sam.state_dict().items() if not key.startswith(cut)}
    subnet.sam.load_state_dict(shared, strict=False)
    if encoder.pos_embed is not None:
        target_encoder.pos_embed.copy_(encoder.pos_embed[..., :hidden])
    for path, conv in encoder.quantized_convs().items():
        _copy_conv(conv, target_encoder.get_submodule(path), path)
    source_layers = encoder.layers
    for target, block in zip(target_encoder.layers, arch.kept_blocks):
        source = source_layers[block]
        for norm in ("layer_norm1", "layer_norm2"):
            target.get_submodule(norm).weight.copy_(source.get_submodule(norm).weight[:hidden])
            target.get_submodule(norm).bias.copy_(source.get_submodule(norm).bias[:hidden])
        if source.attn.use_rel_pos:
            target.attn.rel_pos_h.copy_(source.attn.rel_pos_h)
            target.attn.rel_pos_w.copy_(source.attn.rel_pos_w)
        for path, linear in source.quantized_linears().items():
            _copy_linear(linear, target.get_submodule(path), f"layers.{block}.{path}")
        for name, source_quantizer, target_quantizer in zip(
            ("query", "key", "value", "probs"), source.attn.product_quantizers(), target.attn.product_quantizers()
        ):
            _copy_quantizer(source_quantizer, target_quantizer, f"the {name} quantizer of layers.{block}.attn")
    return subnet


def _copy_linear(source: QuantizedLoraLinear, target, name: str) -> None:
    """Writes the active sub-layer of a supernet Linear into a subnet Linear (plain or quantized)."""
    # Exactly the weight the supernet multiplies with: adapters merged, rows and columns sliced, fake-quantized.
    rows = source.output_index
    _copy_weight(source.quantized_weight(), source.weight_quantizer, rows, target, name)
    if target.bias is not None:
        target.bias.copy_(source.active_bias())
    if isinstance(target, QuantizedLinear):
        _copy_quantizer(source.input_quantizer, target.input_quantizer, f"the input quantizer of {name}")


def _copy_conv(source: ElasticQuantizedConv2d, target, name: str) -> None:
    """Writes the active channels of a supernet convolution into a subnet convolution (plain or quantized)."""
    channels = None
    if source.active_out_channels != source.out_channels:
        channels = torch.arange(source.active_out_channels, device=source.weight.device)
    _copy_weight(source.quantized_weight(), source.weight_quantizer, channels, target, name)
    if target.bias is not None:
        target.bias.copy_(source.active_bias())
    if isinstance(target, QuantizedLinear):
        _copy_quantizer(source.input_quantizer, target.input_quantizer, f"the input quantizer of {name}")


def _copy_weight(
    weight: torch.Tensor, quantizer: LsqQuantizer | None, rows: torch.Tensor | None, target, name: str
) -> None:
    """Stores a (fake-quantized) supernet weight in a subnet layer: packed codes and steps, or the float weight.

    Raises:
        `ValueError`: naming the layer and rows, if a row's step is not finite, or collapsed to its floor while the
        row is not zero (it would export nothing but rounding noise).
    """
    if isinstance(target, QuantizedLinear) and not is_float_bits(target.weight_bits):
        step = _effective_weight_step(quantizer, rows)
        collapsed = quantizer.collapsed_channels(target.weight_bits)
        if rows is not None:
            collapsed = collapsed[rows.to(collapsed.device)]
        damaged = collapsed & weight.ne(0).flatten(1).any(dim=1) | ~torch.isfinite(step)
        if bool(damaged.any()):
            bad = damaged.nonzero().flatten().tolist()
            raise ValueError(
                f"The {target.weight_bits}-bit weight step sizes of {name} are not finite or have collapsed to their "
                f"floor in rows {bad[:8]}{'...' if len(bad) > 8 else ''}: the subnet would compute nothing useful "
                "there. Retrain or recalibrate the supernet (or choose other bits for this layer) before extracting."
            )
        codes = torch.round(weight / step.reshape(-1, *([1] * (weight.dim() - 1)))).to(torch.int8)
        target.packed_weight.copy_(pack_codes(codes, target.weight_bits))
        target.weight_scale.copy_(step)
    else:
        target.weight.copy_(weight)


def _effective_weight_step(quantizer: LsqQuantizer, rows: torch.Tensor | None) -> torch.Tensor:
    """The per-row step that a weight quantizer divides and multiplies by, for the output rows kept (`None`: all).

    `LsqQuantizer` rescales the step's gradient with an expression that can move its value by one ulp, so the stored
    step is not quite the one used. Quantizing a weight whose every row holds one stored step gives code 1 times the
    step used: exactly that step. With it, `codes * step` reproduces the fake-quantized weight bit for bit.
    """
    step = quantizer.step_magnitude(quantizer.step_size[quantizer.bit_index(quantizer.active_bits)])
    if rows is not None:
        step = step[rows.to(step.device)]
    return quantizer(step.unsqueeze(1), channel_index=rows)[:, 0]


def _copy_quantizer(source: LsqQuantizer, target: LsqQuantizer, name: str) -> None:
    """Copies the step (and offset) of the target's single bit-width; a float target has none to copy."""
    if not target.is_quantizing:
        return
    bits = target.active_bits
    index = source.bit_index(bits)
    if not bool(source.initialized[index]):
        raise ValueError(
            f"The {bits}-bit step size of {name} was never calibrated: the supernet has not run a subnet with "
            f"{bits}-bit activations there. Train or calibrate it at those bits (a forward pass on data with such a "
            "subnet active) before extracting."
        )
    offset_finite = source.offset is None or bool(torch.isfinite(source.offset[index]).all())
    if bool(source.collapsed_channels(bits).any()) or not offset_finite:
        raise ValueError(
            f"The {bits}-bit step size of {name} is not finite or has collapsed to its floor "
            f"({source.step_size[index].tolist()}); exporting it would give a layer that outputs nothing useful. "
            "Recalibrate the supernet on clean images (`calibrate_quantizers`) or retrain it before extracting."
        )
    target.step_size.copy_(source.step_size[index : index + 1].abs())
    if source.offset is not None:
        target.offset.copy_(source.offset[index : index + 1])


def select_architecture_under_latency(
    supernet, max_latency_ms: float, latency_model, pareto_front=None
) -> SubnetArchitecture:
    """The architecture to extract under a latency budget, as `latency_model` predicts it.

    With a Pareto front, its best entry under the budget by predicted latency (priced again with `latency_model`, so
    a front searched under BitOPs serves too). Without one, the first architecture of [`descent_path`] whose
    predicted latency fits: cost-only, as [`select_architecture`] is for BitOPs.

    Raises:
        `ValueError`: naming the value, for a budget that is not positive or that no subnet meets (naming the fastest
        predicted subnet), a latency model fitted on another architecture space, or a front with nothing under it.
    """
    latency_model.check_compatible(supernet)
    budget = latency_model.parse_budget(max_latency_ms)
    if pareto_front is None:
        fastest, _ = latency_model.fastest()  # the descent ends at the lowest resolution, which may resize slower
        return next((arch for arch in descent_path(supernet.search_space) if latency_model.predict(arch) <= budget), fastest)
    fitting = [
        entry for entry in pareto_front.entries if latency_model.predict(entry.to_architecture()) <= budget
    ]
    if not fitting:
        raise ValueError(
            f"The Pareto front has no architecture whose predicted latency is under `max_latency_ms` {max_latency_ms!r}"
            f" on {latency_model.describe_machine()}; give a larger budget, or no front for a cost-only choice."
        )
    return max(fitting, key=lambda entry: entry.mean_iou).to_architecture()


def select_architecture(
    counter: BitOpsCounter, budget: int | float | str, pareto_front=None
) -> SubnetArchitecture:
    """The architecture to extract under a BitOPs budget.

    With a Pareto front, its best entry under the budget (`pareto_front.best_under`). Without one, a cost-only
    choice: the first architecture of [`descent_path`] (from the full-precision model down, lowering bits first, then
    MLP width, heads, depth and resolution) whose BitOPs fit the budget. That choice is deterministic and fits the
    budget, but knows nothing of quality; run the search (`mpsupernet.search`) for a front to choose from instead.

    Args:
        counter (`BitOpsCounter`): the cost function of the supernet's configuration (`BitOpsCounter(config)`).
        budget (`int`, `float` or `str`): BitOPs, or a string that `mpsupernet.bitops.parse_budget` reads ("120G",
            "1.5T", "35e9", "5%" of the full-precision model).
        pareto_front (`mpsupernet.search.ParetoFront`, *optional*): evaluated architectures to choose from.

    Raises:
        `ValueError`: if the budget is not understood, is below the smallest subnet's BitOPs (the message names
        them), if the Pareto front has nothing under it, or if its choice does not fit this supernet.
    """
    space = counter.search_space
    max_bitops = parse_budget(budget, counter.full_precision_bitops)
    smallest = counter.bitops(space.smallest())
    if max_bitops < smallest:
        raise ValueError(
            f"Budget {budget!r} ({max_bitops} BitOPs) is below the cheapest subnet of this supernet: the smallest "
            f"reachable BitOPs is {format_bitops(smallest, exact=True)}."
        )
    if pareto_front is None:
        return next(arch for arch in descent_path(space) if counter.bitops(arch) <= max_bitops)
    entry = pareto_front.best_under(max_bitops)
    if entry is None:
        raise ValueError(
            f"The Pareto front has no architecture under the budget {budget!r} ({format_bitops(max_bitops, exact=True)}); give a "
            "larger budget, or no front for a cost-only choice."
        )
    arch = SubnetArchitecture.from_dict(entry.architecture)
    try:
        space.validate(arch)
    except ValueError as error:
        raise ValueError(
            f"The Pareto front's choice under {budget!r} does not fit this supernet ({error}): the front was made for "
            "another supernet configuration. Run the search on this supernet, or give no front for a cost-only choice."
        ) from None
    bitops = counter.bitops(arch)
    if bitops > max_bitops:
        raise ValueError(
            f"The Pareto front's choice under {budget!r} costs {format_bitops(bitops, exact=True)} in this supernet, more than the "
            f"budget ({entry.bitops} according to the front): the front was made for another supernet configuration."
        )
    return arch


def descent_path(space: SearchSpace) -> Iterator[SubnetArchitecture]:
    """Uniform architectures from the full-precision model down to the smallest subnet, one step at a time.

    Each step lowers one dimension by one choice: bit-widths first (whichever of the weight and activation bits is
    higher, the weight bits on a tie), then, once both are at their lowest, the MLP width, the heads, the feature size,
    the depth and the resolution, each down to its lowest. The cost never rises along the path; it ends at
    `space.smallest()`.
    """
    ladders = {
        "weight_bits": (FLOAT_BITS, *space.weight_bit_choices),
        "activation_bits": (FLOAT_BITS, *space.activation_bit_choices),
        "mlp_dim": space.mlp_dim_choices,
        "num_heads": space.num_heads_choices,
        "hidden_size": space.hidden_size_choices,
        "depth": space.depth_choices,
        "resolution": space.resolution_choices,
    }
    position = dict.fromkeys(ladders, 0)
    while True:
        value = {name: ladders[name][index] for name, index in position.items()}
        yield space.uniform(
            value["resolution"],
            value["depth"],
            value["num_heads"],
            value["mlp_dim"],
            value["weight_bits"],
            value["activation_bits"],
            value["hidden_size"],
        )
        lowerable = [name for name in ladders if position[name] + 1 < len(ladders[name])]
        bits = [name for name in BIT_LADDERS if name in lowerable]
        if bits:
            position[max(bits, key=lambda name: (value[name], name == "weight_bits"))] += 1
        elif any(name in lowerable for name in DESCENT_ORDER):
            position[next(name for name in DESCENT_ORDER if name in lowerable)] += 1
        else:
            return


__all__ = ["descent_path", "extract_subnet", "select_architecture", "select_architecture_under_latency"]
