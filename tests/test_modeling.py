"""SamSupernetForMaskGeneration: equivalence with SAM, elastic dimensions, gradients, saving and bad input."""

import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModel, AutoModelForMaskGeneration, SamModel

from mpsupernet import SamSubnetForMaskGeneration, SamSupernetConfig, SamSupernetForMaskGeneration
from mpsupernet.elastic import ElasticSamVisionAttention
from mpsupernet.extraction import extract_subnet
from mpsupernet.lora import QuantizedLoraLinear
from mpsupernet.recompute import RecomputedFunction
from mpsupernet.testing_utils import make_sam_config

from conftest import assert_same_output, drop_weights_digest, run


@pytest.mark.parametrize("multimask_output", [True, False])
def test_full_precision_subnet_reproduces_sam(tiny_sam, prompt_inputs, multimask_output):
    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam).eval()
    supernet.set_subnet(supernet.full_precision_subnet())
    reference = run(tiny_sam, prompt_inputs, multimask_output=multimask_output)
    assert_same_output(reference, run(supernet, prompt_inputs, multimask_output=multimask_output))


def test_from_sam_folder_reproduces_sam(tiny_sam, prompt_inputs, tmp_path):
    tiny_sam.save_pretrained(tmp_path / "sam")
    supernet = SamSupernetForMaskGeneration.from_sam(str(tmp_path / "sam")).eval()
    assert_same_output(run(tiny_sam, prompt_inputs), run(supernet, prompt_inputs))


def test_importance_reordering_sorts_units_and_keeps_weights(tiny_sam, tiny_supernet):
    assert tiny_supernet.config.importance_reordered
    layer = tiny_supernet.sam.vision_encoder.layers[0]
    importance = layer.mlp.lin1.weight.norm(dim=1) * layer.mlp.lin2.weight.norm(dim=0)
    assert torch.all(importance[:-1] >= importance[1:])
    original = tiny_sam.vision_encoder.layers[0].mlp.lin1.weight
    # the same rows, in another order
    torch.testing.assert_close(layer.mlp.lin1.weight.sort(dim=0).values, original.sort(dim=0).values)


def test_feature_size_reordering_sorts_channels_and_keeps_the_full_model(tiny_sam, prompt_inputs):
    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam, hidden_size_choices=[64, 48, 32]).eval()
    encoder, original = supernet.sam.vision_encoder, tiny_sam.vision_encoder
    # The channels really moved, and the patch embedding's filters are the original ones in another order.
    assert not torch.equal(encoder.patch_embed.projection.weight, original.patch_embed.projection.weight)
    order = [
        int((original.patch_embed.projection.weight == row).all(dim=(1, 2, 3)).nonzero())
        for row in encoder.patch_embed.projection.weight
    ]
    assert sorted(order) == list(range(64))
    torch.testing.assert_close(encoder.pos_embed, original.pos_embed[..., order])
    torch.testing.assert_close(encoder.neck.conv1.weight, original.neck.conv1.weight[:, order])
    layer, source = encoder.layers[2], original.layers[2]
    torch.testing.assert_close(layer.layer_norm2.bias, source.layer_norm2.bias[order])
    torch.testing.assert_close(layer.mlp.lin2.bias, source.mlp.lin2.bias[order])
    supernet.set_subnet(supernet.full_precision_subnet())
    assert_same_output(run(tiny_sam, prompt_inputs), run(supernet, prompt_inputs))


def test_largest_quantized_subnet_is_close_but_not_equal(tiny_sam, tiny_supernet, prompt_inputs):
    tiny_supernet.set_subnet(tiny_supernet.largest_subnet())  # W8A8 everywhere
    reference, quantized = run(tiny_sam, prompt_inputs), run(tiny_supernet, prompt_inputs)
    difference = (reference.pred_masks - quantized.pred_masks).abs().mean()
    assert 0 < difference < 0.5 * reference.pred_masks.abs().mean()


