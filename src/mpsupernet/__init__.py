"""mpsupernet: mixed-precision quantized supernets from the Segment Anything Model, fine-tuned with LoRA."""

__version__ = "0.1.0.dev0"
