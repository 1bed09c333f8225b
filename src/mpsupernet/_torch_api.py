"""The PyTorch part of mpsupernet's top-level API: the models' registration with transformers' Auto classes.

`mpsupernet/__init__.py` imports it once transformers has been imported and torch is installed (see
`_AutoClassRegistration` there); the package's names themselves load lazily from their own modules.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForMaskGeneration,
    AutoModelForSemanticSegmentation,
)

from .architecture import SubnetArchitecture
from .bitops import BitOpsReport, count_bitops, parse_budget
from .configuration_sam_semantic import SamSemanticSubnetConfig, SamSemanticSupernetConfig
from .configuration_sam_supernet import SamSubnetConfig, SamSupernetConfig
from .extraction import extract_subnet
from .image_processing import SamQuantizedImageProcessorPil
from .image_processing_sam_semantic import SamSemanticImageProcessor
from .modeling_sam_semantic import SamSubnetForSemanticSegmentation, SamSupernetForSemanticSegmentation
from .modeling_sam_subnet import SamSubnetForMaskGeneration
from .modeling_sam_supernet import SamSupernetForMaskGeneration
from .search_space import SearchSpace

AutoConfig.register(SamSupernetConfig.model_type, SamSupernetConfig)
AutoModel.register(SamSupernetConfig, SamSupernetForMaskGeneration)
AutoModelForMaskGeneration.register(SamSupernetConfig, SamSupernetForMaskGeneration)
AutoConfig.register(SamSubnetConfig.model_type, SamSubnetConfig)
AutoModel.register(SamSubnetConfig, SamSubnetForMaskGeneration)
AutoModelForMaskGeneration.register(SamSubnetConfig, SamSubnetForMaskGeneration)
for _config, _model in (
    (SamSemanticSupernetConfig, SamSupernetForSemanticSegmentation),
    (SamSemanticSubnetConfig, SamSubnetForSemanticSegmentation),
):
    AutoConfig.register(_config.model_type, _config)
    AutoModel.register(_config, _model)
    AutoModelForSemanticSegmentation.register(_config, _model)
    AutoImageProcessor.register(_config, image_processor_classes={"pil": SamSemanticImageProcessor})
# The processor the models save (its name is in their preprocessor_config.json): found by `AutoImageProcessor`,
# `SamProcessor.from_pretrained` and `pipeline` once mpsupernet is imported, as the models are.
for config_class in (SamSupernetConfig, SamSubnetConfig):
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": SamQuantizedImageProcessorPil})

__all__ = [
    "BitOpsReport",
    "SamSemanticImageProcessor",
    "SamSemanticSubnetConfig",
    "SamSemanticSupernetConfig",
    "SamSubnetConfig",
    "SamSubnetForMaskGeneration",
    "SamSubnetForSemanticSegmentation",
    "SamSupernetConfig",
    "SamSupernetForMaskGeneration",
    "SamSupernetForSemanticSegmentation",
    "SearchSpace",
    "SubnetArchitecture",
    "count_bitops",
    "extract_subnet",
    "parse_budget",
]
