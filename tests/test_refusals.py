"""A refused call changes nothing: `calibrate_quantizers`, `set_subnet` and `extract_subnet` that raise leave the
supernet's state dict, active subnet and outputs exactly as they were."""

import pytest
import torch

from mpsupernet.extraction import extract_subnet


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, snapshot[key], rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")


def _nan_pixel_batch() -> torch.Tensor:
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    images[1, 0, 5, 7] = float("nan")
    return images


def test_calibration_refused_for_a_nan_pixel_changes_no_state(tiny_supernet):
    before = _snapshot(tiny_supernet)
    with pytest.raises(ValueError, match=r"patch_embed\.projection\.input_quantizer would be set from a tensor with non-finite"):
        tiny_supernet.calibrate_quantizers(_nan_pixel_batch())
    assert_unchanged(tiny_supernet, before)
    assert not tiny_supernet.training


def test_calibration_refused_deep_in_the_encoder_puts_back_the_quantizers_it_set(tiny_supernet):
    # Block 2's output turns to NaN: the quantizers before it were already set from the batch when block 3's refuses.
    tiny_supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128), activation_bits=(8,))
    before = _snapshot(tiny_supernet)
    active = tiny_supernet.active_subnet
    poison = tiny_supernet.sam.vision_encoder.layers[2].register_forward_hook(
        lambda module, args, output: (output[0] * float("nan"), *output[1:]) if isinstance(output, tuple) else output * float("nan")
    )
    try:
        with pytest.raises(ValueError, match=r"layers\.3\..*input_quantizer would be set from a tensor with non-finite"):
            tiny_supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128), activation_bits=(4,))
    finally:
        poison.remove()
    assert_unchanged(tiny_supernet, before)
    assert tiny_supernet.active_subnet == active


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["weight_bits"].update({"layers.1.mlp.lin1": 5}),
        lambda d: d.update(resolution=80),
        lambda d: d.update(mlp_dims=[256, 256, 100, 256]),
        lambda d: d.pop("num_heads"),
    ],
)
def test_refused_set_subnet_leaves_the_model_as_it_was(tiny_supernet, prompt_inputs, change):
    tiny_supernet.calibrate_quantizers(prompt_inputs["pixel_values"])
    tiny_supernet.set_subnet(tiny_supernet.sample_subnet(seed=4))
    active, before = tiny_supernet.active_subnet, _snapshot(tiny_supernet)
    with torch.no_grad():
        reference = tiny_supernet(**prompt_inputs).pred_masks
    arch = tiny_supernet.smallest_subnet().to_dict()
    change(arch)
    with pytest.raises(ValueError):
        tiny_supernet.set_subnet(arch)
    assert tiny_supernet.active_subnet == active
    assert_unchanged(tiny_supernet, before)
    with torch.no_grad():
        assert torch.equal(tiny_supernet(**prompt_inputs).pred_masks, reference)


def test_refused_extraction_puts_back_the_weight_steps_it_initialised(tiny_supernet):
    # Weight steps unset at 4 bits (a supernet built from its config, not from a SAM): extracting W4A4 sets the patch
    # embedding's 4-bit weight step, then refuses the never-calibrated 4-bit activation step after it.
    for name, module in tiny_supernet.named_modules():
        if name.endswith("weight_quantizer"):
            module.reset_steps()
    tiny_supernet.calibrate_quantizers(torch.randn(1, 3, 128, 128), activation_bits=(8,), weight_bits=8)
    active, before = tiny_supernet.active_subnet, _snapshot(tiny_supernet)
    with pytest.raises(ValueError, match=r"The 4-bit step size of the input quantizer of patch_embed\.projection was never calibrated"):
        extract_subnet(tiny_supernet, tiny_supernet.search_space.largest(4, 4))
    assert tiny_supernet.active_subnet == active
    assert_unchanged(tiny_supernet, before)


@pytest.mark.parametrize("arch_or_budget", ["1k", "12 apples", 3.5j])
def test_refused_extraction_by_budget_leaves_the_model_as_it_was(tiny_supernet, arch_or_budget):
    tiny_supernet.calibrate_quantizers(torch.randn(1, 3, 128, 128))
    before = _snapshot(tiny_supernet)
    with pytest.raises((ValueError, TypeError)):
        extract_subnet(tiny_supernet, arch_or_budget)
    assert_unchanged(tiny_supernet, before)
