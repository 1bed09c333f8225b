"""ONNX export of extracted subnets: QDQ image encoder on integer kernels, float prompt encoder + mask decoder.

`export_onnx(subnet, folder)` (or `subnet.export_onnx(folder)`) writes the files; `mpsupernet.runtime.OnnxSamModel`
runs them without PyTorch. Modules: `ops` (the quantizer as custom ops and their ONNX form), `graphs` (the exported
graphs), `writer` (files, checks, report).
"""

from .writer import (
    EXPORT_TARGETS,
    INTEGER_MATMUL_OPS,
    WEIGHT_CONTAINERS,
    OnnxExportReport,
    add_onnx_export,
    count_integer_matmuls,
    export_onnx,
)

__all__ = [
    "EXPORT_TARGETS",
    "INTEGER_MATMUL_OPS",
    "WEIGHT_CONTAINERS",
    "OnnxExportReport",
    "add_onnx_export",
    "count_integer_matmuls",
    "export_onnx",
]
