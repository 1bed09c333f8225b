"""Small SAM configurations for tests, benchmarks and the embedded default.

No SAM checkpoint can be downloaded where the project is tested, so everything runs on SAMs that the project builds
itself. These helpers give those SAMs a single definition.
"""

from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig


def make_sam_config(
    image_size: int = 128,
    patch_size: int = 16,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    window_size: int = 4,
    global_attn_indexes=(1, 3),
    output_channels: int = 32,
    mlp_dim: int | None = None,
    decoder_mlp_dim: int = 64,
    decoder_heads: int = 2,
    initializer_range: float = 0.02,
    **config_kwargs,
) -> SamConfig:
    """Builds a consistent `SamConfig` of any size.

    transformers does not keep the prompt encoder's `image_size`/`patch_size` in step with the vision encoder, and
    needs `2 * num_pos_feats == output_channels == prompt hidden size == decoder hidden size`; this sets all of them
    from one place. `initializer_range` defaults to 0.02 because SAM's default (1e-10) makes random encoders output
    zeros, which would hide bugs in tests.
    """
    vision_config = SamVisionConfig(
        hidden_size=hidden_size,
        output_channels=output_channels,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        image_size=image_size,
        patch_size=patch_size,
        window_size=window_size,
        global_attn_indexes=list(global_attn_indexes),
        num_pos_feats=output_channels // 2,
        mlp_dim=mlp_dim,
        initializer_range=initializer_range,
    )
    prompt_encoder_config = SamPromptEncoderConfig(
        hidden_size=output_channels, image_size=image_size, patch_size=patch_size
    )
    mask_decoder_config = SamMaskDecoderConfig(
        hidden_size=output_channels,
        mlp_dim=decoder_mlp_dim,
        num_attention_heads=decoder_heads,
        iou_head_hidden_dim=output_channels,
    )
    return SamConfig(
        vision_config=vision_config,
        prompt_encoder_config=prompt_encoder_config,
        mask_decoder_config=mask_decoder_config,
        initializer_range=initializer_range,
        **config_kwargs,
    )


def make_vit_b_sam_config(**config_kwargs) -> SamConfig:
    """The configuration of SAM ViT-B (`facebook/sam-vit-base`), for random-weight benchmarks and cost checks."""
    return make_sam_config(
        image_size=1024,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        output_channels=256,
        decoder_mlp_dim=2048,
        decoder_heads=8,
        **config_kwargs,
    )
