"""The Python snippets of the README, of `docs/*.md` and of the model cards run as written.

A document's ```python blocks run in order, in one namespace, in a fresh interpreter (the README's alone; the docs
one after another, each in a new namespace, and likewise the cards): `import mpsupernet` must be a first import there, and `HF_ENDPOINT` (the local Hub of `conftest.py`, inherited through the environment) must be
set before huggingface_hub is imported. What the snippets name but cannot be reached here is replaced, and nothing
else: the quoted strings of `readme_id_map` (Hub ids of a SAM checkpoint, a dataset and a tiers repository, and the
folder of an ONNX export) become a shipped SAM's folder (`TEST_SAM`), a local COCO-style dataset, a repository of
the local Hub and an export of that SAM's subnet; cards are rendered for a repository of the local Hub, so their ids are
real; `image.jpg` and `photo.jpg` are images in the working directory.

A block preceded by `<!-- doc-test: not run, REASON -->` (one needing a GPU) does not run: the mpsupernet names it
uses are checked to exist, and the test reports it as skipped with REASON.
"""

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from pycocotools import mask as mask_utils

import mpsupernet
from conftest import TEST_SAM
from mpsupernet.data import make_synthetic_segmentation_dataset
from mpsupernet.hub import render_supernet_card, save_subnet_with_card
from mpsupernet.pretrained import SHIPPED_SAM_NAMES, load_sam, shipped_sam_path

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(?:<!-- doc-test: not run, (?P<reason>[^>]*?) -->\s*\n)?^(?P<indent>[ ]*)```python\n(?P<code>.*?)^(?P=indent)```",
    re.MULTILINE | re.DOTALL,
)


def python_blocks(markdown: str) -> list[tuple[str, str | None]]:
    """The ```python blocks of a Markdown text (dedented, as in list items), each with its not-run reason or None."""
    return [(textwrap.dedent(match["code"]), match["reason"]) for match in BLOCK.finditer(markdown)]


