"""The quantizer as export ops: `torch.library` custom ops with the PyTorch subnet's arithmetic, and their ONNX form.

`quantize` gives the integer codes of an `LsqQuantizer` (`clamp(round(x / step), q_min, q_max)`, ties to even, as
`torch.round`) plus an integer zero point; `dequantize` gives `(codes - zero_point) * step` (per tensor, or per channel
along `axis`). Exported with `torch.onnx.export(..., dynamo=True, custom_translation_table=ONNX_TRANSLATIONS)`, they
become `QuantizeLinear` followed, when the grid is narrower than its 8-bit container, by an integer `Clip` ("QCDQ", as
Brevitas exports bit-widths that ONNX cannot name), and `DequantizeLinear`. An LSQ+ offset is not a zero point (ONNX
needs an integer one; a learned offset is any float): callers subtract it before `quantize` and fold it into what
follows (see `mpsupernet.export.graphs`).
"""

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset21 as op


def container_dtype(low: int) -> torch.dtype:
    """The 8-bit container of codes whose smallest value is `low`: `uint8` if it is not negative, else `int8`."""
    return torch.uint8 if low >= 0 else torch.int8


@torch.library.custom_op("mpsupernet::quantize", mutates_args=())
def quantize(x: torch.Tensor, step: torch.Tensor, q_min: int, q_max: int, zero_point: int) -> torch.Tensor:
    """Codes `clamp(round(x / step), q_min, q_max) + zero_point` of a per-tensor `step` (0-d), in an 8-bit container.

    A signed grid shifted by `zero_point = 2^(b-1)` holds the same values in a `uint8` container, which onnxruntime
    multiplies in more of its integer kernels than signed x signed pairs.
    """
    codes = torch.clamp(torch.round(x / step), q_min, q_max) + zero_point
    return codes.to(container_dtype(q_min + zero_point))


@quantize.register_fake
def _(x, step, q_min, q_max, zero_point):
    return torch.empty_like(x, dtype=container_dtype(q_min + zero_point))


@torch.library.custom_op("mpsupernet::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, step: torch.Tensor, axis: int, zero_point: int) -> torch.Tensor:
    """`(codes - zero_point) * step` in float32: `step` is 0-d (per tensor) or 1-d, one value per index of `codes`
    along `axis`."""
    if step.dim() == 1:
        shape = [1] * codes.dim()
        shape[axis] = -1
        step = step.reshape(shape)
    return (codes.to(torch.float32) - zero_point) * step


@dequantize.register_fake
def _(codes, step, axis, zero_point):
    return torch.empty_like(codes, dtype=torch.float32)


def _constant(value: int, dtype):
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))


def _quantize_onnx(x, step, q_min: int, q_max: int, zero_point: int):
    dtype = np.uint8 if q_min + zero_point >= 0 else np.int8
    codes = op.QuantizeLinear(x, step, _constant(zero_point, dtype))
    low, high = q_min + zero_point, q_max + zero_point
    if (low, high) == (np.iinfo(dtype).min, np.iinfo(dtype).max):
        return codes
    return op.Clip(codes, _constant(low, dtype), _constant(high, dtype))


def _dequantize_onnx(codes, step, axis: int, zero_point: int):
    if zero_point == 0:
        # No zero point: it defaults to 0 of the codes' own type, which keeps the graph valid when weight codes are
        # stored as INT4 after export.
        return op.DequantizeLinear(codes, step, axis=axis)
    return op.DequantizeLinear(codes, step, _constant(zero_point, np.uint8 if zero_point > 0 else np.int8), axis=axis)


ONNX_TRANSLATIONS = {
    torch.ops.mpsupernet.quantize.default: _quantize_onnx,
    torch.ops.mpsupernet.dequantize.default: _dequantize_onnx,
}
"""The `custom_translation_table` of `torch.onnx.export` for the ops above."""
