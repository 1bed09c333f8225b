"""The torch ONNX exporter's notices that say nothing about an mpsupernet export, and a context that hides them.

Each one is matched by its message (and category or logger), so that any other warning still shows:
- the exporter's registry logs "torchvision is not installed. Skipping torchvision::nms" (and `roi_align`,
  `roi_pool`, `deform_conv2d`) at every export: it registers torchvision's ops when torchvision is there, and our
  graphs use none of them;
- torch's pytree emits a `FutureWarning` about `isinstance(treespec, LeafSpec)` from its own unpickling (attributed
  to `copyreg`), about torch's code, not ours;
- the exporter warns that an axis name "will not be used, since it shares the same shape constraints with another
  axis" when two inputs name the same dynamic axis (`point_batch`, `num_points` of the points and their labels):
  the names are shared on purpose, and the graph keeps one of them.
"""

import contextlib
import logging
import warnings

_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


class _SkipTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed. Skipping torchvision::")


@contextlib.contextmanager
def quiet_exporter_notices():
    """Within it, the exporter's notices listed in this module's docstring are not shown; nothing else changes."""
    registry, notice_filter = logging.getLogger(_REGISTRY_LOGGER), _SkipTorchvisionNotice()
    registry.addFilter(notice_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            warnings.filterwarnings(
                "ignore",
                message=r"# The axis name: \w+ will not be used, since it shares the same shape constraints",
                category=UserWarning,
                module=r"torch\.onnx\.",
            )
            yield
    finally:
        registry.removeFilter(notice_filter)
