"""Kill -9 at every file-system write of each writer: what is left on disk loads as the complete old or the complete
new model, or is refused with a clear error; never a silent mix. See `kill_points.py` for how the writers are killed.
"""

import os
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from mpsupernet import SamSubnetForMaskGeneration, SamSupernetForMaskGeneration
from mpsupernet.cli import main
from mpsupernet.extraction import descent_path, extract_subnet
from mpsupernet.hub import load_subnet, read_tiers_manifest, save_tiers

from conftest import drop_weights_digest, make_tiny_sam
from kill_points import every_kill_point, run_killed_before_write

REFUSED = re.compile(
    r"do not match its config: config.json records sha256|is incomplete: its config.json records the weights file"
    r"|holds weights files .* that its config.json does not record"
)
STAGING = ".mpsupernet-staging-"


def _same_state(model, reference: dict) -> bool:
    state = model.state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def _identify(load, folder, candidates: dict) -> str:
    """Which candidate the folder loads as, "refused" (with a pinned message) or "missing"."""
    if not folder.exists():
        return "missing"
    try:
        model = load(folder)
    except OSError as error:
        assert REFUSED.search(str(error)), f"unclear refusal: {error}"
        return "refused"
    matches = [
        name
        for name, (state, bitops) in candidates.items()
        if _same_state(model, state) and bitops in (None, getattr(model.config, "bitops", None))
    ]
    assert matches, "the folder loads as a mix of the old and the new model"
    return matches[0]


def _kill_everywhere(work, pristine, write, identify, allowed, stride=1):
    """Runs `write` killed at each of its writes, starting each time from a copy of `pristine` in `work`."""
    outcomes = {}

    def reset():
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work, symlinks=True)

    def check(n, finished):
        outcomes[n] = identify()
        assert outcomes[n] in allowed, (n, outcomes[n])
        if finished:
            assert outcomes[n] == "new", (n, outcomes[n])

    points = every_kill_point(write, reset, check, stride)
    assert outcomes[1] in ("old", "missing") and points >= 3, outcomes
    return outcomes


