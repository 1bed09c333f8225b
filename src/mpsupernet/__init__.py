"""mpsupernet: mixed-precision quantized supernets from the Segment Anything Model, fine-tuned with LoRA.

`import mpsupernet` is light: it imports neither torch nor transformers, so that `mpsupernet --help` answers at
once. Every public name is imported on first use (as in transformers' own lazy module). The models register with
transformers' Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForMaskGeneration`, `AutoModelForSemanticSegmentation`,
`AutoImageProcessor`, in `_torch_api.py`) as soon
as transformers is imported, so that `import mpsupernet` followed by `AutoModel.from_pretrained(<tier>)` works in
either import order. Without torch nothing is registered, and `mpsupernet.runtime` (ONNX, numpy and Pillow only)
still imports.
"""

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# mpsupernet's loggers (`mpsupernet.*`) hang under transformers' library logger, so that its verbosity switches
# (`transformers.logging.set_verbosity_info()`, `TRANSFORMERS_VERBOSITY=info`) and its handler apply to them too;
# `logging.getLogger("mpsupernet").setLevel(...)` still sets this package's level alone.
logging.getLogger(__name__).parent = logging.getLogger("transformers")

# Public name -> the module that defines it.
_LAZY_NAMES = {
    "BitOpsReport": "bitops",
    "count_bitops": "bitops",
    "parse_budget": "bitops",
    "IGNORE_INDEX": "configuration_sam_semantic",
    "SamSemanticImageProcessor": "image_processing_sam_semantic",
    "SamSemanticSubnetConfig": "configuration_sam_semantic",
    "SamSemanticSupernetConfig": "configuration_sam_semantic",
    "SamSubnetForSemanticSegmentation": "modeling_sam_semantic",
    "SamSupernetForSemanticSegmentation": "modeling_sam_semantic",
    "SamSubnetConfig": "configuration_sam_supernet",
    "SamSupernetConfig": "configuration_sam_supernet",
    "extract_subnet": "extraction",
    "LatencyModel": "latency",
    "fit_latency_model": "latency",
    "load_subnet": "hub",
    "push_tiers": "hub",
    "render_subnet_card": "hub",
    "render_tiers_card": "hub",
    "save_tiers": "hub",
    "load_metric": "metrics",
    "SamSubnetForMaskGeneration": "modeling_sam_subnet",
    "SamSupernetForMaskGeneration": "modeling_sam_supernet",
    "ParetoFront": "search",
    "run_search": "search",
    "SearchSpace": "search_space",
    "SubnetArchitecture": "architecture",
    "SupernetTrainer": "training",
    "SupernetTrainingArguments": "training",
    "train_supernet": "training",
    "count_weight_bytes": "weight_bytes",
}

# The module whose import registers the package's configurations and models with transformers' Auto classes.
_AUTO_REGISTRATION_MODULE = "_torch_api"

__all__ = sorted(_LAZY_NAMES)

if TYPE_CHECKING:
    from .architecture import SubnetArchitecture
    from .bitops import BitOpsReport, count_bitops, parse_budget
    from .configuration_sam_semantic import IGNORE_INDEX, SamSemanticSubnetConfig, SamSemanticSupernetConfig
    from .configuration_sam_supernet import SamSubnetConfig, SamSupernetConfig
    from .extraction import extract_subnet
    from .latency import LatencyModel, fit_latency_model
    from .image_processing_sam_semantic import SamSemanticImageProcessor
    from .modeling_sam_semantic import SamSubnetForSemanticSegmentation, SamSupernetForSemanticSegmentation
    from .hub import load_subnet, push_tiers, render_subnet_card, render_tiers_card, save_tiers
    from .metrics import load_metric
    from .modeling_sam_subnet import SamSubnetForMaskGeneration
    from .modeling_sam_supernet import SamSupernetForMaskGeneration
    from .search import ParetoFront, run_search
    from .search_space import SearchSpace
    from .training import SupernetTrainer, SupernetTrainingArguments, train_supernet
    from .weight_bytes import count_weight_bytes


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


class _AutoClassRegistration(importlib.abc.MetaPathFinder):
    """Registers the package's models with transformers' Auto classes once both can be imported safely.

    Registration imports `_torch_api`, which imports the configuration and model modules and registers them; it
    needs transformers and torch, which `import mpsupernet` must not import. A user may import transformers after mpsupernet and call
    `AutoModel.from_pretrained` without touching any mpsupernet name, so registration runs when the import of
    `transformers` completes. When an mpsupernet module is what imports transformers, registering there would import
    the model modules while that module is half-initialised (a circular import); registration then waits until the
    outermost mpsupernet module being imported has finished.

    The finder only wraps the loaders that the other finders return, for `transformers` and `mpsupernet.*`, and
    removes itself once registration is done.
    """

    def __init__(self):
        self.depth = 0
        self.registering = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" and not fullname.startswith(f"{__name__}."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        is_own_module = fullname != "transformers"

        def exec_module_then_register(module):
            self.depth += is_own_module
            try:
                exec_module(module)
            finally:
                self.depth -= is_own_module
            self.register_if_ready()

        spec.loader.exec_module = exec_module_then_register
        return spec

    def register_if_ready(self) -> None:
        if self.depth or self.registering or "transformers" not in sys.modules:
            return
        if importlib.util.find_spec("torch") is None:
            # The models need torch; where it is missing (e.g. only the ONNX runtime is used), transformers' own
            # import must not fail because of mpsupernet, so nothing is registered.
            sys.meta_path.remove(self)
            return
        self.registering = True
        try:
            importlib.import_module(f"{__name__}.{_AUTO_REGISTRATION_MODULE}")
        finally:
            self.registering = False
        if self in sys.meta_path:
            sys.meta_path.remove(self)


if not any(isinstance(finder, _AutoClassRegistration) for finder in sys.meta_path):
    _registration = _AutoClassRegistration()
    sys.meta_path.insert(0, _registration)
    _registration.register_if_ready()
