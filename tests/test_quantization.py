"""LsqQuantizer: LSQ/LSQ+ forward values and gradients against the same formula written as plain autograd ops."""

import math

import pytest
import torch

from mpsupernet.quantization import LsqQuantizer, integer_range


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
