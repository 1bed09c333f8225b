"""The named choices of the command line's options, in a module that imports nothing.

The modules that act on them import them from here (`mpsupernet.export`, `mpsupernet.data`), and `mpsupernet.cli`
gives them to argparse as `choices`: `--help` lists them and a mistyped value is refused at once, without importing
torch or datasets.
"""

DATASET_SCHEMA_NAMES = ("standard", "coco", "semantic")
"""How a dataset may store its masks: the keys of `mpsupernet.data.DATASET_SCHEMAS` (which maps each to its adapter)."""
TASKS = ("promptable", "semantic")
"""What a supernet is trained for: masks for box and point prompts, or a class per pixel without prompts."""
EXPORT_TARGETS = ("onnxruntime", "openvino")
"""Runtimes an export is made for. Both read the same QDQ graph; the target decides the settings recorded for it."""
WEIGHT_CONTAINERS = ("int8", "int4")
"""How weight codes are stored: all in int8, or codes of at most 4 bits as INT4 (half the bytes, float compute)."""