def record_shapes(model):
    """Registers hooks that record, per module name, the shapes of the inputs and outputs seen."""
    shapes = {}
    handles = []
    for name, module in model.sam.vision_encoder.named_modules():
        if isinstance(module, QuantizedLoraLinear) or name.startswith("layers.") and name.count(".") == 1:
            handles.append(
                module.register_forward_hook(
                    lambda mod, args, out, name=name: shapes.setdefault(name, []).append(
                        (tuple(args[0].shape) if args else None, tuple(out[0].shape if isinstance(out, tuple) else out.shape))
                    )
                )
            )
    return shapes, handles


def test_each_elastic_dimension_changes_shapes_and_cost(tiny_supernet, prompt_inputs):
    space = tiny_supernet.search_space
    largest = tiny_supernet.largest_subnet()
    base_cost = tiny_supernet.bitops_report(largest)
    head_dim = 64 // 4
    four_bits = (4,) * len(largest.layer_names)  # 16 Linears and 3 convolutions
    variants = {
        "resolution": largest.__class__(**{**largest.__dict__, "resolution": 64}),
        "depth": largest.__class__(**{**largest.__dict__, "skipped_blocks": space.skipped_blocks(3)}),
        "mlp": largest.__class__(**{**largest.__dict__, "mlp_dims": (128, 256, 192, 256)}),
        "heads": largest.__class__(**{**largest.__dict__, "num_heads": (2, 4, 3, 4)}),
        "bits": largest.__class__(**{**largest.__dict__, "weight_bits": four_bits, "activation_bits": four_bits}),
    }
    for name, arch in variants.items():
        tiny_supernet.set_subnet(arch)
        shapes, handles = record_shapes(tiny_supernet)
        output = run(tiny_supernet, prompt_inputs)
        for handle in handles:
            handle.remove()
        assert output.pred_masks.shape == (2, 1, 3, 32, 32)
        assert tiny_supernet.bitops_report(arch).total_bitops < base_cost.total_bitops, name
        if name == "resolution":
            assert shapes["layers.0"][0][0] == (2, 4, 4, 64)  # 64 px / patch 16
        if name == "depth":
            assert "layers.2" not in shapes and "layers.3" in shapes
        if name == "mlp":
            assert shapes["layers.0.mlp.lin1"][0][1][-1] == 128
            assert shapes["layers.0.mlp.lin2"][0][0][-1] == 128
            assert shapes["layers.2.mlp.lin1"][0][1][-1] == 192
        if name == "heads":
            assert shapes["layers.0.attn.qkv"][0][1][-1] == 3 * 2 * head_dim
            assert shapes["layers.0.attn.proj"][0][0][-1] == 2 * head_dim
            assert shapes["layers.2.attn.qkv"][0][1][-1] == 3 * 3 * head_dim
        if name == "bits":
            lin1 = tiny_supernet.sam.vision_encoder.layers[1].mlp.lin1
            with torch.no_grad():
                weight = lin1.quantized_weight()
            levels_per_row = [row.unique().numel() for row in weight]
            assert max(levels_per_row) <= 16 and max(levels_per_row) > 4


def test_elastic_resolution_keeps_prompts_in_base_frame(tiny_supernet):
    """A box prompt lands on the same region whatever the resolution: the mask logits stay correlated."""
    largest = tiny_supernet.full_precision_subnet()
    image = torch.zeros(1, 3, 128, 128)
    image[..., 16:64, 64:120] = 3.0
    inputs = {"pixel_values": image, "input_boxes": torch.tensor([[[64.0, 16.0, 120.0, 64.0]]])}
    masks = {}
    for resolution in (128, 64):
        tiny_supernet.set_subnet(largest.__class__(**{**largest.__dict__, "resolution": resolution}))
        masks[resolution] = run(tiny_supernet, inputs, multimask_output=False).pred_masks.flatten()
        small_input = torch.nn.functional.interpolate(image, size=(resolution, resolution), mode="bilinear")
        same = run(tiny_supernet, {**inputs, "pixel_values": small_input}, multimask_output=False)
        assert same.pred_masks.shape == (1, 1, 1, 32, 32)
    correlation = torch.corrcoef(torch.stack([masks[128], masks[64]]))[0, 1]
    assert correlation > 0.5


