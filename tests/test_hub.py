"""Model cards and Hub tiers, through the real huggingface_hub client and a local Hub server."""

import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

import mpsupernet
from mpsupernet import SamSubnetForMaskGeneration
from mpsupernet.bitops import parse_budget
from mpsupernet.extraction import extract_subnet
from mpsupernet.bitops import format_budget
from mpsupernet.hub import (
    describe_latency_measurement,
    load_subnet,
    push_tiers,
    render_subnet_card,
    render_tiers_card,
    save_subnet_with_card,
    save_tiers,
    select_tier,
)

from local_hub import Fault

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
    push_tiers(tiers, repo_id, base_model="facebook/sam-vit-base", dataset_name="synthetic", mean_ious=MEAN_IOUS, export_onnx=False)
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
    with pytest.raises(FileNotFoundError, match=r"'local-user/no-such-repo' is no folder here, nor a Hub repository "
                       r"that exists .*; give the folder written by `save_tiers` or the Hub repository") as caught:
        load_subnet("local-user/no-such-repo", max_bitops="5%")
    assert isinstance(caught.value.__cause__, RepositoryNotFoundError)


def test_save_tiers_locally_and_load_by_budget(tiers, tmp_path):
    manifest = save_tiers(tiers, tmp_path / "tiers", base_model="facebook/sam-vit-base", dataset_name="synthetic", export_onnx=False)
    assert json.loads((tmp_path / "tiers" / "tiers.json").read_text()) == manifest
    assert list(manifest["tiers"]) == sorted(tiers, key=lambda name: tiers[name].config.bitops)
    loaded = load_subnet(tmp_path / "tiers", max_bitops="100%")
    assert loaded.config.bitops == tiers["medium"].config.bitops  # no mIoU measured: the costliest that fits


def test_bad_tiers_leave_nothing_behind(tiers, tmp_path, local_hub):
    target = tmp_path / "tiers"
    with pytest.raises(ValueError, match=r"Tier name 'a/b' is not a valid folder name"):
        save_tiers({"a/b": tiers["tiny"]}, target, base_model="x/y", dataset_name="d", export_onnx=False)
    with pytest.raises(ValueError, match=r"`mean_ious` names tiers \['huge'\]"):
        push_tiers(tiers, "local-user/never-made", base_model="x/y", dataset_name="d", mean_ious={"huge": 0.1}, export_onnx=False)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RepositoryNotFoundError):
        HfApi().list_repo_files("local-user/never-made")


# --- save_tiers: what it may delete, and crash safety ------------------------------------------------------------------
def _tier_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_save_tiers_refuses_a_folder_that_is_not_a_tiers_folder_and_deletes_nothing(tiers, tmp_path, monkeypatch):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    message = r"'.*mine' is not empty and holds no tiers.json, so it is not a tiers folder; .* never deletes files"
    with pytest.raises(ValueError, match=message):
        save_tiers({"tiny": tiers["tiny"]}, target, base_model="x/y", dataset_name="d", export_onnx=False)
    assert _tier_files(target) == ["notes.txt"]
    monkeypatch.chdir(target)
    with pytest.raises(ValueError, match=r"'\.' is not empty and holds no tiers.json"):
        save_tiers({"tiny": tiers["tiny"]}, ".", base_model="x/y", dataset_name="d", export_onnx=False)
    assert _tier_files(target) == ["notes.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_save_tiers_over_earlier_tiers_replaces_only_its_own(tiers, tmp_path):
    target = tmp_path / "tiers"
    save_tiers({"a": tiers["tiny"], "b": tiers["small"]}, target, base_model="x/y", dataset_name="d", export_onnx=False)
    assert (target / "a" / "config.json").is_file()
    (target / "notes.txt").write_text("keep me")
    (target / "_v7").mkdir()  # a generation folder a killed write left: no manifest names it
    (target / "_v7" / "config.json").write_text("{}")
    manifest = save_tiers({"b": tiers["medium"], "c": tiers["tiny"]}, target, base_model="x/y", dataset_name="d", export_onnx=False)
    assert {name: tier["subfolder"] for name, tier in manifest["tiers"].items()} == {"c": "_v8/c", "b": "_v8/b"}
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "_v8", "notes.txt", "tiers.json"]
    assert load_subnet(target, max_bitops="100%").config.bitops == tiers["medium"].config.bitops
    # the third write goes to a new generation and removes the second
    save_tiers({"a": tiers["small"]}, target, base_model="x/y", dataset_name="d", export_onnx=False)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "_v9", "notes.txt", "tiers.json"]


