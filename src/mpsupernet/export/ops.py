"""The quantizer as export ops: `torch.library` custom ops with the PyTorch subnet's arithmetic, and their ONNX form.

`quantize` gives the integer codes of an `LsqQuantizer` (`clamp(round(x / step), q_min, q_max)`, ties to even, as
`torch.round`); `dequantize` multiplies codes by their step (per tensor, or per channel along `axis`). Exported with
`torch.onnx.export(..., dynamo=True, custom_translation_table=ONNX_TRANSLATIONS)`, they become `QuantizeLinear`
(zero point 0) followed, when the grid is narrower than its 8-bit container, by an integer `Clip` ("QCDQ", as
Brevitas exports bit-widths that ONNX cannot name), and `DequantizeLinear`. An LSQ+ offset is not a zero point (ONNX
needs an integer one; a learned offset is any float): callers subtract it before `quantize` and fold it into what
follows (see `mpsupernet.export.graphs`).
"""

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op


def container_dtype(q_min: int) -> torch.dtype:
    """The 8-bit container of a grid: `uint8` for unsigned grids (`q_min >= 0`), else `int8`."""
    return torch.uint8 if q_min >= 0 else torch.int8


@torch.library.custom_op("mpsupernet::quantize", mutates_args=())
def quantize(x: torch.Tensor, step: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Integer codes `clamp(round(x / step), q_min, q_max)` of a per-tensor `step` (0-d), in an 8-bit container."""
    return torch.clamp(torch.round(x / step), q_min, q_max).to(container_dtype(q_min))


@quantize.register_fake
def _(x, step, q_min, q_max):
    return torch.empty_like(x, dtype=container_dtype(q_min))


@torch.library.custom_op("mpsupernet::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, step: torch.Tensor, axis: int) -> torch.Tensor:
    """`codes * step` in float32: `step` is 0-d (per tensor) or 1-d, one value per index of `codes` along `axis`."""
    if step.dim() == 1:
        shape = [1] * codes.dim()
        shape[axis] = -1
        step = step.reshape(shape)
    return codes.to(torch.float32) * step


@dequantize.register_fake
def _(codes, step, axis):
    return torch.empty_like(codes, dtype=torch.float32)


def _quantize_onnx(x, step, q_min: int, q_max: int):
    dtype = np.uint8 if q_min >= 0 else np.int8
    codes = op.QuantizeLinear(x, step, op.Constant(value=ir.tensor(np.array(0, dtype=dtype))))
    container = np.iinfo(dtype)
    if (q_min, q_max) == (container.min, container.max):
        return codes
    low = op.Constant(value=ir.tensor(np.array(q_min, dtype=dtype)))
    high = op.Constant(value=ir.tensor(np.array(q_max, dtype=dtype)))
    return op.Clip(codes, low, high)


def _dequantize_onnx(codes, step, axis: int):
    # No zero point: it defaults to 0 of the codes' own type, which keeps the graph valid when weight codes are
    # stored as INT4 after export.
    return op.DequantizeLinear(codes, step, axis=axis)


ONNX_TRANSLATIONS = {
    torch.ops.mpsupernet.quantize.default: _quantize_onnx,
    torch.ops.mpsupernet.dequantize.default: _dequantize_onnx,
}
"""The `custom_translation_table` of `torch.onnx.export` for the ops above."""