def test_sampled_subnet_backward_reaches_only_trainable_parameters(tiny_supernet, prompt_inputs):
    tiny_supernet.train()
    tiny_supernet.set_subnet(tiny_supernet.sample_subnet(seed=3))
    output = tiny_supernet(**prompt_inputs)
    output.pred_masks.pow(2).mean().backward()
    names_with_grad = {name for name, p in tiny_supernet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(name.endswith("lora_B") for name in names_with_grad)
    assert any("weight_quantizer.step_size" in name for name in names_with_grad)
    assert any("input_quantizer.step_size" in name for name in names_with_grad)
    assert any(name.startswith("sam.mask_decoder.") for name in names_with_grad)
    for name, parameter in tiny_supernet.named_parameters():
        is_base = not ("lora_" in name or "quantizer." in name or name.startswith("sam.mask_decoder."))
        if is_base:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_frozen_mask_decoder_option(tiny_sam):
    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam, mask_decoder_training="frozen")
    trainable = {name for name, p in supernet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "quantizer." in name for name in trainable)


@pytest.mark.parametrize("lora_mode", ["shared", "multiplex", "multipath"])
def test_quantizer_sees_the_merged_adapter_weight(tiny_sam, lora_mode):
    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam, lora_mode=lora_mode)
    layer = supernet.sam.vision_encoder.layers[0].mlp.lin1
    expected_adapters = {"shared": 1, "multiplex": 5, "multipath": 6}[lora_mode]
    assert layer.lora_A.shape[0] == layer.lora_B.shape[0] == expected_adapters
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    layer.set_active(weight_bits=4, activation_bits=32, output_index=torch.arange(128), in_features=64)
    scaling = supernet.config.lora_alpha / supernet.config.lora_rank
    chosen = {"shared": [0], "multiplex": [2], "multipath": [0, 3]}[lora_mode]  # 4 bits is index 2 of [2,3,4,6,8]
    merged = layer.weight[:128] + sum(scaling * layer.lora_B[i, :128] @ layer.lora_A[i] for i in chosen)
    step = layer.weight_quantizer.step_size[2, :128].unsqueeze(1)
    expected = torch.clamp(torch.round(merged / step), -8, 7) * step
    with torch.no_grad():
        torch.testing.assert_close(layer.quantized_weight(), expected)


