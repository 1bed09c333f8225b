"""The two tasks a checkpoint can serve, told apart by its `model_type`: promptable masks and class segmentation.

Publishing and loading code asks here which classes run a checkpoint and which Hub pipeline tag it carries, so that
every stage handles a semantic tier as it handles a promptable one. No torch is imported at module level: the ONNX
runtime classes are needed where torch is missing.
"""

SEMANTIC_MODEL_TYPES = ("sam_semantic_supernet", "sam_semantic_subnet")
PIPELINE_TAGS = {"promptable": "mask-generation", "semantic": "image-segmentation"}


def is_semantic(config_or_model_type) -> bool:
    """Whether a configuration (object or dict) or a `model_type` is that of a class-segmentation model."""
    if isinstance(config_or_model_type, str):
        model_type = config_or_model_type
    elif isinstance(config_or_model_type, dict):
        model_type = config_or_model_type.get("model_type")
    else:
        model_type = getattr(config_or_model_type, "model_type", None)
    return model_type in SEMANTIC_MODEL_TYPES


def pipeline_tag(config) -> str:
    """The Hub pipeline tag of a model's card: `"image-segmentation"` for class segmentation, else
    `"mask-generation"`."""
    return PIPELINE_TAGS["semantic" if is_semantic(config) else "promptable"]


def subnet_class(config):
    """The PyTorch class of a subnet checkpoint with this configuration (object, dict or `model_type`)."""
    if is_semantic(config):
        from .modeling_sam_semantic import SamSubnetForSemanticSegmentation

        return SamSubnetForSemanticSegmentation
    from .modeling_sam_subnet import SamSubnetForMaskGeneration

    return SamSubnetForMaskGeneration


def load_task_supernet(supernet, seed: int = 0):
    """`mpsupernet.modeling_sam_supernet.load_supernet`, but a saved semantic supernet (a folder or Hub id whose
    `config.json` has a semantic `model_type`) loads as `SamSupernetForSemanticSegmentation`.

    Raises:
        `OSError`: from reading the config of a folder or Hub id that holds none, as `load_supernet`.
    """
    import os

    from transformers import PretrainedConfig

    from .modeling_sam_supernet import load_supernet
    from .pretrained import shipped_sam_name

    if isinstance(supernet, (str, os.PathLike)) and shipped_sam_name(supernet) is None:
        if is_semantic(PretrainedConfig.get_config_dict(supernet)[0]):
            from .modeling_sam_semantic import SamSupernetForSemanticSegmentation

            return SamSupernetForSemanticSegmentation.from_pretrained(supernet)
    return load_supernet(supernet, seed)


def onnx_model_class(config):
    """The torch-free class that runs the ONNX export of a subnet with this configuration."""
    if is_semantic(config):
        from .runtime_semantic import OnnxSamForSemanticSegmentation

        return OnnxSamForSemanticSegmentation
    from .runtime import OnnxSamModel

    return OnnxSamModel


__all__ = ["PIPELINE_TAGS", "SEMANTIC_MODEL_TYPES", "is_semantic", "load_task_supernet", "onnx_model_class", "pipeline_tag", "subnet_class"]
