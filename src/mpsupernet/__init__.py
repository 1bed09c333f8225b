"""mpsupernet: mixed-precision quantized supernets from the Segment Anything Model, fine-tuned with LoRA.

Everything here needs PyTorch except `mpsupernet.runtime`, which runs exported subnets with onnxruntime, numpy and
Pillow. Without torch this `__init__` loads nothing, so that `import mpsupernet.runtime` still works there.
"""

__version__ = "0.1.0.dev0"


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


if _torch_available():
    from ._torch_api import *  # noqa: F401,F403
    from ._torch_api import __all__