def make_trainable_lora_linear(lora_mode: str) -> QuantizedLoraLinear:
    """A layer whose every tensor trains (the full-fine-tuning case), with non-zero adapters and a sliced sub-layer."""
    torch.manual_seed(0)
    layer = QuantizedLoraLinear(48, 40, True, [2, 4, 8], [4, 8], lora_rank=4, lora_alpha=8, lora_mode=lora_mode)
    layer.requires_grad_(True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("lora_mode", ["shared", "multiplex", "multipath"])
@pytest.mark.parametrize("weight_bits", [2, 4, 32])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("base_trains", [True, False])
def test_recomputed_weight_gives_the_gradients_of_plain_autograd(lora_mode, weight_bits, autocast, base_trains):
    layer = make_trainable_lora_linear(lora_mode)
    layer.weight.requires_grad_(base_trains)  # frozen: the LoRA training case, the merged weight's only leaves adapters
    layer.set_active(weight_bits, 8, output_index=torch.tensor([0, 5, 9, 17, 33, 39]), in_features=30)
    weight_function = layer.weight_function()
    x = torch.randn(2, 7, 30, requires_grad=True)
    named = [("x", x), *((name, p) for name, p in layer.named_parameters() if p.requires_grad)]
    tensors = [tensor for _, tensor in named]

    def gradients(forward):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = forward()
        return output, torch.autograd.grad(output.float().square().sum(), tensors, allow_unused=True)

    output, grads = gradients(lambda: layer(x))
    # The same computation with autograd storing everything: the quantizers and the merge as ordinary ops.
    weight_inputs = (layer.weight, layer.lora_A, layer.lora_B, layer.weight_quantizer.step_size)
    expected_output, expected_grads = gradients(
        lambda: F.linear(layer.input_quantizer(x), weight_function(*weight_inputs), layer.active_bias())
    )
    assert torch.equal(output, expected_output)
    for (name, _), grad, expected in zip(named, grads, expected_grads):
        if expected is None:  # the weight step sizes when the weight is float
            assert grad is None and weight_bits == 32, name
        else:
            torch.testing.assert_close(grad, expected, rtol=0, atol=0, msg=name)
    assert all(grad.abs().sum() > 0 for grad in grads[: 5 if base_trains else 4])  # x, weight, bias, both adapters


def test_backward_uses_the_sub_layer_of_its_forward_pass():
    layer = make_trainable_lora_linear("multiplex")
    x = torch.randn(3, 48)
    layer.set_active(4, 8)
    expected = torch.autograd.grad(layer(x).square().sum(), layer.lora_B)[0]
    loss = layer(x).square().sum()
    layer.set_active(2, 4, output_index=torch.arange(10), in_features=20)  # another subnet before backward
    assert torch.equal(torch.autograd.grad(loss, layer.lora_B)[0], expected)


def test_forward_keeps_no_weight_sized_tensor_for_backward():
    layer = make_trainable_lora_linear("shared")
    layer.set_active(4, 8)
    parameters = {p.data_ptr() for p in layer.parameters()}
    kept = []

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            kept.append(tensor.numel())
        return tensor

    x = torch.randn(2, 48, requires_grad=True)  # 96 elements; the weight has 40 × 48 = 1920
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = layer(x)
    output.sum().backward()
    # Only the raw input: the input is quantized inside the operation, its quantized copy is recomputed in backward.
    assert kept == [x.numel()], kept
    assert layer.lora_B.grad.abs().sum() > 0 and layer.input_quantizer.step_size.grad.abs().sum() > 0


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of the tensors made under this mode that are still alive (`bytes`), and their high-water mark
    (`peak`). Storages of the tensors in `existing` (parameters, inputs) are not counted when an op returns a view of
    them."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = {tensor.untyped_storage().data_ptr() for tensor in existing}
        self.bytes = self.peak = 0

    def _freed(self, key: int, size: int) -> None:
        self.live.discard(key)
        self.bytes -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(result):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size and key not in self.live:
                self.live.add(key)
                self.bytes += size
                self.peak = max(self.peak, self.bytes)
                weakref.finalize(storage, self._freed, key, size)
        return result


def test_lora_weight_makes_at_most_two_weight_sized_tensors_forward_and_three_backward():
    # A layer whose weight (256 x 512) is 32 times its input (4 x 512); base frozen, as LoRA trains it.
    torch.manual_seed(0)
    layer = QuantizedLoraLinear(512, 256, True, [4, 8], [8], lora_rank=4, lora_alpha=8, lora_mode="multiplex")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    layer.set_active(4, 8)
    x = torch.randn(4, 512)
    layer(x)  # initialises the input quantizer's step
    weight_bytes = layer.weight.nbytes
    existing = [x, *layer.parameters()]
    with LiveTensorBytes(existing) as forward:
        output = layer(x)
    # The merged weight and its quantized copy (the clamped and rounded ones are made in place), then the output.
    assert forward.peak <= 2.1 * weight_bytes, forward.peak / weight_bytes
    with LiveTensorBytes(existing) as backward:
        output.square().sum().backward()
    # The merged weight on the quantizer's scale, the weight's gradient, the step's gradient term and two masks (each
    # a quarter of the weight): the merged weight and the quantized one are freed before the gradient is made.
    assert backward.peak <= 3.6 * weight_bytes, backward.peak / weight_bytes
    assert layer.lora_B.grad.abs().sum() > 0 and layer.weight_quantizer.step_size.grad.abs().sum() > 0


def make_attention(window_size: int = 0) -> "ElasticSamVisionAttention":
    """A global (or windowed) attention of a 64-wide, 4-head SAM block, every tensor trainable, steps calibrated."""
    config = SamSupernetConfig(**{k: v for k, v in make_sam_config().to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    attn = ElasticSamVisionAttention(config, window_size).train()
    attn.requires_grad_(True)
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    return attn


def activate(attn, num_heads: int, bits: int) -> None:
    """Selects heads and bits of the attention and its two Linears, as `ElasticSamVisionLayer.set_active` does."""
    attn.set_active(num_heads, bits)
    attn.qkv.set_active(8, bits, output_index=attn.head_rows(num_heads, "cpu"))
    attn.proj.set_active(8, 8, in_features=num_heads * attn.head_dim)


@pytest.mark.parametrize("product_bits", [4, 8, 32])
@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_attention_core_gives_the_gradients_of_plain_autograd(product_bits, autocast):
    attn = make_attention()
    activate(attn, 3, product_bits)
    hidden_states = torch.randn(2, 8, 8, 64)
    with torch.no_grad():  # calibrates the product quantizers at these bits, as a first training batch would
        attn(hidden_states)
    qkv = torch.randn(3, 2 * 3, 64, 16) * 2
    query, key, value = (tensor.requires_grad_(True) for tensor in qkv.unbind(0))
    core = attn.attention_core(8, 8)
    inputs = (query, key, value, *attn.core_parameters())
    leaves = [tensor for tensor in inputs if tensor is not None]
    weights = torch.randn(2 * 3, 64, 16)

    def gradients(function):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = function(*inputs)
        return output, torch.autograd.grad((output.float() * weights).sum(), leaves, allow_unused=True)

    output, grads = gradients(lambda *args: RecomputedFunction.apply(core, *args))
    activate(attn, 4, 6)  # another subnet before backward changes nothing
    expected_output, expected_grads = gradients(core)
    assert torch.equal(output, expected_output)
    names = ["query", "key", "value", "rel_pos_h", "rel_pos_w"] + [
        f"{quantizer}.{table}"
        for quantizer in ("query", "key", "value", "probs")
        for table, tensor in zip(("step_size", "offset"), getattr(attn, f"{quantizer}_quantizer").quantize_tables())
        if tensor is not None
    ]
    assert len(names) == len(leaves) == len(grads)
    for name, grad, expected in zip(names, grads, expected_grads):
        if expected is None:  # float products use no step size
            assert grad is None and product_bits == 32, name
            continue
        torch.testing.assert_close(grad, expected, rtol=0, atol=0, msg=name)
        if not name.endswith("offset"):  # an offset only moves values clipped at the grid's low end, if any
            assert grad.abs().sum() > 0, name


def test_attention_keeps_no_attention_matrix_nor_quantized_copy_for_backward():
    attn = make_attention(window_size=8)
    activate(attn, 4, 4)
    hidden_states = torch.randn(4, 8, 8, 64, requires_grad=True)  # 4 windows of 64 tokens
    with torch.no_grad():
        attn(hidden_states)
    parameters = {p.data_ptr() for p in attn.parameters()}
    kept = []

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            kept.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, _ = attn(hidden_states)
    output.square().sum().backward()
    tokens, width = hidden_states.shape[0] * 64, 64
    # The qkv input, queries, keys and values (one tensor's views), and proj's raw input: nothing else.
    assert sum(kept) <= tokens * width + 3 * tokens * width + tokens * width, kept
    assert max(kept) <= tokens * width  # no probabilities: 4 windows x 4 heads x 64 x 64 = 4 x tokens x width
    assert attn.probs_quantizer.step_size.grad.abs().sum() > 0 and hidden_states.grad.abs().sum() > 0


def test_multiplex_adapters_are_separate_per_bit_width(tiny_supernet, prompt_inputs):
    arch4 = tiny_supernet.search_space.largest(weight_bits=4, activation_bits=8)
    arch8 = tiny_supernet.search_space.largest(weight_bits=8, activation_bits=8)
    before = {}
    for arch in (arch4, arch8):
        tiny_supernet.set_subnet(arch)
        before[arch.weight_bits[0]] = run(tiny_supernet, prompt_inputs).pred_masks
    with torch.no_grad():
        for module in tiny_supernet.modules():
            if isinstance(module, QuantizedLoraLinear):
                module.lora_B[2].normal_(0, 0.5)  # the 4-bit adapter only
    for arch in (arch4, arch8):
        tiny_supernet.set_subnet(arch)
        after = run(tiny_supernet, prompt_inputs).pred_masks
        changed = not torch.allclose(after, before[arch.weight_bits[0]])
        assert changed == (arch.weight_bits[0] == 4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_supernet, prompt_inputs):
    tiny_supernet.train()
    tiny_supernet.set_subnet(tiny_supernet.sample_subnet(seed=5))
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            tiny_supernet.activation_checkpointing_enable()
            assert tiny_supernet.sam.vision_encoder.layers[0].gradient_checkpointing
        tiny_supernet.zero_grad()
        tiny_supernet(**prompt_inputs).pred_masks.pow(2).mean().backward()
        gradients.append(tiny_supernet.sam.vision_encoder.layers[0].mlp.lin1.weight_quantizer.step_size.grad.clone())
    torch.testing.assert_close(gradients[0], gradients[1])


def test_save_and_load_round_trip(tiny_supernet, prompt_inputs, tmp_path):
    arch = tiny_supernet.sample_subnet(seed=11)
    with torch.no_grad():
        for name, parameter in tiny_supernet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    tiny_supernet.set_subnet(arch)
    expected = run(tiny_supernet, prompt_inputs)
    tiny_supernet.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loader in (SamSupernetForMaskGeneration, AutoModel, AutoModelForMaskGeneration):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, SamSupernetForMaskGeneration)
        assert loaded.config.lora_mode == tiny_supernet.config.lora_mode
        state, loaded_state = tiny_supernet.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        for key in state:
            torch.testing.assert_close(loaded_state[key], state[key], rtol=0, atol=0)
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
            n for n, p in tiny_supernet.named_parameters() if p.requires_grad
        }
        loaded.set_subnet(arch.to_dict())
        torch.testing.assert_close(run(loaded, prompt_inputs).pred_masks, expected.pred_masks, rtol=0, atol=1e-6)


def test_arch_dict_is_json_and_round_trips(tiny_supernet):
    import json

    arch = tiny_supernet.sample_subnet(seed=2)
    text = json.dumps(arch.to_dict())
    assert type(arch).from_dict(json.loads(text)) == arch


# --- bad input ---------------------------------------------------------------------------------------------------------
def test_unknown_bit_width_is_rejected(tiny_supernet):
    arch = tiny_supernet.largest_subnet().to_dict()
    arch["weight_bits"]["layers.1.mlp.lin1"] = 5
    with pytest.raises(ValueError, match=r"`weight_bits` of layers.1.mlp.lin1 is 5; allowed: \[2, 3, 4, 6, 8, 32\]"):
        tiny_supernet.set_subnet(arch)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda space: space.largest(5, 8), r"^`weight_bits` 5 is not in the search space; allowed: \[2, 3, 4, 6, 8, 32\]\.$"),
        (lambda space: space.largest(0), r"^`weight_bits` 0 is not in the search space"),
        (lambda space: space.smallest(4, 3), r"^`activation_bits` 3 is not in the search space; allowed: \[4, 6, 8, 32\]\.$"),
        (lambda space: space.uniform(80, 4, 4, 256, 8, 8), r"^`resolution` 80 is not in the search space; allowed: \[64, 96, 128\]\.$"),
        (lambda space: space.uniform(128, 1, 4, 256, 8, 8), r"^`depth` 1 is not in the search space"),
        (lambda space: space.uniform(128, 4, 5, 256, 8, 8), r"^`num_heads` 5 is not in the search space"),
    ],
)
def test_architecture_constructors_refuse_values_outside_the_space(tiny_supernet, make, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_supernet.search_space)
    space = tiny_supernet.search_space
    assert space.largest(32, 32) == space.full_precision()
    largest = space.largest(4, 6)
    assert set(largest.weight_bits) == {4} and set(largest.activation_bits) == {6}