def _stale_staging_is_cleaned_by_the_next_write(work, pristine, write, points):
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work, symlinks=True)
    assert not run_killed_before_write(write, max(2, points // 2))
    write()
    assert not [p for p in work.rglob("*") if STAGING in p.name]


@pytest.fixture(scope="module")
def supernets():
    """Two supernets of the same shapes that differ in adapters and step sizes: the "old" and the "new" save."""
    old = SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    old.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    new = SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    new.load_state_dict(old.state_dict())
    with torch.no_grad():
        for name, parameter in new.named_parameters():
            if "lora_B" in name or "step_size" in name:
                parameter.mul_(1.5).add_(0.01)
    return old, new


@pytest.mark.parametrize("old_save", ["none", "digest", "older_save_without_digest", "sharded_new"])
def test_supernet_save_pretrained_survives_a_kill_at_every_write(supernets, tmp_path, old_save):
    old, new = supernets
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    pristine.mkdir()
    if old_save != "none":
        old.save_pretrained(pristine / "supernet")
    if old_save == "older_save_without_digest":
        drop_weights_digest(pristine / "supernet")
    folder = work / "supernet"
    # a new save in shards over a single-file one: the old model.safetensors must go, and never load with the new config
    save_kwargs = {"max_shard_size": "300KB"} if old_save == "sharded_new" else {}
    candidates = {"old": (old.state_dict(), None), "new": (new.state_dict(), None)}
    outcomes = _kill_everywhere(
        work,
        pristine,
        lambda: new.save_pretrained(folder, **save_kwargs),
        lambda: _identify(SamSupernetForMaskGeneration.from_pretrained, folder, candidates),
        {"missing", "new"} if old_save == "none" else {"old", "new", "refused"},
    )
    if old_save == "sharded_new":
        weights = sorted(p.name for p in folder.iterdir() if "safetensors" in p.name)
        assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights and len(weights) > 2
    _stale_staging_is_cleaned_by_the_next_write(work, pristine, lambda: new.save_pretrained(folder), max(outcomes))


def _same_shape_archs(supernet):
    """Two consecutive architectures of the descent path that differ only in their activation bits (W4A6, W4A4)."""
    path = list(descent_path(supernet.search_space))
    for first, second in zip(path, path[1:]):
        quantized = max(first.activation_bits + first.weight_bits + second.activation_bits) < 16
        if quantized and first.weight_bits == second.weight_bits and first.activation_bits != second.activation_bits:
            return first, second
    raise AssertionError("no such pair")


def test_extract_subnet_save_directory_survives_a_kill_at_every_write(supernets, tmp_path):
    supernet = supernets[0]
    old_arch, new_arch = _same_shape_archs(supernet)
    old_subnet, new_subnet = extract_subnet(supernet, old_arch), extract_subnet(supernet, new_arch)
    assert {k: v.shape for k, v in old_subnet.state_dict().items()} == {
        k: v.shape for k, v in new_subnet.state_dict().items()
    }
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    old_subnet.save_pretrained(pristine / "subnet")
    folder = work / "subnet"
    budget = new_subnet.config.bitops
    candidates = {
        "old": (old_subnet.state_dict(), old_subnet.config.bitops),
        "new": (new_subnet.state_dict(), new_subnet.config.bitops),
    }
    outcomes = _kill_everywhere(
        work,
        pristine,
        lambda: supernet.extract_subnet(budget, save_directory=folder),
        lambda: _identify(SamSubnetForMaskGeneration.from_pretrained, folder, candidates),
        {"old", "new", "refused"},
    )
    assert "refused" in outcomes.values()  # the window where the new config meets the old weights is caught


# The fast variants sample every third (tiers: fifth) write; the slow ones kill at every write.
SAMPLED = [3, pytest.param(1, marks=pytest.mark.slow)]
SAMPLED_TIERS = [5, pytest.param(1, marks=pytest.mark.slow)]


@pytest.mark.parametrize("stride", SAMPLED)
def test_mpsupernet_extract_survives_a_kill_at_every_write(supernets, tmp_path, stride):
    supernet = supernets[0]
    supernet_dir = tmp_path / "supernet"
    supernet.save_pretrained(supernet_dir)
    old_arch, new_arch = _same_shape_archs(supernet)
    old_subnet, new_subnet = extract_subnet(supernet, old_arch), extract_subnet(supernet, new_arch)
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    command = ["extract", "--supernet", str(supernet_dir), "--base-model", "tiny-sam", "--output-dir"]
    assert main(command + [str(pristine / "tier"), "--budget", str(old_subnet.config.bitops)]) == 0
    folder = work / "tier"
    candidates = {
        "old": (old_subnet.state_dict(), old_subnet.config.bitops),
        "new": (new_subnet.state_dict(), new_subnet.config.bitops),
    }

    def identify():
        outcome = _identify(SamSubnetForMaskGeneration.from_pretrained, folder, candidates)
        if outcome in ("old", "new"):  # the card states the BitOPs of the subnet beside it
            assert ModelCard.load(folder / "README.md").data.to_dict()["bitops"] == candidates[outcome][1]
        return outcome

    def write():
        assert main(command + [str(folder), "--budget", str(new_subnet.config.bitops)]) == 0

    _kill_everywhere(work, pristine, write, identify, {"old", "new", "refused"}, stride)


@pytest.mark.parametrize("stride", SAMPLED_TIERS)
@pytest.mark.parametrize("over_old", [True, False])
def test_save_tiers_survives_a_kill_at_every_write(supernets, tmp_path, over_old, stride):
    supernet = supernets[0]
    space = supernet.search_space
    old_tiers = {
        "fast": extract_subnet(supernet, space.smallest()),
        "best": extract_subnet(supernet, space.largest(4, 8)),
    }
    new_tiers = {
        "fast": extract_subnet(supernet, space.largest(2, 4)),
        "mid": extract_subnet(supernet, space.largest(3, 6)),
    }
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    pristine.mkdir()
    kwargs = {"base_model": "x/y", "dataset_name": "d", "export_onnx": False}
    if over_old:
        old_manifest = save_tiers(old_tiers, pristine / "tiers", **kwargs)
    new_manifest = save_tiers(new_tiers, tmp_path / "reference", **kwargs)
    folder = work / "tiers"

    def identify():
        if not folder.exists():
            return "missing"
        manifest = read_tiers_manifest(folder)
        which = "old" if over_old and _bitops(manifest) == _bitops(old_manifest) else "new"
        assert _bitops(manifest) == _bitops(new_manifest if which == "new" else old_manifest)
        subnets = new_tiers if which == "new" else old_tiers
        for name, tier in manifest["tiers"].items():  # every tier the manifest names is complete and is that tier
            loaded = load_subnet(folder, max_bitops=tier["bitops"])
            assert loaded.config.bitops <= tier["bitops"]
            if loaded.config.bitops == tier["bitops"]:
                assert _same_state(loaded, subnets[name].state_dict())
        return which

    outcomes = _kill_everywhere(
        work,
        pristine,
        lambda: save_tiers(new_tiers, folder, **kwargs),
        identify,
        {"old", "new"} if over_old else {"missing", "new"},
        stride,
    )
    _stale_staging_is_cleaned_by_the_next_write(
        work, pristine, lambda: save_tiers(new_tiers, folder, **kwargs), max(outcomes)
    )
    # the generation a killed write left is gone too: one generation, named by the manifest
    generations = [p.name for p in folder.iterdir() if p.name.startswith("_v")]
    assert len(generations) == (1 if over_old else 0) and all(
        t["subfolder"].split("/")[0] in generations + list(new_tiers)
        for t in read_tiers_manifest(folder)["tiers"].values()
    )


def _bitops(manifest):
    return {name: tier["bitops"] for name, tier in manifest["tiers"].items()}


def test_load_subnet_retries_when_the_weights_vanish_under_a_rewrite(supernets, tmp_path, monkeypatch):
    # transformers memory-maps the weights: a file that save_tiers removes between the config check and the mapping
    # surfaces as a RuntimeError, not an OSError. With the manifest rewritten meanwhile, the read starts again.
    space = supernets[0].search_space
    old, new = extract_subnet(supernets[0], space.largest(2, 4)), extract_subnet(supernets[0], space.largest(4, 8))
    folder = tmp_path / "tiers"
    kwargs = {"base_model": "x/y", "dataset_name": "d", "export_onnx": False}
    save_tiers({"x": old}, folder, **kwargs)
    from_pretrained = SamSubnetForMaskGeneration.from_pretrained
    calls = []

    def rewritten_while_loading(path, **options):
        calls.append(path)
        if len(calls) == 1:
            save_tiers({"x": new}, folder, **kwargs)
            raise RuntimeError(f"unable to open file <{path}/model.safetensors> in read-only mode: No such file")
        return from_pretrained(path, **options)

    monkeypatch.setattr(SamSubnetForMaskGeneration, "from_pretrained", rewritten_while_loading)
    assert _same_state(load_subnet(folder, max_bitops="100%"), new.state_dict()) and len(calls) == 2

    # The same error with the manifest unchanged is the reader's own: it is raised, not retried.
    def broken(path, **options):
        raise RuntimeError("unable to open file: corrupt")

    monkeypatch.setattr(SamSubnetForMaskGeneration, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="corrupt"):
        load_subnet(folder, max_bitops="100%")


def test_readers_polling_load_subnet_during_rewrites_get_a_whole_tier(supernets, tmp_path):
    supernet = supernets[0]
    space = supernet.search_space
    versions = [extract_subnet(supernet, space.largest(2, 4)), extract_subnet(supernet, space.largest(4, 8))]
    folder = tmp_path / "tiers"
    kwargs = {"base_model": "x/y", "dataset_name": "d", "export_onnx": False}
    save_tiers({"x": versions[0]}, folder, **kwargs)
    budget = max(version.config.bitops for version in versions)
    states = [version.state_dict() for version in versions]

    pid = os.fork()
    if pid == 0:  # the writer: rewrites the tier back and forth
        try:
            for round in range(6):
                save_tiers({"x": versions[(round + 1) % 2]}, folder, **kwargs)
        finally:
            os._exit(0)
    seen = []
    while not os.waitpid(pid, os.WNOHANG)[0]:
        try:
            loaded = load_subnet(folder, max_bitops=budget)
        except OSError as error:  # only when the writer outpaced ten reads in a row
            assert re.fullmatch(r"The tiers in '.*' were rewritten 10 times while loading; load again .*", str(error))
            seen.append("refused")
            continue
        matches = [index for index, state in enumerate(states) if _same_state(loaded, state)]
        assert len(matches) == 1 and loaded.config.bitops == versions[matches[0]].config.bitops
        seen.append(matches[0])
    assert seen  # reads happened during the rewrites


@pytest.mark.parametrize("stride", SAMPLED_TIERS)  # every kill point costs an export up to it
def test_export_onnx_over_an_earlier_export_survives_a_kill_at_every_write(supernets, tmp_path, stride):
    pytest.importorskip("onnxruntime")
    from mpsupernet.runtime import OnnxSamModel

    supernet = supernets[0]
    old_arch, new_arch = _same_shape_archs(supernet)
    old_subnet, new_subnet = extract_subnet(supernet, old_arch), extract_subnet(supernet, new_arch)
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    old_subnet.export_onnx(pristine / "export", verify=False)
    new_subnet.export_onnx(tmp_path / "reference", verify=False)
    folder = work / "export"
    encoders = {
        name: (root / "vision_encoder.onnx").read_bytes()
        for name, root in (("old", pristine / "export"), ("new", tmp_path / "reference"))
    }
    assert encoders["old"] != encoders["new"]

    def identify():
        try:
            model = OnnxSamModel.from_pretrained(folder)
        except OSError as error:
            assert re.search(r"do not match its config|is incomplete: its config.json records", str(error)), error
            return "refused"
        encoder = (folder / "vision_encoder.onnx").read_bytes()
        matches = [name for name, data in encoders.items() if data == encoder]
        assert matches, "the folder loads with an encoder of neither export"
        subnet = old_subnet if matches[0] == "old" else new_subnet
        assert model.config["bitops"] == subnet.config.bitops  # the config is that export's own
        return matches[0]

    outcomes = _kill_everywhere(
        work, pristine, lambda: new_subnet.export_onnx(folder, verify=False), identify, {"old", "new", "refused"}, stride
    )
    if stride == 1:
        assert "refused" in outcomes.values()  # the window where the new config meets the old files is caught
    _stale_staging_is_cleaned_by_the_next_write(
        work, pristine, lambda: new_subnet.export_onnx(folder, verify=False), max(outcomes)
    )
