"""Model cards and Hub tiers, through the real huggingface_hub client and a local Hub server."""

import json

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

import mpsupernet
from mpsupernet.extraction import extract_subnet
from mpsupernet.bitops import format_budget
from mpsupernet.hub import load_subnet, push_tiers, render_subnet_card, render_tiers_card, save_tiers, select_tier

MEAN_IOUS = {"tiny": 0.61, "small": 0.70, "medium": 0.68}


@pytest.fixture(scope="module")
def tiers():
    from conftest import make_tiny_sam

    supernet = mpsupernet.SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128))
    space = supernet.search_space
    archs = {"tiny": space.smallest(), "small": space.largest(2, 4), "medium": space.largest(4, 8)}
    subnets = {name: extract_subnet(supernet, arch) for name, arch in archs.items()}
    assert len({subnet.config.bitops for subnet in subnets.values()}) == 3
    return subnets


def test_card_metadata_parses_and_states_the_bitops(tiers, tmp_path):
    subnet = tiers["small"]
    card = render_subnet_card(subnet, base_model="facebook/sam-vit-base", dataset_name="synthetic", mean_iou=0.7)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert data["pipeline_tag"] == "mask-generation"
    assert data["base_model"] == "facebook/sam-vit-base"
    assert data["bitops"] == subnet.config.bitops == subnet.bitops_report().total_bitops
    result = data["model-index"][0]["results"][0]
    assert result["metrics"][0]["type"] == "mean_iou" and result["metrics"][0]["value"] == 0.7
    report = subnet.bitops_report()
    assert f"({report.total_bitops})" in loaded.text
    assert f"{100 * report.summary()['share_of_w8a8']:.2f}%" in loaded.text
    for name in subnet.config.architecture["weight_bits"]:
        if not subnet.architecture.keeps_layer(name):
            continue
        assert f"`{name}`" in loaded.text


def test_push_three_tiers_and_download_by_budget(tiers, local_hub, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    repo_id = "local-user/sam-tiers"
    push_tiers(tiers, repo_id, base_model="facebook/sam-vit-base", dataset_name="synthetic", mean_ious=MEAN_IOUS)
    files = HfApi().list_repo_files(repo_id)
    assert {"tiers.json", "README.md"} <= set(files)
    for name in tiers:
        assert {f"{name}/config.json", f"{name}/model.safetensors", f"{name}/README.md", f"{name}/preprocessor_config.json"} <= set(
            files
        )

    bitops = {name: subnet.config.bitops for name, subnet in tiers.items()}
    # a budget that admits every tier picks the best mIoU ("small"), not the costliest
    cases = {max(bitops.values()): "small", bitops["small"]: "small", bitops["small"] - 1: "tiny", bitops["tiny"]: "tiny"}
    for budget, expected in cases.items():
        loaded = load_subnet(repo_id, max_bitops=budget, cache_dir=tmp_path / "cache")
        assert loaded.config.bitops == bitops[expected]
        reference = tiers[expected].state_dict()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, reference[key]), key
    with pytest.raises(ValueError, match=r"No tier fits under .*the cheapest tier, 'tiny', needs"):
        load_subnet(repo_id, max_bitops=bitops["tiny"] - 1)
    with pytest.raises(RepositoryNotFoundError):
        load_subnet("local-user/no-such-repo", max_bitops="5%")


def test_save_tiers_locally_and_load_by_budget(tiers, tmp_path):
    manifest = save_tiers(tiers, tmp_path / "tiers", base_model="facebook/sam-vit-base", dataset_name="synthetic")
    assert json.loads((tmp_path / "tiers" / "tiers.json").read_text()) == manifest
    assert list(manifest["tiers"]) == sorted(tiers, key=lambda name: tiers[name].config.bitops)
    loaded = load_subnet(tmp_path / "tiers", max_bitops="100%")
    assert loaded.config.bitops == tiers["medium"].config.bitops  # no mIoU measured: the costliest that fits


def test_bad_tiers_leave_nothing_behind(tiers, tmp_path, local_hub):
    target = tmp_path / "tiers"
    with pytest.raises(ValueError, match=r"Tier name 'a/b' is not a valid folder name"):
        save_tiers({"a/b": tiers["tiny"]}, target, base_model="x/y", dataset_name="d")
    with pytest.raises(ValueError, match=r"`mean_ious` names tiers \['huge'\]"):
        push_tiers(tiers, "local-user/never-made", base_model="x/y", dataset_name="d", mean_ious={"huge": 0.1})
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RepositoryNotFoundError):
        HfApi().list_repo_files("local-user/never-made")


def test_root_card_of_pushed_tiers_parses_with_every_tier_and_its_provenance(tiers, local_hub, tmp_path):
    repo_id = "local-user/sam-tiers-card"
    push_tiers(tiers, repo_id, base_model="facebook/sam-vit-base", dataset_name="synthetic", mean_ious=MEAN_IOUS)
    card = ModelCard.load(repo_id)
    assert card.data.license == "apache-2.0" and card.data.library_name == "mpsupernet"
    assert card.data.base_model == "facebook/sam-vit-base" and card.data.base_model_relation == "quantized"
    results = {result.metric_config: result for result in card.data.eval_results}
    assert {name: result.metric_value for name, result in results.items()} == MEAN_IOUS
    assert {result.dataset_name for result in results.values()} == {"synthetic"}
    table = {line.split("|")[1].strip(): line for line in card.text.splitlines() if line.startswith("| [`")}
    assert list(table) == [f"[`{name}`]({name}/README.md)" for name in ("tiny", "small", "medium")]
    manifest = json.loads(open(hf_hub_download(repo_id, "tiers.json", cache_dir=tmp_path)).read())
    for name, subnet in tiers.items():
        row = table[f"[`{name}`]({name}/README.md)"]
        assert f"| {subnet.config.bitops / 1e9:.3f} |" in row and f"| {MEAN_IOUS[name]:.4f} |" in row
        weights = HfApi().get_paths_info(repo_id, [f"{name}/model.safetensors"])[0].size
        assert f"| {weights / 1e6:.2f} MB |" in row
        if name == "medium":  # "small" costs less and measured better: no budget reaches "medium"
            assert "a cheaper tier measured better" in row
        else:
            budget = format_budget(subnet.config.bitops)
            assert f'`"{budget}"`' in row and select_tier(manifest, budget) == name
    assert "latency" not in card.text.split("## Tiers")[1].split("\n\n")[1]


def test_root_card_has_a_latency_column_only_with_measured_latencies(tiers, tmp_path):
    folder = tmp_path / "tiers"
    manifest = save_tiers(tiers, folder, base_model="facebook/sam-vit-base", dataset_name="synthetic")
    assert "latency" not in render_tiers_card(manifest, folder).text
    manifest["tiers"]["small"]["latency_ms"] = 12.34
    text = render_tiers_card(manifest, folder).text
    assert "| mean IoU | latency |" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| [`")}
    assert "| 12.3 ms |" in rows["[`small`](small/README.md)"] and "| – |" in rows["[`tiny`](tiny/README.md)"]