def test_resolution_not_in_space_is_rejected(tiny_supernet):
    arch = tiny_supernet.largest_subnet().to_dict()
    arch["resolution"] = 80
    with pytest.raises(ValueError, match=r"Resolution 80 is not in the search space; allowed: \[128, 96, 64\]"):
        tiny_supernet.set_subnet(arch)


def test_image_of_wrong_size_is_rejected(tiny_supernet, prompt_inputs):
    tiny_supernet.set_subnet(tiny_supernet.smallest_subnet())
    inputs = {**prompt_inputs, "pixel_values": torch.randn(2, 3, 100, 100)}
    with pytest.raises(ValueError, match=r"100x100 .* must be 128x128 .* or the active resolution 64x64"):
        run(tiny_supernet, inputs)
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\); got \(2, 1, 128, 128\)"):
        run(tiny_supernet, {**prompt_inputs, "pixel_values": torch.randn(2, 1, 128, 128)})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float16])
def test_pixel_values_of_another_dtype_are_refused_as_sam_model_does(tiny_sam, tiny_supernet, prompt_inputs, dtype):
    tiny_supernet.calibrate_quantizers(prompt_inputs["pixel_values"])
    subnet = extract_subnet(tiny_supernet, tiny_supernet.largest_subnet())
    pixel_values = (prompt_inputs["pixel_values"].clamp(-2, 2) * 50 + 128).to(dtype)
    inputs = {**prompt_inputs, "pixel_values": pixel_values}
    with pytest.raises(RuntimeError, match=r"Input type .* and bias type .* should be the same"):
        run(tiny_sam, inputs)  # transformers' SamModel
    message = rf"^pixel_values must have the model's dtype torch\.float32; got {re.escape(str(dtype))}\. Give what the processor"
    for model in (tiny_supernet, subnet):
        with pytest.raises(TypeError, match=message):
            run(model, inputs)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("mlp_dims"), r"lacks \['mlp_dims'\]"),
        (lambda d: d.update(colour="red"), r"unknown keys \['colour'\]"),
        (lambda d: d.update(num_heads="4,4"), r"`num_heads` must be a list of integers, got '4,4'"),
        (lambda d: (d.pop("depth"), d.update(num_heads=[4, 4, 4])), r"`num_heads` has 3 entries; .* one per block: 4"),
        (lambda d: d.update(mlp_dims=[256, 256, 100, 256]), r"`mlp_dims` of block 2 is 100; allowed: \[128, 192, 256\]"),
        (lambda d: (d.pop("depth"), d.update(skipped_blocks=[0])), r"Skipped blocks \[0\] are not in the search space"),
        (lambda d: d["activation_bits"].pop("layers.0.attn.qkv"), r"must name the same layers"),
        (lambda d: d.update(depth=2), r"`depth` is 2 but 4 blocks less 0 skipped make 4"),
    ],
)
def test_malformed_arch_dict_is_rejected(tiny_supernet, change, message):
    arch = tiny_supernet.largest_subnet().to_dict()
    change(arch)
    with pytest.raises(ValueError, match=message):
        tiny_supernet.set_subnet(arch)