def test_tiers_folder_is_as_readable_as_a_new_folder(tiers, tmp_path):
    previous = os.umask(0o022)
    try:
        save_tiers({"a": tiers["tiny"]}, tmp_path / "tiers", base_model="x/y", dataset_name="d", export_onnx=False)
    finally:
        os.umask(previous)
    for path in [tmp_path / "tiers", tmp_path / "tiers" / "a"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in (tmp_path / "tiers").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.parametrize(
    "name, message",
    [
        ("tiers.json", r"Tier name 'tiers.json' is reserved for a file of the tiers repository"),
        ("README.md", r"Tier name 'README.md' is reserved"),
        ("a" * 300, r"Tier name 'aaaaaaaaaaaaaaaaaaaa'\.\.\. has 300 characters; use at most 96\."),
        ("_v2", r"Tier name '_v2' is not a valid folder name"),
    ],
)
def test_bad_tier_names_are_refused_clearly(tiers, tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        save_tiers({name: tiers["tiny"]}, tmp_path / "tiers", base_model="x/y", dataset_name="d", export_onnx=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.5, -0.1, "0.7"])
def test_a_mean_iou_that_is_not_in_0_1_is_never_written(tiers, tmp_path, value):
    with pytest.raises(ValueError, match=r"The mean IoU of tier 'tiny' is .*; give a finite number in \[0, 1\]"):
        save_tiers({"tiny": tiers["tiny"]}, tmp_path / "tiers", base_model="x/y", dataset_name="d", mean_ious={"tiny": value}, export_onnx=False)
    with pytest.raises(ValueError, match=r"The mean IoU of the subnet is .*; give a finite number in \[0, 1\]"):
        save_subnet_with_card(tiers["tiny"], tmp_path / "one", base_model="x/y", dataset_name="d", mean_iou=value)
    assert list(tmp_path.iterdir()) == []


def test_a_mean_iou_without_a_dataset_is_refused_before_any_export(tiers, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a tier was exported before the arguments were checked")

    monkeypatch.setattr(mpsupernet.hub.save, "export_and_measure_tier", never)
    message = r"`mean_ious` gives tiers \['small', 'tiny'\] a mean IoU but no dataset it was measured on: give `dataset_name`"
    with pytest.raises(ValueError, match=message):
        save_tiers(tiers, tmp_path / "tiers", base_model="x/y", mean_ious={"tiny": 0.5, "small": 0.6, "medium": None})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("not_a_mapping", [[], ("tiny",)])
def test_tiers_that_are_not_a_mapping_are_refused_by_type(tiers, tmp_path, not_a_mapping):
    with pytest.raises(TypeError, match=r"`tiers` must map tier names to subnets, such as \{'s': subnet\}; got a (list|tuple)\."):
        save_tiers(not_a_mapping, tmp_path / "tiers", base_model="x/y", dataset_name="d", export_onnx=False)
    assert list(tmp_path.iterdir()) == []


def test_load_subnet_names_a_path_that_is_no_tiers_folder(tiers, tmp_path, monkeypatch):
    save_tiers(tiers, tmp_path / "tiers", base_model="x/y", dataset_name="d", export_onnx=False)
    monkeypatch.chdir(tmp_path)
    cases = [
        ("./no-such-folder", r"'\./no-such-folder' is no folder here, nor a Hub repository id \('namespace/name'\); give "
         r"the folder written by `save_tiers` or the Hub repository written by `push_tiers`\."),
        (tmp_path / "missing", rf"'{re.escape(str(tmp_path / 'missing'))}' is no folder here; give the folder"),
        ("tiers/tiers.json", r"'tiers/tiers.json' is a file, not a folder; give the folder written by `save_tiers`"),
        ("tiers/tiny", r"'tiers/tiny' has no tiers.json, so it is not a tiers folder written by `save_tiers` or "
         r"`push_tiers` \(the folder of one subnet loads with `SamSubnetForMaskGeneration.from_pretrained`\)\."),
    ]
    for path, message in cases:
        with pytest.raises(FileNotFoundError, match=message):
            load_subnet(path, max_bitops="100%")


@pytest.mark.parametrize(
    "repo_id, error, message",
    [
        ("bad repo id!", ValueError, r"^`repo_id` 'bad repo id!' is not a Hub repository id \('namespace/name'\): "),
        ("a/b/c", ValueError, r"^`repo_id` 'a/b/c' is not a Hub repository id"),
        (None, TypeError, r"^`repo_id` must be a Hub repository id such as 'my-org/sam-mp'; got None\.$"),
    ],
)
def test_push_tiers_refuses_a_bad_repo_id_before_exporting(tiers, monkeypatch, repo_id, error, message):
    def never(*args, **kwargs):
        raise AssertionError("a tier was exported before the repository id was checked")

    monkeypatch.setattr(mpsupernet.hub.save, "export_and_measure_tier", never)
    with pytest.raises(error, match=message):
        push_tiers(tiers, repo_id, base_model="x/y", dataset_name="d")


def test_a_nan_mean_iou_is_never_preferred():
    manifest = {
        "full_precision_bitops": 100,
        "tiers": {"nan": {"bitops": 10, "mean_iou": float("nan")}, "good": {"bitops": 20, "mean_iou": 0.1}},
    }
    assert select_tier(manifest, 50) == "good"


@pytest.mark.parametrize("budget", [np.int64, np.float64, torch.tensor, lambda v: torch.tensor(float(v)), np.array])
def test_numpy_and_tensor_budgets_are_numbers(tiers, tmp_path, budget):
    save_tiers(tiers, tmp_path / "tiers", base_model="x/y", dataset_name="d", export_onnx=False)
    small = tiers["small"].config.bitops
    assert parse_budget(budget(small)) == small
    assert load_subnet(tmp_path / "tiers", max_bitops=budget(small)).config.bitops == small


# --- tiers.json: version, schema, confinement ---------------------------------------------------------------------------
def _damage_manifest(folder, change):
    path = folder / "tiers.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=3), r"has format_version 3, newer than this mpsupernet reads \(2\); upgrade"),
        (lambda m: m.update(format_version=0), r"field `format_version`: 0 is not a format version"),
        (lambda m: m.pop("full_precision_bitops"), r"field `full_precision_bitops`: Field required"),
        (lambda m: m["tiers"]["tiny"].update(bitops="many"), r"field `tiers.tiny.bitops`: Input should be a valid integer"),
        (lambda m: m["tiers"]["tiny"].update(subfolder="../x"), r"field `tiers.tiny.subfolder`: Value error, '\.\./x' is not a relative path inside"),
        (lambda m: m["tiers"]["tiny"].update(subfolder="/etc"), r"field `tiers.tiny.subfolder`: Value error, '/etc' is not a relative path"),
        (lambda m: m["tiers"]["tiny"].update(mean_iou=float("nan")), r"field `tiers.tiny.mean_iou`: Input should be a finite number"),
        (lambda m: m.update(tiers={}), r"field `tiers`: Dictionary should have at least 1 item"),
        (lambda m: m.update(tiers=[]), r"field `tiers`: Input should be a valid dictionary"),
    ],
)
def test_invalid_manifests_name_the_repo_file_and_field(tiers, tmp_path, change, message):
    folder = tmp_path / "tiers"
    save_tiers({"tiny": tiers["tiny"]}, folder, base_model="x/y", dataset_name="d", export_onnx=False)
    _damage_manifest(folder, change)
    with pytest.raises(ValueError, match=r"tiers.json of '.*tiers' .*" + message):
        load_subnet(folder, max_bitops="100%")


