import os
from local_hub import free_port  # tests/ is on sys.path for pytest (rootdir conftest)
HUB_PORT = free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ.setdefault("HF_TOKEN", "hf_local_test_token")
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest  # noqa: E402

from local_hub import LocalHubServer  # noqa: E402


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A `LocalHubServer` on `HF_ENDPOINT` for the whole test session."""
    with LocalHubServer(tmp_path_factory.mktemp("hub"), port=HUB_PORT) as hub:
        yield hub


import torch  # noqa: E402
from transformers import SamModel  # noqa: E402

from mpsupernet import SamSupernetForMaskGeneration  # noqa: E402
from mpsupernet.testing_utils import make_sam_config  # noqa: E402


def make_tiny_sam(seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs) -> SamModel:
    """A tiny random SAM whose outputs are of order 0.1-1, so that a tolerance of 1e-5 means something.

    SAM's own initialisation gives mask logits of order 1e-3; every weight is perturbed to make them larger.
    `config_kwargs` go to `make_sam_config` (e.g. `hidden_size=128` for a SAM whose encoder dominates its size).
    """
    torch.manual_seed(seed)
    sam = SamModel(make_sam_config(attn_implementation=attn_implementation, **config_kwargs)).eval()
    with torch.no_grad():
        for parameter in sam.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return sam


def run(model, inputs, **kwargs):
    """A forward pass without autograd."""
    with torch.no_grad():
        return model(**inputs, **kwargs)


def assert_same_output(reference, candidate, atol=1e-5):
    """SAM outputs agree within `atol`, on outputs large enough for that tolerance to mean something."""
    assert reference.pred_masks.abs().mean() > 0.05, "outputs too small for the tolerance to mean anything"
    torch.testing.assert_close(candidate.pred_masks, reference.pred_masks, atol=atol, rtol=0)
    torch.testing.assert_close(candidate.iou_scores, reference.iou_scores, atol=atol, rtol=0)


@pytest.fixture
def tiny_sam():
    return make_tiny_sam()


@pytest.fixture
def tiny_supernet(tiny_sam):
    return SamSupernetForMaskGeneration.from_sam(tiny_sam).eval()


@pytest.fixture
def prompt_inputs():
    """Two 128x128 images, each with one box and one two-point prompt."""
    generator = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(2, 3, 128, 128, generator=generator),
        "input_points": torch.rand(2, 1, 2, 2, generator=generator) * 128,
        "input_labels": torch.tensor([[[1, 0]], [[1, 1]]]),
        "input_boxes": torch.tensor([[[10.0, 12.0, 90.0, 100.0]], [[30.0, 5.0, 120.0, 64.0]]]),
    }


TEST_SAM = "shapes-sam"
"""The shipped SAM of the tests that need a pretrained one but not the default: the tiny one pretrained on synthetic
shapes runs several times faster than the default distilled from LiteMedSAM (whose own tests name it)."""


def calibrated_embedded_supernet() -> SamSupernetForMaskGeneration:
    """The supernet of the tests' shipped SAM (`TEST_SAM`), its activation steps calibrated at every bit-width on one
    batch."""
    from mpsupernet.pretrained import load_sam

    supernet = SamSupernetForMaskGeneration.from_sam(load_sam(TEST_SAM)).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    return supernet


@pytest.fixture(scope="session")
def embedded_supernet():
    return calibrated_embedded_supernet()


@pytest.fixture(scope="session")
def exported_w8a8(embedded_supernet, tmp_path_factory):
    """A W8A8 subnet of the embedded SAM, exported to ONNX: `(subnet, folder, report)`."""
    pytest.importorskip("onnxruntime")
    from mpsupernet.extraction import extract_subnet

    subnet = extract_subnet(embedded_supernet, embedded_supernet.search_space.largest(8, 8)).eval()
    folder = tmp_path_factory.mktemp("export") / "w8a8"
    report = subnet.export_onnx(folder)
    return subnet, folder, report


def drop_weights_digest(folder):
    """Removes the weights digests from a saved model's config.json, as in a save by an older mpsupernet."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    del config["weights_sha256"]
    path.write_text(json.dumps(config))