def test_a_folder_without_config_json_names_the_missing_file(tiny_supernet, tmp_path):
    tiny_supernet.calibrate_quantizers(torch.randn(1, 3, 128, 128))
    extract_subnet(tiny_supernet, tiny_supernet.largest_subnet()).save_pretrained(tmp_path / "subnet")
    tiny_supernet.save_pretrained(tmp_path / "nested" / "supernet")
    (tmp_path / "subnet" / "config.json").unlink()
    (tmp_path / "nested" / "supernet" / "config.json").unlink()
    for folder, load, kwargs in (
        (tmp_path / "subnet", SamSubnetForMaskGeneration.from_pretrained, {}),
        (tmp_path / "nested" / "supernet", SamSupernetForMaskGeneration.from_pretrained, {}),
        (tmp_path / "nested", SamSupernetForMaskGeneration.from_pretrained, {"subfolder": "supernet"}),
    ):
        kind = "subnet" if load == SamSubnetForMaskGeneration.from_pretrained else "supernet"
        message = (
            rf"has no config\.json: it is not a complete {kind} folder \(the file is missing beside "
            rf"\['model\.safetensors', 'preprocessor_config\.json'\]\)\. Save the {kind} again"
        )
        with pytest.raises(FileNotFoundError, match=message):
            load(folder, **kwargs)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors_is_reported(tiny_supernet, tmp_path, damage):
    tiny_supernet.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a tensor" * 8)
    with pytest.raises(OSError, match=r"The weights of .* do not match its config: config.json records sha256 [0-9a-f]{64} for 'model.safetensors', but the file has sha256 [0-9a-f]{64}\. The file is damaged"):
        SamSupernetForMaskGeneration.from_pretrained(tmp_path)
    drop_weights_digest(tmp_path)  # as an older save, without digests: safetensors itself finds the damage
    with pytest.raises(OSError, match=r"not a readable safetensors file \(corrupted or truncated"):
        SamSupernetForMaskGeneration.from_pretrained(tmp_path)


