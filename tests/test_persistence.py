"""One persistence path: each outermost writer stages once, `config.json` is written once, every file a config
describes carries its digest, writers of one folder take turns, refused calls change nothing, and tiers load from
the cache offline."""

import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

import mpsupernet
import mpsupernet.atomic
from mpsupernet import SamSubnetForMaskGeneration
from mpsupernet.atomic import ConcurrentWriteError, writer_lock
from mpsupernet.bitops import format_budget
from mpsupernet.extraction import extract_subnet
from mpsupernet.hub import load_subnet, push_tiers, read_tiers_manifest, render_subnet_card, save_tiers, select_tier

from conftest import make_tiny_sam
from kill_points import _is_write

onnx = pytest.importorskip("onnxruntime")
from mpsupernet.runtime import OnnxSamModel  # noqa: E402

KWARGS = {"base_model": "x/y", "dataset_name": "d"}


@pytest.fixture(scope="module")
def subnets():
    supernet = mpsupernet.SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    space = supernet.search_space
    return {"xs": extract_subnet(supernet, space.smallest()), "m": extract_subnet(supernet, space.largest(4, 8))}


@pytest.fixture(scope="module")
def exported_tiers(subnets, tmp_path_factory):
    """Both subnets saved as tiers with their ONNX exports (copy the folder before changing it)."""
    folder = tmp_path_factory.mktemp("exported") / "tiers"
    save_tiers(subnets, folder, latency_runs=1, **KWARGS)
    return folder