def test_manifest_that_is_not_json_or_an_object_is_named(tiers, tmp_path):
    folder = tmp_path / "tiers"
    save_tiers({"tiny": tiers["tiny"]}, folder, base_model="x/y", dataset_name="d", export_onnx=False)
    (folder / "tiers.json").write_text('{"tiers": ')
    with pytest.raises(ValueError, match=r"tiers.json of '.*tiers' is not valid JSON: Expecting value: line 1"):
        load_subnet(folder, max_bitops="100%")
    (folder / "tiers.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tiers.json of '.*tiers' is not a valid tiers manifest: it holds a list"):
        load_subnet(folder, max_bitops="100%")


def test_a_manifest_without_a_format_version_is_the_first_format(tiers, tmp_path):
    folder = tmp_path / "tiers"
    save_tiers({"tiny": tiers["tiny"]}, folder, base_model="x/y", dataset_name="d", export_onnx=False)
    _damage_manifest(folder, lambda m: m.pop("format_version"))
    assert load_subnet(folder, max_bitops="100%").config.bitops == tiers["tiny"].config.bitops


def test_a_format_1_manifest_without_bytes_or_latency_is_read(tiers, tmp_path):
    from mpsupernet.hub import read_tiers_manifest

    def to_format_1(manifest):
        manifest["format_version"] = 1
        for entry in manifest["tiers"].values():
            for key in ("file_bytes", "latency_ms", "latency_measurement"):
                del entry[key]

    folder = tmp_path / "tiers"
    save_tiers({"tiny": tiers["tiny"]}, folder, base_model="x/y", dataset_name="d", export_onnx=False)
    _damage_manifest(folder, to_format_1)
    manifest = read_tiers_manifest(folder)
    assert manifest["format_version"] == 1 and manifest["tiers"]["tiny"]["latency_ms"] is None
    assert load_subnet(folder, max_bitops="100%").config.bitops == tiers["tiny"].config.bitops
    with pytest.raises(ValueError, match=r"No tier has a published latency"):
        load_subnet(folder, max_latency_ms=5)


def test_a_tier_linked_outside_the_folder_or_missing_is_refused(tiers, tmp_path):
    folder = tmp_path / "tiers"
    save_tiers({"tiny": tiers["tiny"]}, folder, base_model="x/y", dataset_name="d", export_onnx=False)
    tiers["small"].save_pretrained(tmp_path / "elsewhere")
    (folder / "link").symlink_to(tmp_path / "elsewhere")
    _damage_manifest(folder, lambda m: m["tiers"]["tiny"].update(subfolder="link"))
    with pytest.raises(ValueError, match=r"Tier 'tiny' of tiers.json in '.*tiers' points outside it: 'link'\."):
        load_subnet(folder, max_bitops="100%")
    _damage_manifest(folder, lambda m: m["tiers"]["tiny"].update(subfolder="gone"))
    with pytest.raises(FileNotFoundError, match=r"Tier 'tiny' of tiers.json in '.*tiers' names the subfolder 'gone', which holds no subnet"):
        load_subnet(folder, max_bitops="100%")