def test_from_sam_rejects_a_checkpoint_that_is_not_sam(tmp_path):
    with pytest.raises(OSError):
        SamSupernetForMaskGeneration.from_sam(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"weight_bits_choices": [8]}, r"`from_sam` got \['weight_bits_choices'\], which are not `SamSupernetConfig` "
         r"arguments \('weight_bits_choices': did you mean 'weight_bit_choices'\?\); allowed: the `SamSupernetConfig` "
         r"fields \[.*'lora_rank'.*\] and `attn_implementation`\."),
        ({"colour": "red", "lorarank": 2}, r"got \['colour', 'lorarank'\], .* \('lorarank': did you mean 'lora_rank'\?\);"),
    ],
)
def test_from_sam_refuses_an_unknown_option_instead_of_ignoring_it(tiny_sam, overrides, message):
    with pytest.raises(ValueError, match=message):
        SamSupernetForMaskGeneration.from_sam(tiny_sam, **overrides)
    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam, weight_bit_choices=[4, 8], attn_implementation="eager")
    assert supernet.config.weight_bit_choices == [4, 8] and supernet.config._attn_implementation == "eager"


def test_a_width_outside_the_base_model_names_the_allowed_range(tiny_sam):
    with pytest.raises(ValueError, match=r"^`mlp_dim_choices` has 10000, which is not allowed; allowed values are integers "
                       r"from 1 to 256\.$"):
        SamSupernetForMaskGeneration.from_sam(tiny_sam, mlp_dim_choices=[10000])


