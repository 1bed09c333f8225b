"""A semantic subnet exported to ONNX: the class decoder graph, the torch-free runtime, the class mIoU it keeps."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from mpsupernet import SamSemanticImageProcessor, SamSupernetForSemanticSegmentation
from mpsupernet.data import (
    SYNTHETIC_SEMANTIC_ID2LABEL,
    SemanticSegmentationPreprocessor,
    collate_fn,
    make_synthetic_semantic_dataset,
)
from mpsupernet.pretrained import load_sam
from mpsupernet.metrics import SemanticAreas

from conftest import TEST_SAM

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A W8A8 semantic subnet of the tests' SAM and its ONNX export: `(subnet, folder, report)`."""
    supernet = SamSupernetForSemanticSegmentation.from_sam(
        load_sam(TEST_SAM), id2label=SYNTHETIC_SEMANTIC_ID2LABEL
    ).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    subnet = supernet.extract_subnet(supernet.search_space.largest(8, 8)).eval()
    folder = tmp_path_factory.mktemp("semantic_export") / "w8a8"
    return subnet, folder, subnet.export_onnx(folder)


def test_export_writes_the_encoder_and_a_prompt_free_class_decoder(exported):
    import onnx

    _, folder, report = exported
    assert sorted(path.name for path in folder.iterdir()) == [
        "class_decoder.onnx", "config.json", "preprocessor_config.json", "vision_encoder.onnx",
    ]
    assert report.integer_matmul_nodes > 0 and report.mask_iou > 0.95
    decoder = onnx.load(folder / "class_decoder.onnx", load_external_data=False).graph
    assert [value.name for value in decoder.input] == ["image_embeddings"]
    assert [value.name for value in decoder.output] == ["logits"]
    assert SamSemanticImageProcessor.from_pretrained(folder).size["longest_edge"] == 128


def test_onnx_keeps_the_class_miou_of_pytorch_on_the_validation_split(exported):
    from mpsupernet.runtime_semantic import OnnxSamForSemanticSegmentation

    subnet, folder, _ = exported
    model = OnnxSamForSemanticSegmentation.from_pretrained(folder)
    preprocessor = SemanticSegmentationPreprocessor(subnet.config)
    validation = make_synthetic_semantic_dataset(8, seed=3).with_transform(preprocessor)
    batch = collate_fn([validation[index] for index in range(len(validation))])
    scores = {}
    for name, logits in (
        ("pytorch", subnet(pixel_values=batch["pixel_values"]).logits.detach()),
        ("onnx", torch.from_numpy(model(pixel_values=batch["pixel_values"].numpy()).logits)),
    ):
        logits = torch.nn.functional.interpolate(logits, size=batch["labels"].shape[-2:], mode="bilinear")
        metric = SemanticAreas(subnet.config.num_labels)
        metric.update(logits.argmax(dim=1).numpy(), batch["labels"].numpy())
        scores[name] = metric.compute()["mean_iou"]
    assert abs(scores["onnx"] - scores["pytorch"]) <= 0.005
    with pytest.raises(ValueError, match=r"without prompts, but got \['input_boxes'\]"):
        model(pixel_values=batch["pixel_values"][:1].numpy(), input_boxes=np.zeros((1, 1, 4), np.float32))


NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # `import torch` raises ImportError from here on
    import numpy as np
    from PIL import Image
    from mpsupernet.runtime_semantic import OnnxSamForSemanticSegmentation

    folder, image_path, output = sys.argv[1:]
    model = OnnxSamForSemanticSegmentation.from_pretrained(folder)
    inputs = model.preprocess(Image.open(image_path))
    outputs = model(**inputs)
    class_map = model.post_process_semantic_segmentation(outputs.logits, inputs["original_sizes"])[0]
    names = sorted({model.id2label[int(c)] for c in np.unique(class_map)})
    np.savez(output, class_map=class_map, names=np.asarray(names))
    """
)


def test_a_process_without_torch_gets_class_maps_at_the_image_size(exported, tmp_path):
    subnet, folder, _ = exported
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(folder), str(tmp_path / "image.png"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    saved = np.load(tmp_path / "out.npz")
    assert saved["class_map"].shape == (90, 150)
    # The same map from the PyTorch subnet and transformers-style post-processing.
    processor = SamSemanticImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = subnet(**processor(image, return_tensors="pt"))
    reference = processor.post_process_semantic_segmentation(outputs, target_sizes=[(90, 150)])[0].numpy()
    assert (saved["class_map"] == reference).mean() >= 0.99
    assert list(saved["names"]) == sorted({SYNTHETIC_SEMANTIC_ID2LABEL[int(c)] for c in np.unique(saved["class_map"])})


def test_the_promptable_runtime_refuses_a_semantic_export(exported):
    from mpsupernet.runtime import OnnxSamModel

    with pytest.raises(ValueError, match=r"holds an export of a `sam_semantic_subnet`.*OnnxSamForSemanticSegmentation"):
        OnnxSamModel.from_pretrained(exported[1])