def test_a_tier_over_its_manifest_entry_is_refused(tiers, tmp_path):
    folder = tmp_path / "tiers"
    save_tiers({"x": tiers["medium"]}, folder, base_model="x/y", dataset_name="d", export_onnx=False)
    tiny = tiers["tiny"].config.bitops
    _damage_manifest(folder, lambda m: m["tiers"]["x"].update(bitops=tiny))
    with pytest.raises(ValueError, match=rf"Tier 'x' of '.*tiers' loaded as a subnet of {tiers['medium'].config.bitops} BitOPs, over the budget {tiny} \({tiny} BitOPs\), although tiers.json lists it at {tiny}"):
        load_subnet(folder, max_bitops=tiny)


# --- the Hub: one commit per push, one commit per load, faults midway ------------------------------------------------
def _repo_state(repo_id):
    api = HfApi()
    return api.repo_info(repo_id).sha, sorted(api.list_repo_files(repo_id))


def test_push_over_earlier_tiers_removes_their_files_in_the_same_commit(tiers, local_hub, tmp_path):
    repo_id = "local-user/replaced-tiers"
    push_tiers({"a": tiers["tiny"], "b": tiers["small"]}, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    HfApi().upload_file(path_or_fileobj=b"mine", path_in_repo="notes/keep.txt", repo_id=repo_id)
    # a file of tier "b" that its next version no longer has (as a sharded save's shard would be)
    HfApi().upload_file(path_or_fileobj=b"old shard", path_in_repo="b/model-00001-of-00002.safetensors", repo_id=repo_id)
    before = len(HfApi().list_repo_commits(repo_id))
    push_tiers({"b": tiers["medium"], "c": tiers["tiny"]}, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    files = HfApi().list_repo_files(repo_id)
    assert not any(path.startswith("a/") for path in files) and "b/model-00001-of-00002.safetensors" not in files
    assert {"b/config.json", "c/config.json", "notes/keep.txt", "tiers.json"} <= set(files)
    assert len(HfApi().list_repo_commits(repo_id)) == before + 1


PUSH_FAILURES = {"error": (HfHubHTTPError, "Injected fault on POST /api/models/local-user/"), "drop": (Exception, "Server disconnected without sending a response")}


def _push_failing_mid_commit(local_hub, action, tiers, repo_id):
    error, message = PUSH_FAILURES[action]
    local_hub.inject_fault(Fault(r"/commit/", action, method="POST", times=5))
    try:
        with pytest.raises(error, match=message):
            push_tiers(tiers, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    finally:
        local_hub.clear_faults()


@pytest.mark.parametrize("action", ["error", "drop"])
def test_a_push_failing_mid_commit_leaves_the_repo_as_it_was(tiers, local_hub, action):
    repo_id = f"local-user/failing-first-push-{action}"
    _push_failing_mid_commit(local_hub, action, {"a": tiers["tiny"]}, repo_id)
    assert not HfApi().repo_exists(repo_id)  # the repository this push created is gone again

    repo_id = f"local-user/failing-second-push-{action}"
    push_tiers({"a": tiers["tiny"]}, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    before = _repo_state(repo_id)
    _push_failing_mid_commit(local_hub, action, {"b": tiers["small"]}, repo_id)
    assert _repo_state(repo_id) == before


def test_load_subnet_reads_manifest_and_weights_at_one_commit(tiers, local_hub, tmp_path, monkeypatch):
    repo_id = "local-user/moving-tiers"
    push_tiers({"x": tiers["tiny"]}, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    old = HfApi().repo_info(repo_id).sha
    push_tiers({"x": tiers["medium"]}, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    new = HfApi().repo_info(repo_id).sha
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))

    def set_main(commit):
        return lambda store: store._set_refs("model", repo_id, lambda refs: refs["branches"].__setitem__("main", commit))

    set_main(old)(local_hub.store)
    # a push lands right after the client has read tiers.json
    fault = local_hub.inject_fault(Fault(r"/resolve/.*/tiers\.json", "after", method="GET", callback=set_main(new)))
    budget = tiers["tiny"].config.bitops
    try:
        loaded = load_subnet(repo_id, max_bitops=budget, cache_dir=tmp_path / "cache")
    finally:
        local_hub.clear_faults()
    assert fault.times == 0 and HfApi().repo_info(repo_id).sha == new
    assert loaded.config.bitops == budget
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, tiers["tiny"].state_dict()[key]), key


@pytest.mark.parametrize(
    "path, error",
    [
        (r"model\.safetensors", r"Could not load tier 'small' \(subfolder 'small'\) of '.*' at commit [0-9a-f]{40}: Can't load the model"),
        pytest.param(
            r"small/config\.json",
            r"Could not load tier 'small' \(subfolder 'small'\) of .*: Can't load the configuration",
            marks=pytest.mark.slow,  # the client's retries back off for seconds
        ),
        (r"tiers\.json", r"peer closed connection without sending complete message body"),
    ],
)
def test_load_subnet_under_downloads_breaking_off_is_right_or_refused(tiers, local_hub, tmp_path, monkeypatch, path, error):
    repo_id = "local-user/broken-downloads-" + path.split("\\")[0].replace("/", "-")
    push_tiers({"small": tiers["small"]}, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    budget = tiers["small"].config.bitops
    for times in (1, 50):  # once: the client resumes the download; every time: it gives up
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / f"cache-{times}"))
        local_hub.inject_fault(Fault(rf"/resolve/.*{path}", "truncate", method="GET", times=times))
        try:
            if times == 1:
                loaded = load_subnet(repo_id, max_bitops=budget, cache_dir=tmp_path / f"cache-{times}")
                assert loaded.config.bitops == budget
                for key, value in loaded.state_dict().items():
                    assert torch.equal(value, tiers["small"].state_dict()[key]), key
            else:
                with pytest.raises(Exception, match=error):
                    load_subnet(repo_id, max_bitops=budget, cache_dir=tmp_path / f"cache-{times}")
        finally:
            local_hub.clear_faults()


def test_a_missing_tier_folder_on_the_hub_names_the_tier(tiers, local_hub, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    repo_id = "local-user/missing-tier-folder"
    push_tiers({"x": tiers["tiny"]}, repo_id, base_model="x/y", dataset_name="d", export_onnx=False)
    HfApi().delete_folder("x", repo_id=repo_id)
    with pytest.raises(OSError, match=r"Could not load tier 'x' \(subfolder 'x'\) of 'local-user/missing-tier-folder' at commit [0-9a-f]{40}: "):
        load_subnet(repo_id, max_bitops="100%", cache_dir=tmp_path / "cache")


def test_a_hub_model_whose_config_and_weights_come_from_two_saves_is_refused(tiers, local_hub, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    repo_id = "local-user/two-saves"
    subnet = tiers["small"]
    subnet.save_pretrained(tmp_path / "first", push_to_hub=True, repo_id=repo_id)
    assert {"config.json", "model.safetensors"} <= set(HfApi().list_repo_files(repo_id))
    loaded = SamSubnetForMaskGeneration.from_pretrained(repo_id)
    assert loaded.config.bitops == subnet.config.bitops and not hasattr(loaded.config, "weights_sha256")
    changed = SamSubnetForMaskGeneration.from_pretrained(tmp_path / "first")
    with torch.no_grad():
        next(p for n, p in changed.named_parameters() if n.endswith("input_quantizer.step_size")).mul_(2)
    changed.save_pretrained(tmp_path / "second")
    HfApi().upload_file(path_or_fileobj=tmp_path / "second" / "config.json", path_in_repo="config.json", repo_id=repo_id)
    with pytest.raises(OSError, match=r"The weights of 'local-user/two-saves' do not match its config: config.json records sha256"):
        SamSubnetForMaskGeneration.from_pretrained(repo_id)


def test_root_card_of_pushed_tiers_parses_with_every_tier_and_its_provenance(tiers, local_hub, tmp_path):
    repo_id = "local-user/sam-tiers-card"
    push_tiers(tiers, repo_id, base_model="facebook/sam-vit-base", dataset_name="synthetic", mean_ious=MEAN_IOUS, export_onnx=False)
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
    manifest = save_tiers(tiers, folder, base_model="facebook/sam-vit-base", dataset_name="synthetic", export_onnx=False)
    assert "latency" not in render_tiers_card(manifest, folder).text
    manifest["tiers"]["small"]["latency_ms"] = 12.34
    manifest["tiers"]["small"]["latency_measurement"] = {
        "runs_ms": [12.34], "warmup_runs": 2, "batch_size": 1, "threads": 4, "cpu": "Test CPU", "runtime": "onnxruntime",
        "runtime_version": "1.0", "provider": "CPUExecutionProvider", "date": "2026-01-02T03:04:05+00:00",
    }
    text = render_tiers_card(manifest, folder).text
    assert "measured on Test CPU (4 threads, batch 1, onnxruntime 1.0, 2026-01-02T03:04:05+00:00)" in " ".join(text.split())
    assert "| mean IoU | latency |" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| [`")}
    assert "| 12.3 ms |" in rows["[`small`](small/README.md)"] and "| – |" in rows["[`tiny`](tiny/README.md)"]


# --- ONNX exports and published latency -------------------------------------------------------------------------------
# Binary fractions of a second, so that the clock's differences are exact.
FAKE_LATENCIES_MS = {"tiny": 1000 / 512, "small": 1000 / 256, "medium": 1000 / 128}


def measure_with_fake_latencies(monkeypatch, measured: dict, tiers: dict):
    """Makes `save_tiers` time each tier's encoder with a clock on which every run takes `FAKE_LATENCIES_MS[tier]`;
    the measurements it got are recorded in `measured` (tier name → `LatencyMeasurement`). The tier is recognised by
    its BitOPs (it is measured in a staging folder)."""
    import mpsupernet.runtime
    from test_runtime import SteppingClock

    real = mpsupernet.runtime.measure_latency

    names = {subnet.config.bitops: name for name, subnet in tiers.items()}

    def measure(model, **kwargs):
        name = names[model.config["bitops"]]
        measurement = real(model, clock=SteppingClock([FAKE_LATENCIES_MS[name] / 1000]), **kwargs)
        measured[name] = measurement
        return measurement

    monkeypatch.setattr(mpsupernet.runtime, "measure_latency", measure)


@pytest.fixture(scope="module")
def onnx_tiers(tiers, tmp_path_factory):
    """The three tiers saved with their ONNX exports: `(folder, manifest, measurements)`."""
    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("onnx-tiers") / "sam-tiers"
    measured = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        measure_with_fake_latencies(monkeypatch, measured, tiers)
        manifest = save_tiers(
            tiers, folder, base_model="facebook/sam-vit-base", dataset_name="synthetic", mean_ious=MEAN_IOUS,
            latency_threads=1, latency_runs=3,
        )
    return folder, manifest, measured


def test_tiers_carry_their_onnx_files_bytes_and_measured_latency(onnx_tiers):
    folder, manifest, measured = onnx_tiers
    assert json.loads((folder / "tiers.json").read_text()) == manifest
    for name, tier in manifest["tiers"].items():
        tier_folder = folder / tier["subfolder"]
        files = {"config.json", "model.safetensors", "vision_encoder.onnx", "prompt_encoder_mask_decoder.onnx"}
        assert files <= set(tier["file_bytes"])
        assert tier["file_bytes"] == {path.name: path.stat().st_size for path in tier_folder.iterdir() if path.name != "README.md"}
        measurement = measured[name].to_dict()
        assert tier["latency_ms"] == measurement.pop("ms_per_image") == FAKE_LATENCIES_MS[name]
        assert tier["latency_measurement"] == measurement
        assert measurement["threads"] == 1 and measurement["batch_size"] == 1 and len(measurement["runs_ms"]) == 3
        card = ModelCard.load(tier_folder / "README.md")
        assert card.data.latency_ms == round(tier["latency_ms"], 3)
        assert f"**{tier['latency_ms']:.2f} ms per image** (batch 1, median of\n3 runs" in card.text
        assert f"measured on {measurement['cpu']} with 1 thread on\n{measurement['date']}" in card.text
        for file_name, size in tier["file_bytes"].items():
            assert f"| `{file_name}` | {size:,} |" in card.text
        # the folder loads as the PyTorch subnet and as the ONNX model
        assert mpsupernet.SamSubnetForMaskGeneration.from_pretrained(tier_folder).config.bitops == tier["bitops"]
        assert json.loads((tier_folder / "config.json").read_text())["export"]["target"] == "onnxruntime"
    root_card = (folder / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in root_card.splitlines() if line.startswith("| [`")}
    for name in manifest["tiers"]:
        assert f"| {MEAN_IOUS[name]:.4f} | {FAKE_LATENCIES_MS[name]:.1f} ms |" in rows[f"[`{name}`]({name}/README.md)"]
    machine = describe_latency_measurement(manifest["tiers"]["tiny"])
    assert f"measured on {machine}" in " ".join(root_card.split())


def test_select_tier_by_published_latency():
    def tier(bitops, mean_iou, latency_ms):
        measurement = {"cpu": "Test CPU 9000", "threads": 2, "batch_size": 1, "runtime": "onnxruntime",
                       "runtime_version": "1.0", "date": "2026-01-02T03:04:05+00:00"}
        return {"bitops": bitops, "mean_iou": mean_iou, "latency_ms": latency_ms, "latency_measurement": measurement}

    manifest = {
        "full_precision_bitops": 1000,
        "tiers": {"a": tier(10, 0.50, 2.0), "b": tier(20, 0.70, 4.0), "c": tier(40, 0.65, 6.0), "d": tier(80, 0.80, 9.0)},
    }
    assert select_tier(manifest, max_latency_ms=4.0) == "b"  # a latency exactly at the limit fits
    assert select_tier(manifest, max_latency_ms=3.99) == "a"
    assert select_tier(manifest, max_latency_ms=8.0) == "b"  # c fits but b measured better
    assert select_tier(manifest, max_latency_ms=100) == "d"
    assert select_tier(manifest, max_bitops=40, max_latency_ms=100) == "b"  # both limits hold
    assert select_tier(manifest, max_bitops=1000, max_latency_ms=3) == "a"
    with pytest.raises(
        ValueError,
        match=r"No tier runs within 1.5 ms per image; the fastest, 'a', measured 2.00 ms per image on Test CPU 9000 "
        r"\(2 threads, batch 1, onnxruntime 1.0, 2026-01-02T03:04:05\+00:00\)\. Measured tiers: a=2.00 ms, b=4.00 ms",
    ):
        select_tier(manifest, max_latency_ms=1.5)
    with pytest.raises(ValueError, match=r"No tier under max_bitops=80 runs within 1 ms per image; the fastest, 'a'"):
        select_tier(manifest, max_bitops=80, max_latency_ms=1)
    with pytest.raises(ValueError, match=r"Give `max_bitops`, `max_latency_ms` or both"):
        select_tier(manifest)
    with pytest.raises(ValueError, match=r"`max_latency_ms` got -3; give a positive number of milliseconds"):
        select_tier(manifest, max_latency_ms=-3)
    unmeasured = {"full_precision_bitops": 1000, "tiers": {"a": {**tier(10, 0.5, None), "latency_measurement": None}}}
    with pytest.raises(ValueError, match=r"No tier has a published latency \(the tiers were saved with `export_onnx=False`\)"):
        select_tier(unmeasured, max_latency_ms=5)


def box_masks_agree(onnx_model, subnet, seed=0):
    """Mask IoU between an `OnnxSamModel` and a PyTorch subnet on a random image with a box and a point prompt."""
    import numpy as np

    from mpsupernet.metrics import mask_iou

    pixel_values = np.random.default_rng(seed).standard_normal((1, 3, 128, 128)).astype(np.float32)
    boxes = np.array([[[20.0, 30.0, 100.0, 110.0]]], np.float32)
    outputs = onnx_model(pixel_values=pixel_values, input_boxes=boxes)
    with torch.no_grad():
        reference = subnet(pixel_values=torch.from_numpy(pixel_values), input_boxes=torch.from_numpy(boxes)).pred_masks
    assert 0.02 < (reference > 0).float().mean() < 0.98
    return float(mask_iou(torch.from_numpy(outputs.pred_masks), reference > 0).mean())


def test_load_subnet_on_onnxruntime_by_latency_locally(onnx_tiers, tiers):
    from mpsupernet.runtime import OnnxSamModel

    folder, _, _ = onnx_tiers
    for limit, expected in {100.0: "small", 3.90625: "small", 3.9: "tiny", 1.953125: "tiny"}.items():
        model = load_subnet(folder, max_latency_ms=limit, runtime="onnxruntime")
        assert isinstance(model, OnnxSamModel) and model.directory == folder / expected
        assert box_masks_agree(model, tiers[expected]) >= 0.99
    subnet = load_subnet(folder, max_bitops="100%", max_latency_ms=100)
    assert subnet.config.bitops == tiers["small"].config.bitops
    with pytest.raises(ValueError, match=r"No tier runs within 1.9 ms per image; the fastest, 'tiny', measured 1.95 ms"):
        load_subnet(folder, max_latency_ms=1.9, runtime="onnxruntime")
    with pytest.raises(ValueError, match=r"Unknown runtime 'tensorrt'; allowed: \['pytorch', 'onnxruntime', 'openvino'\]"):
        load_subnet(folder, max_bitops="100%", runtime="tensorrt")


def test_tiers_without_onnx_export(tiers, tmp_path):
    manifest = save_tiers(
        {"tiny": tiers["tiny"]}, tmp_path / "tiers", base_model="x/y", dataset_name="d", export_onnx=False
    )
    entry = manifest["tiers"]["tiny"]
    assert entry["latency_ms"] is None and entry["latency_measurement"] is None
    assert set(entry["file_bytes"]) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    card = (tmp_path / "tiers" / "tiny" / "README.md").read_text()
    assert "OnnxSamModel" not in card and "ms per image" not in card and "vision_encoder.onnx" not in card
    with pytest.raises(ValueError, match=r"Tier 'tiny' of .* has no ONNX export \(it was saved with `export_onnx=False`\)"):
        load_subnet(tmp_path / "tiers", max_bitops="100%", runtime="onnxruntime")
    with pytest.raises(ValueError, match=r"No tier has a published latency"):
        load_subnet(tmp_path / "tiers", max_latency_ms=10)
    with pytest.raises(ValueError, match=r"Unknown export target 'tensorrt'"):
        save_tiers({"tiny": tiers["tiny"]}, tmp_path / "other", base_model="x/y", dataset_name="d", onnx_target="tensorrt")
    with pytest.raises(ValueError, match=r"`latency_runs` must be a positive integer; got 0"):
        save_tiers({"tiny": tiers["tiny"]}, tmp_path / "other", base_model="x/y", dataset_name="d", latency_runs=0)
    assert not (tmp_path / "other").exists()
    from mpsupernet.export import add_onnx_export

    with pytest.raises(ValueError, match=r"Cannot add an ONNX export to '.*/other': it holds no config.json of a saved"):
        add_onnx_export(tiers["tiny"], tmp_path / "other")


def test_a_resaved_tier_describes_only_the_onnx_export_beside_it(onnx_tiers, tiers, tmp_path, monkeypatch):
    from mpsupernet.runtime import OnnxSamModel

    folder, _, _ = onnx_tiers
    shipped = json.loads((folder / "tiny" / "config.json").read_text())["export"]
    loaded = SamSubnetForMaskGeneration.from_pretrained(folder / "tiny")
    assert not hasattr(loaded.config, "export")
    # saved without ONNX: no export section (it described files that are not there)
    save_tiers({"tiny": loaded}, tmp_path / "plain", base_model="x/y", dataset_name="d", export_onnx=False)
    assert "export" not in json.loads((tmp_path / "plain" / "tiny" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"holds no ONNX export \(its config.json has no `export` section\)"):
        OnnxSamModel.from_pretrained(tmp_path / "plain" / "tiny")
    # saved over a folder holding an export: the export's files go with its section, other files stay
    over = tmp_path / "over"
    shutil.copytree(folder / "tiny", over)
    (over / "notes.txt").write_text("mine")
    save_subnet_with_card(loaded, over, base_model="x/y", dataset_name="d")
    assert sorted(path.name for path in over.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "notes.txt", "preprocessor_config.json"
    ]
    assert "export" not in json.loads((over / "config.json").read_text())
    assert "vision_encoder.onnx" not in (over / "README.md").read_text()
    # saved with another export: the section describes that one
    measure_with_fake_latencies(monkeypatch, {}, tiers)
    save_tiers(
        {"tiny": loaded}, tmp_path / "int4", base_model="x/y", dataset_name="d", onnx_weight_container="int4",
        latency_threads=1, latency_runs=1,
    )
    export = json.loads((tmp_path / "int4" / "tiny" / "config.json").read_text())["export"]
    assert shipped["weight_container"] == "int8" and export["weight_container"] == "int4"
    assert set(export["files"]) <= {path.name for path in (tmp_path / "int4" / "tiny").iterdir()}
    assert {layer["weight_storage"] for layer in export["layers"].values()} == {"int4"}


def python_blocks(card_text: str, containing: str) -> list[str]:
    """The ```python blocks of a card (dedented, as in list items) that contain `containing`."""
    from test_documentation import python_blocks as all_blocks

    return [code for code, _ in all_blocks(card_text) if containing in code]


def run_snippet_without_torch(snippet: str, cwd, tmp_path) -> dict:
    """Runs a card snippet as written in a process where `import torch` fails; returns its `masks` and `model`'s
    directory."""
    import subprocess
    import sys
    import textwrap

    from PIL import Image

    Image.fromarray((torch.rand(180, 240, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(
        cwd / "image.jpg"
    )
    script = "import sys\nsys.modules['torch'] = None\n" + snippet + textwrap.dedent(
        """
        import json
        print(json.dumps({"shape": list(masks[0].shape), "dtype": str(masks[0].dtype), "directory": str(model.directory)}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_cards_onnx_snippet_runs_as_written_locally(onnx_tiers):
    folder, _, _ = onnx_tiers
    (snippet,) = python_blocks((folder / "small" / "README.md").read_text(), "OnnxSamModel")
    assert 'OnnxSamModel.from_pretrained("sam-tiers", subfolder="small")' in snippet
    result = run_snippet_without_torch(snippet, folder.parent, folder.parent)
    assert result["shape"] == [1, 3, 180, 240] and result["dtype"] == "bool"
    assert result["directory"].endswith("sam-tiers/small")


def test_push_tiers_with_onnx_and_load_by_latency_from_the_hub(tiers, local_hub, tmp_path, monkeypatch):
    from mpsupernet.runtime import OnnxSamModel

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    measure_with_fake_latencies(monkeypatch, {}, tiers)
    repo_id = "local-user/sam-onnx-tiers"
    two_tiers = {name: tiers[name] for name in ("tiny", "small")}  # each export takes seconds
    push_tiers(
        two_tiers, repo_id, base_model="facebook/sam-vit-base", dataset_name="synthetic", mean_ious={"tiny": 0.61, "small": 0.70},
        latency_threads=1, latency_runs=1,
    )
    files = set(HfApi().list_repo_files(repo_id))
    for name in two_tiers:
        assert {f"{name}/vision_encoder.onnx", f"{name}/prompt_encoder_mask_decoder.onnx"} <= files
    model = load_subnet(repo_id, max_latency_ms=3.9, runtime="onnxruntime")
    assert isinstance(model, OnnxSamModel) and model.directory.name == "tiny"
    assert box_masks_agree(model, tiers["tiny"]) >= 0.99
    card = HfApi().hf_hub_download(repo_id, "small/README.md", cache_dir=tmp_path / "cache")
    (snippet,) = python_blocks(open(card).read(), "OnnxSamModel")
    assert f'OnnxSamModel.from_pretrained("{repo_id}", subfolder="small")' in snippet
    result = run_snippet_without_torch(snippet, tmp_path, tmp_path)
    assert result["shape"] == [1, 3, 180, 240] and result["directory"].endswith("small")


def test_the_demo_prints_each_tiers_onnxruntime_latency(onnx_tiers, capsys):
    from mpsupernet.demo import print_summary, summary_rows

    _, manifest, measured = onnx_tiers
    rows = summary_rows(manifest["full_precision_bitops"], 0.8, manifest)
    assert [row["latency_ms"] for row in rows] == [None] + [measured[name].ms_per_image for name in manifest["tiers"]]
    print_summary(rows, machine=describe_latency_measurement(manifest["tiers"]["tiny"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "ms" and "ORT" in lines[0]
    assert lines[1].split()[-1] == "n/a"  # the PyTorch SAM has no onnxruntime latency
    for line, name in zip(lines[2:5], manifest["tiers"]):
        assert line.startswith(f"tier {name}") and line.split()[-1] == f"{FAKE_LATENCIES_MS[name]:.1f}"
    assert lines[5] == f"ORT ms: image encoder on onnxruntime, measured on {describe_latency_measurement(manifest['tiers']['tiny'])}"
    assert f"{measured['tiny'].cpu} (1 thread, batch 1, onnxruntime {measured['tiny'].runtime_version}" in lines[5]