def test_isinstance_of_sam_inside(tiny_supernet):
    assert isinstance(tiny_supernet.sam, SamModel)


@pytest.mark.parametrize("arch", [None, 5, ["resolution"]])
def test_an_architecture_of_the_wrong_type_is_named(tiny_supernet, arch):
    message = rf"An architecture must be a SubnetArchitecture, its to_dict\(\) or its to_json\(\), got {type(arch).__name__}"
    uses = [tiny_supernet.set_subnet, lambda a: tiny_supernet.using_subnet(a).__enter__()]
    if arch is not None:  # bitops_report(None) reports the active subnet
        uses.append(tiny_supernet.bitops_report)
    for use in uses:
        with pytest.raises(TypeError, match=message):
            use(arch)


def test_an_architecture_as_json_is_read(tiny_supernet):
    arch = tiny_supernet.smallest_subnet()
    tiny_supernet.set_subnet(arch.to_json())
    assert tiny_supernet.active_subnet == arch
    assert tiny_supernet.bitops_report(arch.to_json()).total_bitops == tiny_supernet.bitops_report(arch).total_bitops
    with pytest.raises(ValueError, match=r"An architecture string must be `SubnetArchitecture.to_json\(\)`'s output: Expecting value"):
        tiny_supernet.set_subnet("smallest")
