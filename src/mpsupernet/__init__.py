"""mpsupernet: mixed-precision quantized supernets from the Segment Anything Model, fine-tuned with LoRA."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration

from .bitops import BitOpsReport, count_bitops
from .configuration_sam_supernet import SamSupernetConfig
from .modeling_sam_supernet import SamSupernetForMaskGeneration
from .search_space import SearchSpace, SubnetArchitecture

__version__ = "0.1.0.dev0"

AutoConfig.register(SamSupernetConfig.model_type, SamSupernetConfig)
AutoModel.register(SamSupernetConfig, SamSupernetForMaskGeneration)
AutoModelForMaskGeneration.register(SamSupernetConfig, SamSupernetForMaskGeneration)

__all__ = [
    "BitOpsReport",
    "SamSupernetConfig",
    "SamSupernetForMaskGeneration",
    "SearchSpace",
    "SubnetArchitecture",
    "count_bitops",
]
