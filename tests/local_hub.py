"""A small Hugging Face Hub look-alike served over HTTP on 127.0.0.1, for tests that run without internet.

It speaks enough of the Hub protocol for the real `huggingface_hub` client (and `transformers`' `push_to_hub` /
`from_pretrained(repo_id)`) to work against it: creating and deleting repos, committing files, branches and tags,
listing trees and refs, and downloading files through `/resolve/`. Every commit is an immutable snapshot whose id is
the sha1 of its content, so a file can be fetched by branch name, tag or commit id alike.

`HF_ENDPOINT` has to be set to the server's `url` before `huggingface_hub` (or `transformers`) is first imported,
because the client reads it at import time; pick the port beforehand with `free_port()`.

Storage layout under `storage_dir` (plain files, so a new server on the same directory sees the same repos)::

    blobs/<oid[:2]>/<oid>                      file contents, keyed by their git blob sha1
    sha256/<sha256>                            the git blob sha1 of the blob with that sha256 (for `lfsFile` lines)
    repos/<type>s/<namespace>/<name>/repo.json      creation date, visibility
    repos/<type>s/<namespace>/<name>/refs.json      branches, tags, pull requests -> commit id
    repos/<type>s/<namespace>/<name>/commits/<id>.json   one immutable snapshot per commit

For fault-injection tests, `LocalHubServer.inject_fault(Fault(...))` makes matching requests fail before they change
anything, lose their connection, break a download off midway, or run a callback after they were served.

Every file is stored and served as a regular git blob: `preupload` answers `"regular"` for every file, so the client
never takes the LFS/Xet upload path (which would need a separate storage service), and downloads never carry Xet
headers.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["Fault", "LocalHubServer", "free_port"]

DEFAULT_USERNAME = "local-user"
REPO_TYPES = ("model", "dataset", "space", "kernel")
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}

# The endpoints that sit right after `/api/{type}s/{namespace}/{name}/`; used to tell `ns/name/<action>` apart.
_REPO_ACTIONS = {
    "revision",
    "tree",
    "paths-info",
    "preupload",
    "commit",
    "commits",
    "branch",
    "tag",
    "refs",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,95})$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

_GITATTRIBUTES = b"".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for ext in ("bin", "ckpt", "h5", "msgpack", "npy", "npz", "onnx", "pt", "pth", "safetensors", "tar.gz", "zip")
)


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob with `data` as content (what the Hub reports as a regular file's `oid`/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error answered to the client as `status` with the Hub's `X-Error-Code` header and `{"error": ...}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


FAULT_ACTIONS = ("error", "drop", "truncate", "after")


@dataclass
class Fault:
    """A failure the server injects into the next `times` requests whose method and path match (fault injection).

    Args:
        path: a regular expression searched in the request path (e.g. `r"/commit/"`, `r"/resolve/.*safetensors"`).
        action: `"error"`: answer `status` without doing anything; `"drop"`: close the connection after reading the
            request, without an answer and without doing anything; `"truncate"`: (downloads) send the headers and
            half the body, then close the connection; `"after"`: handle the request normally, then call
            `callback(store)` (e.g. to move a branch between two requests of a client).
        method: the HTTP method, or `"*"` for any.
        times: how many matching requests it applies to.
        status: the status of `"error"`.
        callback: the function of `"after"`.
    """

    path: str
    action: str
    method: str = "*"
    times: int = 1
    status: int = 500
    callback: Callable[["HubStore"], None] | None = None

    def __post_init__(self):
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"Unknown fault action {self.action!r}; allowed: {list(FAULT_ACTIONS)}.")
        if self.action == "after" and self.callback is None:
            raise ValueError("A fault with action 'after' needs a `callback`.")

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in ("*", method) and re.search(self.path, path) is not None


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubStore:
    """The repos, commits and blobs of one server, kept as files under `root`.

    All methods take the store's lock, so that concurrent requests see whole commits only.
    """

    def __init__(self, root: str | os.PathLike, username: str = DEFAULT_USERNAME):
        self.root = Path(root)
        self.username = username
        self.lock = threading.RLock()
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- files

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _write_json(self, path: Path, obj: Any) -> None:
        self._write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    @staticmethod
    def _read_json(path: Path) -> Any:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def put_blob(self, data: bytes) -> dict:
        """Stores `data` and returns its tree entry (`oid`, `size`, `sha256`)."""
        oid = git_blob_oid(data)
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(oid)
        if not path.exists():
            self._write_atomic(path, data)
        sha_path = self.root / "sha256" / sha256
        if not sha_path.exists():
            self._write_atomic(sha_path, oid.encode())
        return {"oid": oid, "size": len(data), "sha256": sha256}

    def blob_path(self, oid: str) -> Path:
        return self.root / "blobs" / oid[:2] / oid

    def entry_for_sha256(self, sha256: str) -> dict | None:
        """The tree entry of an already stored blob, looked up by its sha256 (how `lfsFile` lines name content)."""
        sha_path = self.root / "sha256" / sha256
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not sha_path.exists():
            return None
        oid = sha_path.read_text().strip()
        return {"oid": oid, "size": self.blob_path(oid).stat().st_size, "sha256": sha256}

    # ---------------------------------------------------------------- repos

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def repo_exists(self, repo_type: str, repo_id: str) -> bool:
        return (self.repo_dir(repo_type, repo_id) / "refs.json").exists()

    def _check_repo(self, repo_type: str, repo_id: str) -> Path:
        if not self.repo_exists(repo_type, repo_id):
            raise _repo_not_found(repo_id)
        return self.repo_dir(repo_type, repo_id)

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Creates the repo with an initial commit holding `.gitattributes`, as the Hub does; False if it exists."""
        with self.lock:
            if self.repo_exists(repo_type, repo_id):
                return False
            repo = self.repo_dir(repo_type, repo_id)
            self._write_json(repo / "repo.json", {"createdAt": _now(), "private": bool(private)})
            self._write_json(repo / "refs.json", {"branches": {}, "tags": {}, "pulls": {}})
            files = {".gitattributes": self.put_blob(_GITATTRIBUTES)}
            commit_id = self._write_commit(repo, [], files, "initial commit", "")
            self._set_refs(repo_type, repo_id, lambda refs: refs["branches"].__setitem__("main", commit_id))
            return True

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            repo = self._check_repo(repo_type, repo_id)
            shutil.rmtree(repo)

    def move_repo(self, repo_type: str, from_id: str, to_id: str) -> None:
        with self.lock:
            src = self._check_repo(repo_type, from_id)
            if self.repo_exists(repo_type, to_id):
                raise HubError(409, f"Repository {to_id} already exists")
            dst = self.repo_dir(repo_type, to_id)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)

    def repo_meta(self, repo_type: str, repo_id: str) -> dict:
        return self._read_json(self._check_repo(repo_type, repo_id) / "repo.json")

    # ---------------------------------------------------------------- refs and commits

    def refs(self, repo_type: str, repo_id: str) -> dict:
        return self._read_json(self._check_repo(repo_type, repo_id) / "refs.json")

    def _set_refs(self, repo_type: str, repo_id: str, change) -> dict:
        with self.lock:
            path = self._check_repo(repo_type, repo_id) / "refs.json"
            refs = self._read_json(path)
            change(refs)
            self._write_json(path, refs)
            return refs

    def commit(self, repo_type: str, repo_id: str, commit_id: str) -> dict:
        path = self._check_repo(repo_type, repo_id) / "commits" / f"{commit_id}.json"
        if not _COMMIT_RE.match(commit_id) or not path.exists():
            raise _revision_not_found(commit_id)
        return self._read_json(path)

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """The commit id that `revision` (branch, tag, `refs/...` name or commit id) points at."""
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            pr_match = re.fullmatch(r"refs/pr/(\d+)", revision)
            if revision.startswith("refs/heads/"):
                target = refs["branches"].get(revision[len("refs/heads/") :])
            elif revision.startswith("refs/tags/"):
                target = refs["tags"].get(revision[len("refs/tags/") :])
            elif pr_match:
                target = refs["pulls"].get(pr_match.group(1))
            elif revision in refs["branches"]:
                target = refs["branches"][revision]
            elif revision in refs["tags"]:
                target = refs["tags"][revision]
            elif _COMMIT_RE.match(revision):
                target = self.commit(repo_type, repo_id, revision)["id"]
            else:
                target = None
            if target is None:
                raise _revision_not_found(revision)
            return target

    def _write_commit(self, repo: Path, parents: list[str], files: dict, title: str, message: str) -> str:
        body = {
            "parents": parents,
            "files": files,
            "title": title,
            "message": message,
            "authors": [self.username],
            "date": _now(),
        }
        commit_id = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        self._write_json(repo / "commits" / f"{commit_id}.json", {"id": commit_id, **body})
        return commit_id

    def create_commit(
        self,
        repo_type: str,
        repo_id: str,
        revision: str,
        operations: list[tuple[str, str, Any]],
        title: str,
        message: str,
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[str, str | None]:
        """Applies `operations` on top of the branch `revision` and moves the branch (or a new PR ref) to the result.

        `operations` are `("add", path, entry)`, `("delete_file", path, None)` or `("delete_folder", path, None)`.
        Returns the new commit id and, for `create_pr`, the pull request number.
        """
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            pr_match = re.fullmatch(r"refs/pr/(\d+)", revision)
            branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            if pr_match:
                head = refs["pulls"].get(pr_match.group(1))
            else:
                head = refs["branches"].get(branch)
            if head is None:
                # The Hub only commits to existing branches (clients call create_branch first).
                raise _revision_not_found(revision)
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412, f"A commit has happened since. Please refresh and try again. (parent {parent_commit})"
                )
            files = dict(self.commit(repo_type, repo_id, head)["files"])
            for kind, path, entry in operations:
                if kind == "add":
                    files[path] = entry
                elif kind == "delete_file":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                else:
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            repo = self.repo_dir(repo_type, repo_id)
            commit_id = self._write_commit(repo, [head], files, title, message)
            pr_num = None
            if create_pr:
                pr_num = str(max((int(n) for n in refs["pulls"]), default=0) + 1)
                self._set_refs(repo_type, repo_id, lambda r: r["pulls"].__setitem__(pr_num, commit_id))
            elif pr_match:
                self._set_refs(repo_type, repo_id, lambda r: r["pulls"].__setitem__(pr_match.group(1), commit_id))
            else:
                self._set_refs(repo_type, repo_id, lambda r: r["branches"].__setitem__(branch, commit_id))
            return commit_id, pr_num

    def create_ref(self, repo_type: str, repo_id: str, kind: str, name: str, starting_point: str | None) -> None:
        """Creates branch or tag `name` (kind "branches"/"tags") at `starting_point` (default: head of main)."""
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if name in refs[kind]:
                what = "Branch" if kind == "branches" else "Tag"
                raise HubError(409, f"{what} already exists: {name}")
            if not name or name.startswith("refs/") or ".." in name or _COMMIT_RE.match(name):
                raise HubError(400, f"Invalid reference name: {name}")
            target = self.resolve(repo_type, repo_id, starting_point or "main")
            self._set_refs(repo_type, repo_id, lambda r: r[kind].__setitem__(name, target))

    def delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if name not in refs[kind]:
                raise _revision_not_found(name)
            if kind == "branches" and name == "main":
                raise HubError(403, "Cannot delete the default branch")
            self._set_refs(repo_type, repo_id, lambda r: r[kind].pop(name))

    def history(self, repo_type: str, repo_id: str, commit_id: str) -> list[dict]:
        """The first-parent history of `commit_id`, newest first."""
        out = []
        current: str | None = commit_id
        while current is not None:
            commit = self.commit(repo_type, repo_id, current)
            out.append(commit)
            current = commit["parents"][0] if commit["parents"] else None
        return out


