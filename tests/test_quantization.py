"""LsqQuantizer: LSQ/LSQ+ forward values and gradients against the same formula written as plain autograd ops."""

import logging
import math

import pytest
import torch

from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.extraction import extract_subnet
from mpsupernet.quantization import LsqFakeQuantize, LsqQuantizer, collapsed_step_sizes, integer_range


def reference_fake_quantize(x, step, offset, q_min, q_max, grad_scale):
    """LSQ as its papers write it: rounding through the straight-through estimator, the step's gradient scaled."""
    step = (step - step * grad_scale).detach() + step * grad_scale
    shifted = x if offset is None else x - offset
    clipped = torch.clamp(shifted / step, q_min, q_max)
    quantized = (clipped.round() - clipped).detach() + clipped
    return quantized * step if offset is None else quantized * step + offset


@pytest.mark.parametrize(
    "per_channel, signed, learn_offset", [(True, True, False), (False, False, True), (False, True, False)]
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gradients_match_the_straight_through_formula(per_channel, signed, learn_offset, bits):
    torch.manual_seed(bits)
    channels = 6 if per_channel else 1
    quantizer = LsqQuantizer([2, 4, 8], num_channels=channels, signed=signed, learn_offset=learn_offset)
    x = (torch.randn(6, 50) * 2).requires_grad_(True)
    quantizer.set_bits(bits)
    index = quantizer.bit_index(bits)
    q_min, q_max = integer_range(bits, signed)
    with torch.no_grad():  # a grid about 3 wide (per channel: 2 to 4), so that many values fall outside it
        quantizer.step_size[index] = torch.linspace(2, 4, channels) / (q_max - q_min)
        if learn_offset:
            quantizer.offset[index] = -1.0
        quantizer.initialized[index] = True
    step = quantizer.step_size[index].reshape(-1, 1) if per_channel else quantizer.step_size[index]
    offset = quantizer.offset[index] if learn_offset else None
    grad_scale = 1 / math.sqrt((x[0].numel() if per_channel else x.numel()) * q_max)
    upstream = torch.randn(6, 50)
    tensors = [x, quantizer.step_size] + ([quantizer.offset] if learn_offset else [])

    output = quantizer(x)
    grads = torch.autograd.grad(output, tensors, upstream)
    expected_output = reference_fake_quantize(x, step, offset, q_min, q_max, grad_scale)
    expected_grads = torch.autograd.grad(expected_output, tensors, upstream)

    torch.testing.assert_close(output, expected_output)
    scaled = (x if offset is None else x - offset) / step
    inside = (scaled >= q_min) & (scaled <= q_max)
    assert 0 < inside.float().mean() < 1  # both branches of every gradient are exercised
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("per_channel, learn_offset", [(True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_kernels_give_the_values_of_the_out_of_place_formula(per_channel, learn_offset, dtype):
    # The quantizer computes in place on its temporaries to save memory; values and gradients must be those of the
    # formula written with out-of-place ops, bit for bit, also when `x` is bf16 and the tables float32.
    torch.manual_seed(1)
    x = (torch.randn(6, 50) * 2).to(dtype).requires_grad_(True)
    step = (torch.linspace(0.2, 0.4, 6).reshape(6, 1) if per_channel else torch.tensor([0.3])).requires_grad_(True)
    offset = torch.tensor([-1.0], requires_grad=True) if learn_offset else None
    q_min, q_max = integer_range(4, signed=not learn_offset)
    grad_scale = 0.125
    upstream = torch.randn(6, 50)
    tensors = [x, step] + ([offset] if learn_offset else [])

    output = LsqFakeQuantize.apply(x, step, offset, q_min, q_max, grad_scale)
    grads = torch.autograd.grad(output, tensors, upstream.to(output.dtype))

    scaled = (x if offset is None else x - offset).detach() / step.detach()
    expected_output = scaled.clamp(q_min, q_max).round() * step.detach()
    if offset is not None:
        expected_output = expected_output + offset.detach()
    inside = (scaled >= q_min) & (scaled <= q_max)
    grad_output = upstream.to(output.dtype)
    step_gradient = scaled.clamp(q_min, q_max).round() - torch.where(inside, scaled, 0)
    expected_grads = [
        (grad_output * inside).to(dtype),
        (grad_output * step_gradient).sum_to_size(step.shape) * grad_scale,
    ]
    if learn_offset:
        expected_grads.append(grad_output.masked_fill(inside, 0).sum_to_size(offset.shape))
    assert 0 < inside.float().mean() < 1  # both branches of every gradient are exercised
    assert output.dtype == torch.float32 and torch.equal(output, expected_output)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.dtype == expected.dtype and torch.equal(grad, expected)


def test_forward_keeps_only_its_input_for_backward():
    quantizer = LsqQuantizer([4], learn_offset=True, signed=False)
    quantizer.set_bits(4)
    x = torch.randn(8, 100, requires_grad=True)
    parameters = {p.data_ptr() for p in quantizer.parameters()}
    kept = []

    def pack(tensor):
        if tensor.numel() > 1 and tensor.data_ptr() not in parameters:
            kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = quantizer(x)
    assert len(kept) == 1 and kept[0] is x
    output.sum().backward()
    assert x.grad is not None and quantizer.step_size.grad.abs().sum() > 0


# --- poisoned statistics, low-precision dtypes, collapsed steps ---------------------------------------------------------
def test_calibration_refuses_what_is_not_a_tensor_and_bits_outside_the_space(tiny_supernet):
    images = torch.randn(2, 3, 128, 128)
    with pytest.raises(TypeError, match=r"^`pixel_values` must be a torch\.Tensor .*; got numpy\.ndarray\.$"):
        tiny_supernet.calibrate_quantizers(images.numpy())
    with pytest.raises(ValueError, match=r"^`activation_bits` 5 is not in the search space; allowed: \[4, 6, 8, 32\]\.$"):
        tiny_supernet.calibrate_quantizers(images, activation_bits=(5,))
    assert not any(bool(m.initialized.any()) for n, m in tiny_supernet.named_modules() if n.endswith("input_quantizer"))


def test_non_finite_statistics_never_become_step_sizes(tiny_supernet):
    images = torch.randn(2, 3, 128, 128)
    images[1, 0, 5, 7] = float("nan")  # one NaN pixel
    message = (
        r"The 8-bit step size of sam\.vision_encoder\.patch_embed\.projection\.input_quantizer would be set from a "
        r"tensor with non-finite values \(NaN or inf\); refusing it"
    )
    with pytest.raises(ValueError, match=message):
        tiny_supernet.calibrate_quantizers(images)
    # the refused batch left nothing behind: clean images calibrate and run to finite masks
    assert not any(bool(m.initialized.any()) for n, m in tiny_supernet.named_modules() if n.endswith("input_quantizer"))
    tiny_supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128))
    tiny_supernet.set_subnet(tiny_supernet.largest_subnet())
    with torch.no_grad():
        masks = tiny_supernet(pixel_values=torch.randn(1, 3, 128, 128), input_boxes=torch.tensor([[[8.0, 8, 90, 90]]])).pred_masks
    assert torch.isfinite(masks).all()
    quantizer = LsqQuantizer([4])
    quantizer.set_bits(4)
    with pytest.raises(ValueError, match=r"The 4-bit step size of a quantizer would be set from a tensor with non-finite"):
        quantizer(torch.tensor([1.0, float("inf"), 2.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_floor_holds_in_half_precision(dtype):
    weight = torch.randn(4, 16)
    weight[2] = 0  # one all-zero row: its LSQ step is 0 before the floor
    quantizer = LsqQuantizer([2, 4], num_channels=4).to(dtype)
    quantizer.set_bits(4)
    quantizer.initialize(weight, 4, channel_dim=0)
    floor = quantizer.step_floor(dtype)
    assert floor == max(1e-8, torch.finfo(dtype).tiny) and torch.tensor(floor, dtype=dtype) > 0
    assert quantizer.step_size[1, 2] == torch.tensor(floor, dtype=dtype)
    out = quantizer(weight.to(dtype))
    assert torch.isfinite(out).all() and torch.equal(out[2], torch.zeros(16, dtype=dtype))
    q_max = integer_range(4, True)[1]
    expected_step = 2 * weight.abs().mean(dim=1) / math.sqrt(q_max)
    torch.testing.assert_close(out[0].float(), (weight[0] / expected_step[0]).round().clamp(-8, 7) * expected_step[0], atol=0.02, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_supernet_with_a_zero_weight_row_stays_finite(tiny_sam, prompt_inputs, dtype):
    with torch.no_grad():
        tiny_sam.vision_encoder.layers[0].attn.qkv.weight[3] = 0
    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam).eval()
    supernet.calibrate_quantizers(prompt_inputs["pixel_values"])
    supernet.to(dtype)
    supernet.set_subnet(supernet.largest_subnet())
    with torch.no_grad():
        output = supernet(pixel_values=prompt_inputs["pixel_values"].to(dtype), input_boxes=prompt_inputs["input_boxes"])
    assert torch.isfinite(output.pred_masks).all()


def test_a_step_at_its_floor_keeps_a_gradient_and_is_warned_about(caplog):
    quantizer = LsqQuantizer([4], signed=False)
    quantizer.name = "layers.3.mlp.lin2.input_quantizer"
    quantizer.set_bits(4)
    with caplog.at_level(logging.WARNING, logger="mpsupernet.quantization"):
        quantizer(torch.zeros(8))
    assert (
        "The 4-bit step size of layers.3.mlp.lin2.input_quantizer starts at its floor (1e-08): the tensor it was set "
        "from is all (nearly) zero" in caplog.text
    )
    x = torch.linspace(0.1, 2.0, 8, requires_grad=True)
    quantizer(x).sum().backward()
    assert quantizer.step_size.grad is not None and quantizer.step_size.grad.abs().item() > 0
    with torch.no_grad():
        quantizer.step_size.fill_(0.0)  # an optimizer step pushed it to zero: the forward uses the floor
    quantizer.step_size.grad = None
    quantizer(x).sum().backward()
    assert quantizer.step_size.grad.abs().item() > 0
    assert collapsed_step_sizes(torch.nn.ModuleDict({"q": quantizer})) == ["q (4-bit)"]


def test_a_zero_step_quantizes_with_the_floor():
    # A step loaded from a checkpoint or driven to zero by the optimizer: the forward must use exactly the floor
    # (a step that cancels to 0 makes `(x - offset) / step` 0 / 0, NaN losses for the rest of training).
    x = torch.linspace(-2.0, 2.0, 9, requires_grad=True)
    quantizer = LsqQuantizer([4], signed=False, learn_offset=True)
    quantizer.set_bits(4)
    quantizer(x.detach())
    floor = quantizer.step_floor(torch.float32)
    with torch.no_grad():
        quantizer.offset.fill_(-2.0)  # x[0] sits on the offset: 0 / 0 if the step cancels to 0
        quantizer.step_size.fill_(0.0)
    out = quantizer(x)
    out.sum().backward()
    q_max = integer_range(4, False)[1]
    expected = (((x.detach() + 2.0) / floor).clamp(0, q_max).round() * floor) - 2.0
    assert torch.equal(out.detach(), expected)
    # The step's gradient is that of a step at the floor (straight-through): x[0] is inside the range at code 0 and
    # adds nothing; the 8 others are clipped at q_max; LSQ scales by 1 / sqrt(numel * q_max).
    assert quantizer.step_size.grad.item() == pytest.approx(8 * q_max / math.sqrt(9 * q_max))


@pytest.mark.parametrize("value", [-0.25, -1.0, -3e4])
@pytest.mark.parametrize("signed, learn_offset", [(True, False), (False, True)])
def test_a_negative_step_quantizes_with_its_magnitude_and_passes_gradient_to_its_input(value, signed, learn_offset):
    # A step an optimizer drove below zero: with the floor in its place every input would be clipped, and the layer
    # below would learn nothing until the step climbed back. Its magnitude is the grid spacing instead.
    x = torch.linspace(-2.0, 2.0, 9)
    quantizer = LsqQuantizer([4], signed=signed, learn_offset=learn_offset)
    quantizer.set_bits(4)
    quantizer(x)
    offset = quantizer.offset.detach().clone() if learn_offset else None
    with torch.no_grad():
        quantizer.step_size.fill_(value)
    x.requires_grad_(True)
    out = quantizer(x)
    out.sum().backward()
    positive = LsqQuantizer([4], signed=signed, learn_offset=learn_offset)
    positive.set_bits(4)
    positive(x.detach())
    with torch.no_grad():
        positive.step_size.fill_(-value)
        if learn_offset:
            positive.offset.copy_(offset)
    x_positive = x.detach().clone().requires_grad_(True)
    expected = positive(x_positive)
    expected.sum().backward()
    assert torch.equal(out.detach(), expected.detach())
    assert torch.equal(x.grad, x_positive.grad) and x.grad.sum() > 0
    # d|s|/ds = -1: the step's gradient is the positive step's, negated
    assert quantizer.step_size.grad.item() == -positive.step_size.grad.item()
    assert collapsed_step_sizes(torch.nn.ModuleDict({"q": quantizer})) == []
    codes, scales = quantizer.quantize_to_integers(x.detach(), 4)
    assert torch.equal(scales, torch.tensor([-value]))


def _calibrated_supernet(tiny_sam):
    supernet = SamSupernetForMaskGeneration.from_sam(tiny_sam).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    return supernet


@pytest.mark.parametrize("value", [float("nan"), 0.0])
@pytest.mark.parametrize(
    "quantizer, row, message",
    [
        (
            "layers.1.mlp.lin1.input_quantizer",
            0,
            r"The 8-bit step size of the input quantizer of layers\.1\.mlp\.lin1 is not finite or has collapsed to its "
            r"floor",
        ),
        (
            "layers.0.attn.proj.weight_quantizer",
            5,
            r"The 8-bit weight step sizes of layers\.0\.attn\.proj are not finite or have collapsed to their floor in "
            r"rows \[5\]",
        ),
    ],
)
def test_extraction_refuses_non_finite_or_collapsed_steps(tiny_sam, value, quantizer, row, message):
    supernet = _calibrated_supernet(tiny_sam)
    quantizer = supernet.sam.vision_encoder.get_submodule(quantizer)
    with torch.no_grad():
        quantizer.step_size[quantizer.bit_index(8), row] = value
    with pytest.raises(ValueError, match=message):
        extract_subnet(supernet, supernet.largest_subnet())


def test_extraction_accepts_a_zero_weight_row_at_its_floor(tiny_sam):
    with torch.no_grad():
        tiny_sam.vision_encoder.layers[0].attn.proj.weight[5] = 0
    supernet = _calibrated_supernet(tiny_sam)
    subnet = extract_subnet(supernet, supernet.largest_subnet())
    assert torch.equal(subnet.sam.vision_encoder.layers[0].attn.proj.dequantized_weight()[5], torch.zeros(64))


@pytest.mark.parametrize("value", [float("nan"), 0.0, 1e-9])
def test_export_refuses_non_finite_or_collapsed_steps(tiny_sam, tmp_path, value):
    pytest.importorskip("onnx")
    supernet = _calibrated_supernet(tiny_sam)
    subnet = extract_subnet(supernet, supernet.largest_subnet())
    with torch.no_grad():
        subnet.sam.vision_encoder.layers[1].mlp.lin2.input_quantizer.step_size.fill_(value)
    message = (
        r"Cannot export: the step size of vision_encoder\.layers\.1\.mlp\.lin2\.input_quantizer at 8 bits is .*; "
        r"steps must be finite and above their floor \(1e-08\)\."
    )
    with pytest.raises(ValueError, match=message):
        subnet.export_onnx(tmp_path / "export")
    assert list(tmp_path.iterdir()) == []
