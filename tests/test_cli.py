"""The `mpsupernet` command: convert, extract, push, and its errors."""

import json

import pytest
import torch
from huggingface_hub import HfApi

from mpsupernet import SamSubnetForMaskGeneration, SamSupernetForMaskGeneration
from mpsupernet.cli import main
from mpsupernet.pretrained import load_embedded_sam


@pytest.fixture(scope="module")
def calibrated_supernet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("supernet")
    supernet = SamSupernetForMaskGeneration.from_sam(load_embedded_sam())
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    supernet.save_pretrained(folder)
    return folder


def test_convert_writes_a_loadable_supernet(tmp_path):
    assert main(["convert", "--sam", "embedded", "--output-dir", str(tmp_path), "--lora-mode", "shared"]) == 0
    supernet = SamSupernetForMaskGeneration.from_pretrained(tmp_path)
    assert supernet.config.lora_mode == "shared" and supernet.config.importance_reordered


def test_extract_writes_subnet_and_card(calibrated_supernet_dir, tmp_path, capsys):
    output = tmp_path / "tier"
    assert main(["extract", "--supernet", str(calibrated_supernet_dir), "--budget", "10%", "--output-dir", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out)
    subnet = SamSubnetForMaskGeneration.from_pretrained(output)
    assert summary["bitops"] == subnet.config.bitops <= 0.10 * summary["full_precision_bitops"]
    assert f"({subnet.config.bitops})" in (output / "README.md").read_text()


@pytest.mark.parametrize(
    "budget, message",
    [("abc", "abc"), ("0", "0"), ("-5", "-5"), ("0.05%", "the smallest reachable BitOPs is")],
)
def test_extract_rejects_bad_budgets_and_writes_nothing(calibrated_supernet_dir, tmp_path, capsys, budget, message):
    output = tmp_path / "tier"
    code = main(["extract", "--supernet", str(calibrated_supernet_dir), "--budget", budget, "--output-dir", str(output)])
    assert code == 2
    error = capsys.readouterr().err
    assert "mpsupernet extract: error:" in error and message in error
    assert not output.exists()


def test_push_publishes_tiers_to_the_hub(calibrated_supernet_dir, tmp_path, local_hub):
    for name, budget in (("s", "5%"), ("m", "10%")):
        assert main(
            ["extract", "--supernet", str(calibrated_supernet_dir), "--budget", budget, "--output-dir", str(tmp_path / name)]
        ) == 0
    code = main(
        ["push", "--repo-id", "local-user/cli-tiers", "--tier", f"s={tmp_path / 's'}", "--tier", f"m={tmp_path / 'm'}",
         "--mean-iou", "s=0.5"]
    )
    assert code == 0
    files = set(HfApi().list_repo_files("local-user/cli-tiers"))
    assert {"tiers.json", "s/model.safetensors", "m/model.safetensors", "m/README.md"} <= files