def run_documents(documents: list[list[str]], cwd: Path, id_map: dict[str, str] | None = None) -> str:
    """Runs each document's blocks in order in one namespace (a fresh one per document), all in one new interpreter;
    returns its output and fails on the first error."""
    script = "namespace = {}\n"
    for number, blocks in enumerate(documents):
        script += "namespace = {'__name__': '__main__'}\n"
        for index, code in enumerate(blocks):
            for original, replacement in (id_map or {}).items():
                code = code.replace(json.dumps(original), json.dumps(replacement))
            name = f"document {number}, block {index}"
            script += f"print({name!r}, flush=True)\nexec(compile({code!r}, {name!r}, 'exec'), namespace)\n"
    (cwd / "run_snippets.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_CACHE": str(cwd / "hub-cache")}
    process = subprocess.run(
        [sys.executable, "run_snippets.py"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert process.returncode == 0, f"A snippet failed:\n{process.stdout[-3000:]}\n{process.stderr[-5000:]}"
    return process.stdout


def mpsupernet_names(code: str) -> list[str]:
    """Dotted mpsupernet names a block uses: `from mpsupernet.x import y` and `mpsupernet.y` attributes."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpsupernet":
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mpsupernet":
            names.append(f"mpsupernet.{node.attr}")
    return names


def resolve(dotted: str):
    module_name, _, attribute = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def write_coco_split(path: Path, num_images: int, seed: int) -> None:
    """A COCO-style split (images, objects with compressed-RLE segmentations) as a parquet file."""
    synthetic = make_synthetic_segmentation_dataset(num_images, image_size=128, seed=seed)
    objects = [
        [
            {"segmentation": {"size": [128, 128], "counts": rle["counts"].decode()}, "iscrowd": 0}
            for rle in (mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8))) for mask in masks)
        ]
        for masks in synthetic["masks"]
    ]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": [
                {
                    "segmentation": {"size": [datasets.Value("int32")], "counts": datasets.Value("string")},
                    "iscrowd": datasets.Value("int32"),
                }
            ],
            "image_id": datasets.Value("int64"),
        }
    )
    rows = {"image": synthetic["image"], "objects": objects, "image_id": synthetic["image_id"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)


@pytest.fixture(scope="module")
def readme_id_map(tmp_path_factory):
    """What the README's Hub ids and folders stand for here: the folder of a SAM shipped in the package (`TEST_SAM`), a
    COCO-style folder that `datasets.load_dataset` reads, a repository of the local Hub, and an ONNX export of one of
    that SAM's subnets."""
    data = tmp_path_factory.mktemp("data")
    coco = data / "coco"
    write_coco_split(coco / "data" / "train-00000-of-00001.parquet", num_images=8, seed=0)
    write_coco_split(coco / "data" / "val-00000-of-00001.parquet", num_images=4, seed=1)
    supernet = mpsupernet.SamSupernetForMaskGeneration.from_sam(load_sam(TEST_SAM))
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    supernet.extract_subnet("5%").export_onnx(data / "onnx-tier", verify=False)
    return {
        "facebook/sam-vit-base": str(shipped_sam_path(TEST_SAM)),
        "detection-datasets/coco": str(coco),
        "my-org/sam-vit-base-mp": "local-user/readme-sam-vit-base-mp",
        "tier-5pct-onnx": str(data / "onnx-tier"),
    }


README_BLOCKS = python_blocks((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
# docs/semantic.md trains, searches and exports a semantic supernet: its own slow test runs it
# (tests/test_semantic_docs.py).
DOCS = sorted(path for path in (REPO_ROOT / "docs").glob("*.md") if path.name != "semantic.md")
DOCS_BLOCKS = {path.name: python_blocks(path.read_text(encoding="utf-8")) for path in DOCS}


def test_readme_python_blocks_run_as_written(tmp_path):
    runnable = [code for code, reason in README_BLOCKS if reason is None]
    assert len(runnable) == len(README_BLOCKS), "the README's quickstart runs on a CPU, every block of it"
    assert any("mpsupernet.load_subnet(" in code for code in runnable)
    run_documents([runnable], tmp_path, {"embedded-sam": TEST_SAM})  # the tests' shipped SAM, for speed
    assert (tmp_path / "tiers" / "tiers.json").is_file() and (tmp_path / "subnet-onnx" / "vision_encoder.onnx").is_file()


def test_docs_python_blocks_run_as_written(local_hub, readme_id_map, tmp_path):
    documents = [[code for code, reason in blocks if reason is None] for blocks in DOCS_BLOCKS.values()]
    assert sum(map(len, documents)) >= 3
    pixels = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg")  # the image the ONNX snippet opens
    output = run_documents(documents, tmp_path, readme_id_map)
    # Provenance: the supernet records the checkpoint it was made from (here the shipped SAM's folder name).
    assert TEST_SAM in output
    assert (tmp_path / "search" / "pareto_front.json").is_file()


NOT_RUN = [
    (name, code, reason)
    for name, blocks in {"README.md": README_BLOCKS, **DOCS_BLOCKS}.items()
    for code, reason in blocks
    if reason is not None
]


@pytest.mark.parametrize("document, code, reason", NOT_RUN, ids=lambda value: str(value)[:40])
def test_blocks_not_run_use_existing_names(document, code, reason):
    names = mpsupernet_names(code)
    assert names, "a block that is not run should still use mpsupernet"
    for name in names:
        resolve(name)
    pytest.skip(f"{document} block not run: {reason}")


def test_at_most_a_few_documentation_blocks_are_not_run():
    assert 0 < len(README_BLOCKS) and len(NOT_RUN) <= 2


@pytest.fixture(scope="module")
def published_tiers(local_hub):
    """Two tiers of the tiny SAM's supernet pushed to the local Hub with their ONNX exports (one at a reduced
    resolution), and the supernet."""
    from conftest import make_tiny_sam

    supernet = mpsupernet.SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128))
    space = supernet.search_space
    tiers = {"xs": mpsupernet.extract_subnet(supernet, space.smallest()), "m": supernet.extract_subnet("30%")}
    repo_id = "local-user/card-snippets"
    mpsupernet.push_tiers(tiers, repo_id, base_model="tiny-sam", dataset_name="synthetic", mean_ious={"xs": 0.5, "m": 0.6})
    return repo_id, tiers, supernet


def test_card_snippets_run_as_written(published_tiers, tmp_path):
    """The root card and both tier cards as the Hub serves them; a tier card and the supernet card written without a
    repository (their folders stand for `path/to/this/folder`)."""
    repo_id, tiers, supernet = published_tiers
    documents = []
    for card in ("README.md", "xs/README.md", "m/README.md"):
        text = Path(hf_hub_download(repo_id, card, cache_dir=tmp_path / "cache")).read_text(encoding="utf-8")
        blocks = python_blocks(text)
        assert blocks and all(reason is None for _, reason in blocks)
        assert any("mpsupernet.load_subnet(" in code for code, _ in blocks)
        # push_tiers exports every tier: each card runs its ONNX export with onnxruntime, up to the masks
        onnx_blocks = [code for code, _ in blocks if "OnnxSamModel.from_pretrained(" in code]
        assert len(onnx_blocks) == 1 and "model.post_process_masks(" in onnx_blocks[0]
        if card != "README.md":
            assert any('runtime="onnxruntime"' in code and "max_latency_ms=" in code for code, _ in blocks)
        documents.append([code for code, _ in blocks])
    folder = tmp_path / "tier"
    card = save_subnet_with_card(tiers["m"], folder, base_model="embedded-sam", dataset_name="synthetic")
    documents.append([code for code, _ in python_blocks(card.text)])
    supernet.save_pretrained(tmp_path / "supernet")
    card = render_supernet_card(supernet)
    documents.append([code.replace(json.dumps("path/to/this/folder"), json.dumps(str(tmp_path / "supernet")))
                      for code, _ in python_blocks(card.text)])
    pixels = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.jpg")
    output = run_documents(documents, tmp_path, {"path/to/this/folder": str(folder)})
    assert "document 4, block 0" in output and "'bitops': " in output.split("document 4, block 0")[1]


def test_shipped_sam_card_snippets_run_as_written(tmp_path):
    """The cards of the SAMs in `mpsupernet.pretrained`: each loads its model as written."""
    documents = []
    for name in SHIPPED_SAM_NAMES:
        blocks = python_blocks((shipped_sam_path(name) / "README.md").read_text(encoding="utf-8"))
        assert blocks and all(reason is None for _, reason in blocks)
        check = "print(type(sam).__name__, sam.config.vision_config.hidden_size)"
        documents.append([code for code, _ in blocks] + [check])
    output = run_documents(documents, tmp_path)
    for number, name in enumerate(SHIPPED_SAM_NAMES):
        hidden_size = load_sam(name).config.vision_config.hidden_size
        assert f"SamModel {hidden_size}" in output.split(f"document {number}, block")[-1]