def tree(root: Path) -> dict:
    """Every path under `root` (itself included) with its mode and, for files, its bytes."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))] if root.exists() else []:
        info = path.lstat()
        found[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), path.read_bytes() if path.is_file() else None)
    return found


_CONFIG_WRITES: dict | None = None


def _count_config_writes(event, args):
    if _CONFIG_WRITES is None or event != "open" or not isinstance(args[0], (str, os.PathLike)):
        return  # an audit hook that raises would fail the operation it watches
    if _is_write(event, args) and Path(args[0]).name == "config.json":
        # a staging folder is renamed into place: count by the folder's own name
        folder = re.sub(r"^\.(.*)\.mpsupernet-staging-.*$", r"\1", Path(args[0]).parent.name)
        _CONFIG_WRITES[folder] = _CONFIG_WRITES.get(folder, 0) + 1


sys.addaudithook(_count_config_writes)


@pytest.fixture
def config_writes():
    """Counts, per folder name, the opens of a `config.json` for writing (every opener, `io.open` included)."""
    global _CONFIG_WRITES
    _CONFIG_WRITES = {}
    yield _CONFIG_WRITES
    _CONFIG_WRITES = None


def count_stagings(monkeypatch) -> list:
    made = []
    real = mpsupernet.atomic.make_staging_directory

    def counting(target):
        made.append(Path(target).name)
        return real(target)

    monkeypatch.setattr(mpsupernet.atomic, "make_staging_directory", counting)
    return made


def test_each_outermost_writer_stages_once_and_writes_each_config_once(subnets, tmp_path, monkeypatch, config_writes):
    configs, stagings = config_writes, count_stagings(monkeypatch)
    save_tiers({"xs": subnets["xs"]}, tmp_path / "tiers", latency_runs=1, **KWARGS)
    assert stagings == ["tiers"] and configs == {"xs": 1}
    config = json.loads((tmp_path / "tiers" / "xs" / "config.json").read_text())
    assert set(config["weights_sha256"]) == {"model.safetensors"} and "vision_encoder.onnx" in config["export"]["sha256"]
    # over earlier tiers: one staging, of the new generation
    stagings.clear(), configs.clear()
    manifest = save_tiers(subnets, tmp_path / "tiers", export_onnx=False, **KWARGS)
    assert stagings == ["_v1"] and configs == {"xs": 1, "m": 1}
    assert {tier["subfolder"] for tier in manifest["tiers"].values()} == {"_v1/xs", "_v1/m"}
    stagings.clear(), configs.clear()
    previous = os.umask(0o022)
    try:
        subnets["xs"].save_pretrained(tmp_path / "saved")
        subnets["xs"].export_onnx(tmp_path / "deep" / "exported", verify=False)
    finally:
        os.umask(previous)
    assert stagings == ["saved", "exported"] and configs == {"saved": 1, "exported": 1}
    # export_onnx into a new folder gives it the permissions save_pretrained gives (not mkdtemp's 0o700)
    saved, exported = tree(tmp_path / "saved"), tree(tmp_path / "deep" / "exported")
    assert saved["."][0] == exported["."][0] == 0o755
    assert {mode for mode, data in exported.values() if data is not None} == {0o644}
    assert not [p.name for p in tmp_path.rglob(".*")]  # no staging, no lock left


def test_every_file_an_export_describes_carries_its_digest(subnets, exported_tiers, tmp_path, local_hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiers"
    shutil.copytree(exported_tiers, folder)
    export = json.loads((folder / "xs" / "config.json").read_text())["export"]
    assert set(export["sha256"]) == set(export["files"]) - {"config.json"}
    assert {"vision_encoder.onnx", "prompt_encoder_mask_decoder.onnx", "preprocessor_config.json"} <= set(export["sha256"])
    # another tier's encoder in place of this one's: refused by every loader, locally and from the Hub
    (folder / "xs" / "vision_encoder.onnx").write_bytes((folder / "m" / "vision_encoder.onnx").read_bytes())
    refused = r"The ONNX export files of '.*xs' do not match its config: config.json records sha256 \w+ for 'vision_encoder.onnx'"
    with pytest.raises(OSError, match=refused):
        OnnxSamModel.from_pretrained(folder / "xs")
    with pytest.raises(OSError, match=refused):
        load_subnet(folder, max_bitops=subnets["xs"].config.bitops, runtime="onnxruntime")
    repo_id = "local-user/swapped-encoder"
    HfApi().create_repo(repo_id, exist_ok=True)
    HfApi().upload_folder(repo_id=repo_id, folder_path=folder)
    with pytest.raises(OSError, match=r"The ONNX export files of 'local-user/swapped-encoder/xs' do not match"):
        load_subnet(repo_id, max_bitops=subnets["xs"].config.bitops, runtime="onnxruntime")
    with pytest.raises(OSError, match=r"is incomplete: its config.json records the export file 'vision_encoder.onnx'"):
        (folder / "xs" / "vision_encoder.onnx").unlink()
        OnnxSamModel.from_pretrained(folder / "xs")
    # an export written before digests were recorded loads as before
    config = json.loads((folder / "m" / "config.json").read_text())
    del config["export"]["sha256"]
    (folder / "m" / "config.json").write_text(json.dumps(config))
    assert OnnxSamModel.from_pretrained(folder / "m").config["export"]["files"] == export["files"]


def _run_in_child(function) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(120)
            function()
        except ConcurrentWriteError:
            os._exit(2)
        except BaseException as error:  # noqa: BLE001 - reported through the exit status
            print(f"writer failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            os._exit(3)
        os._exit(0)
    return pid


def _concurrently(first, second, trials: int, check) -> list:
    """Runs `first` and `second` in two processes released at the same moment, `trials` times; `check()` after each."""
    outcomes = []
    for trial in range(trials):
        start = time.time() + 0.3

        def at_start(function):
            def run():
                time.sleep(max(0.0, start - time.time()))
                function()

            return run

        pids = [_run_in_child(at_start(first)), _run_in_child(at_start(second))]
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        assert set(codes) <= {0, 2} and 0 in codes, f"trial {trial}: exit codes {codes} (3: the writer failed)"
        outcomes.append(tuple(codes))
        check()
    return outcomes


def test_two_processes_writing_one_tiers_folder_leave_one_complete_result(subnets, tmp_path):
    space_small = {"a": subnets["xs"]}
    space_large = {"b": subnets["m"], "c": subnets["xs"]}
    folder = tmp_path / "tiers"
    states = {name: subnet.state_dict() for name, subnet in subnets.items()}

    def check():
        manifest = read_tiers_manifest(folder)
        assert set(manifest["tiers"]) in ({"a"}, {"b", "c"}), manifest["tiers"].keys()
        for name, tier in manifest["tiers"].items():  # every tier the manifest names is complete and is that tier
            loaded = SamSubnetForMaskGeneration.from_pretrained(folder / tier["subfolder"])
            expected = states["xs" if name in ("a", "c") else "m"]
            assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["README.md", "tiers.json", *{tier["subfolder"].split("/")[0] for tier in manifest["tiers"].values()}]
        )
        assert [p.name for p in tmp_path.iterdir()] == ["tiers"]  # no staging and no lock left beside it

    outcomes = _concurrently(
        lambda: save_tiers(space_small, folder, export_onnx=False, **KWARGS),
        lambda: save_tiers(space_large, folder, export_onnx=False, **KWARGS),
        trials=10,
        check=check,
    )
    assert outcomes


def test_two_processes_saving_one_model_folder_leave_one_complete_model(subnets, tmp_path):
    folder = tmp_path / "output"
    states = [subnet.state_dict() for subnet in subnets.values()]

    def check():
        loaded = SamSubnetForMaskGeneration.from_pretrained(folder)
        state = loaded.state_dict()
        assert any(state.keys() == s.keys() and all(torch.equal(state[k], s[k]) for k in s) for s in states)
        assert [p.name for p in tmp_path.iterdir()] == ["output"]

    first, second = subnets.values()
    _concurrently(lambda: first.save_pretrained(folder), lambda: second.save_pretrained(folder), trials=10, check=check)


def test_a_writer_that_finds_the_folder_locked_is_refused_and_changes_nothing(subnets, tmp_path):
    folder = tmp_path / "tiers"
    save_tiers({"a": subnets["xs"]}, folder, export_onnx=False, **KWARGS)
    ready_read, ready_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # holds the lock of every target until released
        with writer_lock(folder), writer_lock(tmp_path / "export"):
            os.write(ready_write, b"x")
            os.read(release_read, 1)
        os._exit(0)
    os.read(ready_read, 1)
    try:
        before = tree(tmp_path)
        message = rf"Cannot write '{re.escape(str(folder))}': another writer \(process {pid}\) is writing it"
        with pytest.raises(ConcurrentWriteError, match=message):
            save_tiers({"b": subnets["m"]}, folder, export_onnx=False, **KWARGS)
        with pytest.raises(ConcurrentWriteError, match=r"Nothing was written; write again once it is done"):
            subnets["xs"].export_onnx(tmp_path / "export", verify=False)
        assert tree(tmp_path) == before
    finally:
        os.write(release_write, b"x")
        os.waitpid(pid, 0)
    save_tiers({"b": subnets["m"]}, folder, export_onnx=False, **KWARGS)  # once released, writes go ahead
    assert set(read_tiers_manifest(folder)["tiers"]) == {"b"}


def test_refused_calls_leave_the_folders_and_the_hub_repository_as_they_were(
    subnets, exported_tiers, tmp_path, local_hub, monkeypatch
):
    import mpsupernet.export.writer

    shutil.copytree(exported_tiers, tmp_path / "tiers")
    (tmp_path / "empty").mkdir()
    repo_id = "local-user/refused-push"
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(repo_id=repo_id, folder_path=exported_tiers)
    api = HfApi()
    repo_before = (api.repo_info(repo_id).sha, sorted(api.list_repo_files(repo_id)))
    before = tree(tmp_path)

    def disk_full(*args, **kwargs):  # after the tier's weights, config-less folder and processor were written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mpsupernet.export.writer, "_export_graph", disk_full)
    for call in (
        lambda: save_tiers(subnets, tmp_path / "tiers", latency_runs=1, **KWARGS),
        lambda: save_tiers(subnets, tmp_path / "new" / "deeper" / "tiers", latency_runs=1, **KWARGS),
        lambda: push_tiers(subnets, repo_id, latency_runs=1, **KWARGS),
        lambda: subnets["m"].export_onnx(tmp_path / "empty", verify=False),
        lambda: subnets["m"].export_onnx(tmp_path / "new" / "export", verify=False),
    ):
        with pytest.raises(OSError, match="No space left on device"):
            call()
        assert tree(tmp_path) == before
    assert (api.repo_info(repo_id).sha, sorted(api.list_repo_files(repo_id))) == repo_before


def test_load_subnet_works_offline_from_the_cache(subnets, exported_tiers, tmp_path, local_hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repo_id = "local-user/offline-tiers"
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(repo_id=repo_id, folder_path=exported_tiers)  # as push_tiers would
    budget = subnets["xs"].config.bitops
    online = load_subnet(repo_id, max_bitops=budget)
    load_subnet(repo_id, max_bitops=budget, runtime="onnxruntime")
    expected = online.state_dict()
    push_tiers({"other": subnets["m"]}, "local-user/never-downloaded", export_onnx=False, **KWARGS)

    def check_offline():
        loaded = load_subnet(repo_id, max_bitops=budget)
        assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
        exported = load_subnet(repo_id, max_bitops=budget, runtime="onnxruntime")
        assert exported.config["bitops"] == budget
        with pytest.raises(FileNotFoundError, match=(
            r"'local-user/never-downloaded' cannot be loaded: the Hub was not reached and the local cache holds no "
            r"tiers.json of it \(.*\)\. Load it once with the Hub reachable"
        )):
            load_subnet("local-user/never-downloaded", max_bitops="100%")
        with pytest.raises(OSError, match=r"Could not load tier 'm' \(subfolder 'm'\) of 'local-user/offline-tiers' at commit"):
            load_subnet(repo_id, max_bitops="100%")  # the costlier tier was never downloaded

    with monkeypatch.context() as offline:
        offline.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        check_offline()
    local_hub.stop()
    try:
        check_offline()
    finally:
        local_hub.start()


def test_a_card_refuses_a_nan_mean_iou(subnets):
    for value in (math.nan, math.inf, 1.5):
        with pytest.raises(ValueError, match=r"The mean IoU of the subnet is .*; give a finite number in \[0, 1\]"):
            render_subnet_card(subnets["xs"], base_model="x/y", dataset_name="d", mean_iou=value)


def test_a_tier_card_picks_its_own_tier_by_latency_when_latencies_are_not_ordered_by_cost(subnets):
    measurement = {
        "runs_ms": [1.0], "warmup_runs": 1, "batch_size": 1, "threads": 1, "cpu": "a busy CPU", "runtime": "onnxruntime",
        "runtime_version": "1", "provider": "CPUExecutionProvider", "date": "2026-01-01",
    }
    xs, m = subnets["xs"].config.bitops, subnets["m"].config.bitops
    # measured on a busy machine: the costlier tier came out faster
    tiers = {
        "xs": {"subfolder": "xs", "bitops": xs, "mean_iou": 0.5, "latency_ms": 9.2},
        "m": {"subfolder": "m", "bitops": m, "mean_iou": 0.7, "latency_ms": 4.1},
    }
    manifest = {"full_precision_bitops": 10 * m, "tiers": {
        name: {**tier, "share_of_full_precision": 0.1, "share_of_w8a8": 0.5, "architecture": {}, "file_bytes": None,
               "latency_measurement": measurement} for name, tier in tiers.items()
    }}
    limits = {}
    for name, tier in manifest["tiers"].items():
        card = render_subnet_card(
            subnets[name], base_model="x/y", dataset_name="d", repo_id="org/tiers", subfolder=name,
            latency={"latency_ms": tier["latency_ms"], "latency_measurement": measurement}, manifest=manifest,
        )
        call = re.search(r'mpsupernet\.load_subnet\("org/tiers", (.*), runtime="onnxruntime"\)', card.text)
        assert call, card.text
        limits[name] = eval(f"dict({call[1]})")  # the snippet's arguments, as written
        assert select_tier(manifest, limits[name].get("max_bitops"), max_latency_ms=limits[name]["max_latency_ms"]) == name
    # under 10 ms alone the costlier, better tier would be chosen: the cheaper tier's snippet adds its budget
    assert limits == {"m": {"max_latency_ms": 5}, "xs": {"max_bitops": format_budget(xs), "max_latency_ms": 10}}
