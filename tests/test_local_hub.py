"""Drives `LocalHubServer` through the real `huggingface_hub` client and `transformers`' Hub integration.

`tests/conftest.py` sets `HF_ENDPOINT` (and a dummy `HF_TOKEN`) before anything imports `huggingface_hub`, and its
session fixture `local_hub` serves on that endpoint. Every test gets its own repo and its own download cache, so tests
never see each other's repos or cached files.
"""

import os
import uuid

import pytest
import torch
from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from local_hub import LocalHubServer, free_port
from transformers import SamModel

from mpsupernet.testing_utils import make_sam_config


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A fresh Hub cache, also made the default for calls that take no `cache_dir` (e.g. `ModelCard.load`)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def api(local_hub):
    return HfApi()


@pytest.fixture
def repo_id(local_hub, request):
    """A repo name of this test's own, under the server's user namespace (not created yet)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:60]
    return f"{local_hub.username}/{name}-{uuid.uuid4().hex[:8]}"


def _write_tree(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _tiny_sam(seed):
    torch.manual_seed(seed)
    return SamModel(make_sam_config()).eval()


def _assert_same_state_dict(actual, expected):
    actual_sd, expected_sd = actual.state_dict(), expected.state_dict()
    assert actual_sd.keys() == expected_sd.keys()
    for key, tensor in expected_sd.items():
        assert torch.equal(actual_sd[key], tensor), key


def test_client_is_pointed_at_the_loopback_server(local_hub, api):
    host, port = local_hub.address
    assert host == "127.0.0.1"
    assert local_hub.url == f"http://127.0.0.1:{port}" == constants.ENDPOINT == api.endpoint
    assert api.whoami()["name"] == local_hub.username


def test_create_repo(api, local_hub, repo_id):
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id
    assert url.startswith(local_hub.url)
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    assert api.repo_exists(repo_id)
    # Like the Hub: a new repo has one commit, holding `.gitattributes`.
    assert api.list_repo_files(repo_id) == [".gitattributes"]

    bare_name = f"bare-{uuid.uuid4().hex[:8]}"
    assert api.create_repo(bare_name).repo_id == f"{local_hub.username}/{bare_name}"


def test_upload_folder_then_download(api, repo_id, tmp_path, hub_cache):
    files = {
        "config.json": b'{"a": 1}',
        "weights/model.bin": os.urandom(300_000),
        "weights/extra/notes.txt": "h\u00e9llo\n".encode(),
        "empty.txt": b"",
    }
    _write_tree(tmp_path / "src", files)
    api.create_repo(repo_id)
    commit = api.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id, commit_message="add files")
    assert len(commit.oid) == 40

    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *files])
    info = api.model_info(repo_id, files_metadata=True)
    assert info.sha == commit.oid
    assert {s.rfilename: s.size for s in info.siblings if s.rfilename in files} == {
        k: len(v) for k, v in files.items()
    }
    top = {entry.path for entry in api.list_repo_tree(repo_id)}
    assert top == {".gitattributes", "config.json", "empty.txt", "weights"}
    assert {e.path for e in api.list_repo_tree(repo_id, "weights")} == {"weights/model.bin", "weights/extra"}

    for rel, data in files.items():
        path = hf_hub_download(repo_id, rel, cache_dir=hub_cache)
        with open(path, "rb") as f:
            assert f.read() == data, rel
    # By commit id too.
    path = hf_hub_download(repo_id, "weights/model.bin", revision=commit.oid, cache_dir=hub_cache)
    with open(path, "rb") as f:
        assert f.read() == files["weights/model.bin"]

    snapshot = snapshot_download(repo_id, allow_patterns=["weights/*"], cache_dir=tmp_path / "snap-cache")
    got = {
        os.path.relpath(os.path.join(d, f), snapshot).replace(os.sep, "/")
        for d, _, names in os.walk(snapshot)
        for f in names
    }
    assert got == {"weights/model.bin", "weights/extra/notes.txt"}
    with open(os.path.join(snapshot, "weights", "model.bin"), "rb") as f:
        assert f.read() == files["weights/model.bin"]


def test_unchanged_files_make_no_new_commit(api, repo_id):
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="f.txt", repo_id=repo_id)
    # preupload reports the remote oid, so the client sees that nothing changed and skips the commit.
    again = api.upload_file(path_or_fileobj=b"same", path_in_repo="f.txt", repo_id=repo_id)
    assert again.oid == first.oid
    assert len(api.list_repo_commits(repo_id)) == 2


def test_branches_and_immutable_snapshots(api, repo_id, hub_cache):
    api.create_repo(repo_id)
    v1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="data.txt", repo_id=repo_id)
    api.create_branch(repo_id, branch="dev")
    dev = api.upload_file(path_or_fileobj=b"dev-only", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")
    v2 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="data.txt", repo_id=repo_id)

    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "data.txt"]
    assert sorted(api.list_repo_files(repo_id, revision="dev")) == [".gitattributes", "data.txt", "dev.txt"]
    assert sorted(api.list_repo_files(repo_id, revision=dev.oid)) == [".gitattributes", "data.txt", "dev.txt"]

    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2.oid, "dev": dev.oid}
    assert refs.tags == []

    def read(revision, filename="data.txt"):
        with open(hf_hub_download(repo_id, filename, revision=revision, cache_dir=hub_cache), "rb") as f:
            return f.read()

    assert read("main") == b"v2"
    assert read(v1.oid) == b"v1"  # an old commit still serves its own content
    assert read("dev") == b"v1"
    assert read("refs/heads/dev", "dev.txt") == b"dev-only"

    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo_id, branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch(repo_id, branch="dev", exist_ok=True)

    api.create_tag(repo_id, tag="v1.0", revision=v1.oid)
    assert read("v1.0") == b"v1"
    api.delete_branch(repo_id, branch="dev")
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]


def test_delete_and_pull_request_commits(api, repo_id, tmp_path):
    api.create_repo(repo_id)
    _write_tree(tmp_path / "src", {"a/x.txt": b"x", "a/y.txt": b"y", "b.txt": b"b"})
    api.upload_folder(folder_path=tmp_path / "src", repo_id=repo_id)
    api.delete_file("b.txt", repo_id=repo_id)
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "a/x.txt", "a/y.txt"]
    api.delete_folder("a", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("b.txt", repo_id=repo_id)

    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="p.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert "p.txt" in api.list_repo_files(repo_id, revision=pr.pr_revision)
    assert "p.txt" not in api.list_repo_files(repo_id)


def test_missing_repo_revision_and_file_raise_the_client_errors(api, repo_id, local_hub, hub_cache):
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=hub_cache)
    missing_repo = f"{local_hub.username}/does-not-exist-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(missing_repo, "x.txt", cache_dir=hub_cache)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(missing_repo)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "x.txt", revision="no-such-branch", cache_dir=hub_cache)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision="0" * 40)
    assert not api.file_exists(repo_id, "missing.txt")
    assert api.file_exists(repo_id, "x.txt")


def test_delete_repo(api, repo_id):
    api.create_repo(repo_id)
    api.delete_repo(repo_id)
    assert not api.repo_exists(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


def test_model_card_push_and_load(api, repo_id, hub_cache):
    api.create_repo(repo_id)
    card = ModelCard.from_template(
        ModelCardData(license="apache-2.0", library_name="transformers", tags=["sam", "local"]),
        model_description="A card that only ever lived on 127.0.0.1.",
    )
    card.push_to_hub(repo_id)
    loaded = ModelCard.load(repo_id)
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.tags == ["sam", "local"]
    assert "only ever lived on 127.0.0.1" in loaded.text
    assert str(loaded) == str(card)


def test_sam_model_push_to_hub_and_from_pretrained(api, repo_id, tmp_path, hub_cache):
    model = _tiny_sam(seed=0)
    model.push_to_hub(repo_id)  # creates the repo itself
    files = api.list_repo_files(repo_id)
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)

    loaded = SamModel.from_pretrained(repo_id, cache_dir=hub_cache)
    _assert_same_state_dict(loaded, model)

    # Another set of weights on a branch leaves main alone.
    other = _tiny_sam(seed=1)
    other.push_to_hub(repo_id, revision="experiment")
    _assert_same_state_dict(SamModel.from_pretrained(repo_id, revision="experiment", cache_dir=hub_cache), other)
    _assert_same_state_dict(SamModel.from_pretrained(repo_id, cache_dir=hub_cache), model)
    assert "experiment" in {b.name for b in api.list_repo_refs(repo_id).branches}

    # And a copy in a subfolder.
    other.save_pretrained(tmp_path / "saved")
    api.upload_folder(folder_path=tmp_path / "saved", path_in_repo="variants/seed1", repo_id=repo_id)
    _assert_same_state_dict(SamModel.from_pretrained(repo_id, subfolder="variants/seed1", cache_dir=hub_cache), other)


def test_storage_survives_a_restart(tmp_path):
    storage = tmp_path / "hub"
    with LocalHubServer(storage) as hub:  # port 0: the OS picks one
        assert hub.port != 0
        api = HfApi(endpoint=hub.url)
        repo = api.create_repo("persisted").repo_id
        commit = api.upload_file(path_or_fileobj=b"kept", path_in_repo="k.txt", repo_id=repo)
    assert not hub.running

    with LocalHubServer(storage, port=free_port()) as hub:
        api = HfApi(endpoint=hub.url)
        assert api.model_info(repo).sha == commit.oid
        path = hf_hub_download(repo, "k.txt", endpoint=hub.url, cache_dir=tmp_path / "cache")
        with open(path, "rb") as f:
            assert f.read() == b"kept"