def _tree_oid(files: dict, folder: str) -> str:
    """A stable id for the folder `folder` of a snapshot (git's real tree hashing is not needed by clients)."""
    prefix = folder + "/" if folder else ""
    listing = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(prefix))
    return hashlib.sha1(json.dumps(listing).encode()).hexdigest()


def _is_dir(files: dict, path: str) -> bool:
    prefix = path + "/" if path else ""
    return any(p.startswith(prefix) for p in files)


def _entry_json(files: dict, path: str, history: list[dict] | None = None) -> dict:
    """The tree/paths-info JSON of the file or folder `path` in snapshot `files`; `history` adds `lastCommit`."""
    if path in files:
        out = {"type": "file", "oid": files[path]["oid"], "size": files[path]["size"], "path": path}
    else:
        out = {"type": "directory", "oid": _tree_oid(files, path), "size": 0, "path": path}
    if history:
        out["lastCommit"] = _last_commit(history, path, out["oid"], out["type"])
    return out


def _last_commit(history: list[dict], path: str, oid: str, kind: str) -> dict:
    """The newest commit in `history` (newest first) from which on `path` has had its current content."""
    last = history[0]
    for commit in history:
        files = commit["files"]
        if kind == "file":
            same = path in files and files[path]["oid"] == oid
        else:
            same = _is_dir(files, path) and _tree_oid(files, path) == oid
        if not same:
            break
        last = commit
    return {"id": last["id"], "title": last["title"], "date": last["date"]}


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _clean_path_in_repo(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class _Handler(BaseHTTPRequestHandler):
    """Routes HTTP requests to the store. One instance per client connection, each on its own thread."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: "_HubHTTPServer"

    # ---------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    @property
    def store(self) -> HubStore:
        return self.server.store

    @property
    def endpoint(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.url

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json(error.body or {"error": error.message}, status=error.status, headers=headers)

    def _handle(self, method: str) -> None:
        try:
            self.body = self._read_body()
            split = urlsplit(self.path)
            self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            # Split before unquoting: revisions such as `refs%2Fpr%2F1` arrive quoted as one segment.
            segments = [unquote(s) for s in split.path.split("/")[1:]]
            if segments and segments[-1] == "" and len(segments) > 1:
                segments = segments[:-1]
            fault = self.server.take_fault(method, split.path)
            self.truncate = fault is not None and fault.action == "truncate"
            if fault is not None and fault.action == "error":
                raise HubError(fault.status, f"Injected fault on {method} {split.path}")
            if fault is not None and fault.action == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._route(method, segments)
            if fault is not None and fault.action == "after":
                fault.callback(self.store)
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # noqa: BLE001 - a server must answer, not die
            self._send_error(HubError(500, f"{type(error).__name__}: {error}"))

    # ---------------------------------------------------------------- routing

    def _route(self, method: str, seg: list[str]) -> None:
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:])
        # /{repo_id}/resolve/{rev}/{path}, /datasets/{repo_id}/resolve/...; `raw` is served the same way.
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces", "kernels"):
            repo_type, seg = seg[0][:-1], seg[1:]
        for n in (2, 1):
            if len(seg) > n + 2 and seg[n] in ("resolve", "raw") and method in ("GET", "HEAD"):
                return self._resolve(repo_type, "/".join(seg[:n]), seg[n + 1], "/".join(seg[n + 2 :]))
        raise HubError(404, f"Not found: {self.path}")

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if seg == ["repos", "move"] and method == "POST":
            return self._move_repo()
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(seg) >= 2 and seg[0] in {f"{t}s" for t in REPO_TYPES}:
            repo_type, rest = seg[0][:-1], seg[1:]
            # `ns/name[/action...]`, unless the second segment is an action and the third is not (a bare `name`).
            bare = len(rest) > 2 and rest[1] in _REPO_ACTIONS and rest[2] not in _REPO_ACTIONS
            n = 1 if bare or len(rest) == 1 else 2
            repo_id, rest = "/".join(rest[:n]), rest[n:]
            return self._route_repo(method, repo_type, repo_id, rest)
        raise HubError(404, f"Not found: {self.path}")

    def _route_repo(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> None:
        action = rest[0] if rest else None
        args = rest[1:]
        if action is None and method == "GET":
            return self._repo_info(repo_type, repo_id, None)
        if action == "revision" and method == "GET" and args:
            return self._repo_info(repo_type, repo_id, "/".join(args))
        if action == "tree" and method == "GET":
            return self._tree(repo_type, repo_id, args[0] if args else "main", "/".join(args[1:]))
        if action == "paths-info" and method == "POST" and args:
            return self._paths_info(repo_type, repo_id, "/".join(args))
        if action == "preupload" and method == "POST" and args:
            return self._preupload(repo_type, repo_id, "/".join(args))
        if action == "commit" and method == "POST" and args:
            return self._commit(repo_type, repo_id, "/".join(args))
        if action == "commits" and method == "GET":
            return self._commits(repo_type, repo_id, "/".join(args) or "main")
        if action == "refs" and method == "GET":
            return self._list_refs(repo_type, repo_id)
        if action in ("branch", "tag") and args:
            kind = "branches" if action == "branch" else "tags"
            if method == "POST":
                return self._create_ref(repo_type, repo_id, kind, "/".join(args))
            if method == "DELETE":
                self.store.delete_ref(repo_type, repo_id, kind, "/".join(args))
                return self._send_json({})
        raise HubError(404, f"Not found: {self.path}")

    # ---------------------------------------------------------------- account and repo management

    def _whoami(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")
        name = self.store.username
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": name,
                "email": f"{name}@localhost",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _repo_from_payload(self, payload: dict) -> tuple[str, str]:
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or self.store.username
        for part in (namespace, name):
            if not _NAME_RE.match(part) or ".." in part or part.endswith(".git"):
                raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        return repo_type, f"{namespace}/{name}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIXES[repo_type]}{repo_id}"

    def _create_repo(self) -> None:
        payload = self._json_body()
        repo_type, repo_id = self._repo_from_payload(payload)
        private = payload.get("private") or payload.get("visibility") in ("private", "protected")
        url = self._repo_url(repo_type, repo_id)
        if not self.store.create_repo(repo_type, repo_id, private):
            # The client reads `url` from the 409 body too when `exist_ok=True`.
            message = "You already created this repo"
            raise HubError(409, message, body={"error": message, "url": url})
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        repo_type, repo_id = self._repo_from_payload(self._json_body())
        self.store.delete_repo(repo_type, repo_id)
        self._send_json({})

    def _move_repo(self) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        from_id, to_id = payload.get("fromRepo", ""), payload.get("toRepo", "")
        for repo_id in (from_id, to_id):
            parts = repo_id.split("/")
            if len(parts) != 2 or not all(_NAME_RE.match(p) and ".." not in p for p in parts):
                raise HubError(400, f"Invalid repo id: {repo_id}")
        self.store.move_repo(repo_type, from_id, to_id)
        self._send_json({})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            try:
                import yaml  # a huggingface_hub dependency, so always there when the client is

                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
            except ImportError:
                pass
            except Exception as e:  # noqa: BLE001 - any YAML error is the card's fault
                errors.append({"message": f"Invalid YAML: {e}"})
        if errors:
            raise HubError(400, errors[0]["message"], body={"errors": errors, "warnings": []})
        self._send_json({"errors": [], "warnings": []})

    # ---------------------------------------------------------------- reading

    def _snapshot(self, repo_type: str, repo_id: str, revision: str) -> dict:
        return self.store.commit(repo_type, repo_id, self.store.resolve(repo_type, repo_id, revision))

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        with self.store.lock:
            meta = self.store.repo_meta(repo_type, repo_id)
            commit = self._snapshot(repo_type, repo_id, revision or "main")
        blobs = _truthy(self.query.get("blobs"))
        siblings = []
        for path in sorted(commit["files"]):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=commit["files"][path]["size"], blobId=commit["files"][path]["oid"])
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit["id"],
            "createdAt": meta["createdAt"],
            "lastModified": commit["date"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if blobs:
            info["usedStorage"] = sum(e["size"] for e in commit["files"].values())
        self._send_json(info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with self.store.lock:
            commit = self._snapshot(repo_type, repo_id, revision)
            expand = _truthy(self.query.get("expand"))
            history = self.store.history(repo_type, repo_id, commit["id"]) if expand else None
        files = commit["files"]
        path = path.strip("/")
        if path and not _is_dir(files, path):
            message = f"Path {path} is not a directory at revision {revision}"
            raise HubError(404, message, "EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
        prefix = path + "/" if path else ""
        recursive = _truthy(self.query.get("recursive"))
        paths: set[str] = set()
        for file_path in files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):
                paths.add(prefix + "/".join(parts[:i]))
        # Folders first, then files, each sorted: the order the Hub lists them in.
        ordered = sorted(paths, key=lambda p: (p in files, p))
        self._send_json([_entry_json(files, p, history) for p in ordered])

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        if self.headers.get("Content-Type", "").startswith("application/json"):
            payload = self._json_body()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[-1])
        with self.store.lock:
            commit = self._snapshot(repo_type, repo_id, revision)
            history = self.store.history(repo_type, repo_id, commit["id"]) if expand else None
        files = commit["files"]
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files or (path and _is_dir(files, path)):
                out.append(_entry_json(files, path, history))
        self._send_json(out)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        with self.store.lock:
            history = self.store.history(repo_type, repo_id, self.store.resolve(repo_type, repo_id, revision))
        self._send_json(
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": a} for a in c["authors"]],
                    "date": c["date"],
                }
                for c in history
            ]
        )

    def _list_refs(self, repo_type: str, repo_id: str) -> None:
        refs = self.store.refs(repo_type, repo_id)

        def items(kind: str, prefix: str) -> list[dict]:
            return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": c} for n, c in sorted(refs[kind].items())]

        out = {"branches": items("branches", "refs/heads/"), "converts": [], "tags": items("tags", "refs/tags/")}
        if _truthy(self.query.get("include_prs")):
            out["pullRequests"] = items("pulls", "refs/pr/")
        self._send_json(out)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with self.store.lock:
            commit = self._snapshot(repo_type, repo_id, revision)
        entry = commit["files"].get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache that the file is absent at this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit["id"]})
        blob = self.store.blob_path(entry["oid"])
        size = entry["size"]
        headers = {
            "X-Repo-Commit": commit["id"],
            "ETag": f'"{entry["oid"]}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip()) if range_header else None
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.truncate:
            # Half the promised bytes, then a closed connection: a download that breaks off midway.
            length //= 2
            self.close_connection = True
        with open(blob, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    # ---------------------------------------------------------------- writing

    def _create_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        payload = self._json_body()
        if kind == "branches":
            self.store.create_ref(repo_type, repo_id, kind, name, payload.get("startingPoint"))
        else:
            # create_tag posts to /tag/{revision} with the tag name in the body.
            self.store.create_ref(repo_type, repo_id, kind, payload.get("tag", ""), name)
        self._send_json({})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        payload = self._json_body()
        files = self._snapshot(repo_type, repo_id, revision)["files"]
        out = []
        for item in payload.get("files", []):
            path = item.get("path", "")
            existing = files.get(path)
            out.append(
                {
                    "path": path,
                    # Always "regular": the LFS path would go through Xet/S3, which this server does not provide.
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing["oid"] if existing else None,
                }
            )
        self._send_json({"files": out, "commitOid": None})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        if not self.store.repo_exists(repo_type, repo_id):
            raise _repo_not_found(repo_id)
        header: dict = {}
        operations: list[tuple[str, str, Any]] = []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise HubError(400, f"Invalid NDJSON line: {e}") from e
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                path = _clean_path_in_repo(value.get("path", ""))
                content = value.get("content", "")
                if value.get("encoding") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except ValueError as e:
                        raise HubError(400, f"Invalid base64 content for {path}") from e
                else:
                    data = content.encode()
                operations.append(("add", path, self.store.put_blob(data)))
            elif key == "lfsFile":
                path = _clean_path_in_repo(value.get("path", ""))
                entry = self.store.entry_for_sha256(value.get("oid", ""))
                if entry is None:
                    raise HubError(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                operations.append(("add", path, entry))
            elif key == "deletedFile":
                operations.append(("delete_file", _clean_path_in_repo(value.get("path", "")), None))
            elif key == "deletedFolder":
                operations.append(("delete_folder", _clean_path_in_repo(value.get("path", "").rstrip("/")), None))
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        if not header.get("summary"):
            raise HubError(400, "Commit summary (header line) is required")
        create_pr = _truthy(self.query.get("create_pr"))
        commit_id, pr_num = self.store.create_commit(
            repo_type,
            repo_id,
            revision,
            operations,
            header["summary"],
            header.get("description", ""),
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        repo_url = self._repo_url(repo_type, repo_id)
        self._send_json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{repo_url}/commit/{commit_id}",
                "hookOutput": "",
                "pullRequestUrl": f"{repo_url}/discussions/{pr_num}" if pr_num else None,
            }
        )


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: HubStore, verbose: bool):
        super().__init__(address, _Handler)
        self.store = store
        self.verbose = verbose
        self.url = f"http://{address[0]}:{self.server_address[1]}"
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.faults: list[Fault] = []

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The first injected fault matching the request, counting it as used."""
        with self._connections_lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    def track(self, connection: socket.socket, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Ends idle keep-alive connections, whose handler threads would otherwise wait for the client."""
        with self._connections_lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class LocalHubServer:
    """A Hugging Face Hub look-alike on `http://127.0.0.1:<port>`, storing its repos under `storage_dir`.

    Usage::

        with LocalHubServer(tmp_path / "hub", port=free_port()) as hub:
            os.environ["HF_ENDPOINT"] = hub.url  # must happen before huggingface_hub is imported
            ...

    Args:
        storage_dir: Directory for blobs, repos and commits; created if missing. A new server on the same directory
            serves the same repos.
        port: TCP port on 127.0.0.1; 0 lets the OS pick one (read it back from `port` / `url` after `start()`).
        username: Name returned by `whoami` and used as namespace for repos created without one.
        verbose: Log every request to stderr.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike,
        port: int = 0,
        username: str = DEFAULT_USERNAME,
        verbose: bool = False,
    ):
        self.storage_dir = Path(storage_dir)
        self.store = HubStore(self.storage_dir, username=username)
        self._requested_port = port
        self._verbose = verbose
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def username(self) -> str:
        """The user the server pretends every token belongs to."""
        return self.store.username

    @property
    def port(self) -> int:
        """The bound port (the requested one until `start()` has run)."""
        return self._server.server_address[1] if self._server else self._requested_port

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the socket is bound to; the host is always 127.0.0.1."""
        if self._server is None:
            return ("127.0.0.1", self._requested_port)
        host, port = self._server.server_address[:2]
        return (host, port)

    @property
    def url(self) -> str:
        """The endpoint to use as `HF_ENDPOINT`, e.g. `http://127.0.0.1:8123`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "LocalHubServer":
        """Binds 127.0.0.1:`port` and serves in a daemon thread. Returns `self`."""
        if self._server is not None:
            raise RuntimeError("LocalHubServer is already started")
        self._server = _HubHTTPServer(("127.0.0.1", self._requested_port), self.store, self._verbose)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"local-hub-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and frees the port; storage is left in place. Safe to call twice."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        self._requested_port = server.server_address[1]
        self._server = self._thread = None

    def inject_fault(self, fault: Fault) -> Fault:
        """Makes the server fail matching requests (see [`Fault`]); returns it, so a test can read `times` left."""
        if self._server is None:
            raise RuntimeError("Start the server before injecting faults.")
        self._server.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Removes every injected fault."""
        if self._server is not None:
            self._server.faults.clear()

    def __enter__(self) -> "LocalHubServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalHubServer(url={self.url!r}, storage_dir={str(self.storage_dir)!r}, running={self.running})"
