"""A small Hugging Face Hub-compatible server for tests, on 127.0.0.1 (standard library only).

It speaks the endpoints the real ``huggingface_hub`` client uses (see shared/HUB.md): repo and
revision info, the tree listing, HEAD/GET resolve with ``X-Repo-Commit`` and ETags, the
``X-Error-Code`` errors, and for pushes: repo creation, branches, preupload, the LFS batch API with
upload and verify, NDJSON commits and ``validate-yaml``. Repos live in memory as commits of whole
file maps. Tokens: ``WRITE_TOKEN`` may write, ``READ_TOKEN`` only read; any other token is refused
with 401, as the Hub refuses invalid credentials; private repos look missing without a token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

WRITE_TOKEN = "hf_test_write_6c1f0e2a9b"
READ_TOKEN = "hf_test_read_91d2b7c4e0"
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_oid(self.data)


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)             # name -> commit
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    extra_names: list[str] = field(default_factory=list)     # listed (and served) as is

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)      # sha256 -> bytes (uploaded)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, auth
    lock: threading.Lock = field(default_factory=threading.Lock)

    def commit(self, repo: Repo, branch: str, files: dict[str, StoredFile],
               message: str) -> str:
        parent = repo.branches.get(branch, "")
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path].etag.encode())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False,
                 branch: str = "main", message: str = "initial") -> str:
        """Create (or extend) a repo from plain bytes; returns the new commit."""
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        current = dict(repo.commits.get(repo.branches.get(branch, ""), {}))
        current.update({p: StoredFile(d, p.endswith(LFS_SUFFIXES)) for p, d in files.items()})
        return self.commit(repo, branch, current, message)


class HubHandler(BaseHTTPRequestHandler):
    server_version = "TestHub/1.0"
    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> HubState:
        return self.server.state

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        return self.body

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _parts(self) -> tuple[list[str], dict]:
        url = urlsplit(self.path)
        return [unquote(p) for p in url.path.split("/")[1:]], parse_qs(url.query)

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""   # always, for keep-alive
        with self.state.lock:
            self.state.log.append((self.command, self.path, self._token()))
        token = self._token()
        if token is not None and token not in (WRITE_TOKEN, READ_TOKEN):
            return self._error(401, None, "Invalid credentials in Authorization header")
        parts, query = self._parts()
        try:
            handled = self._route(parts, query)
        except (ValueError, KeyError) as exc:
            return self._error(400, None, f"bad request: {exc}")
        if not handled:
            self._error(404, None, f"no route for {self.command} {self.path}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _route(self, parts: list[str], query: dict) -> bool:
        method = self.command
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if method == "GET" and not rest:
                return self._info(repo_id, "main") or True
            if method == "GET" and rest[0] == "revision" and len(rest) >= 2:
                return self._info(repo_id, "/".join(rest[1:])) or True
            if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:])) or True
            if method == "POST" and rest[0] in ("preupload", "commit", "branch") and len(rest) >= 2:
                handler = {"preupload": self._preupload, "commit": self._commit,
                           "branch": self._branch}[rest[0]]
                return handler(repo_id, "/".join(rest[1:])) or True
            return False
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create() or True
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []}) or True
        if method == "PUT" and parts[:1] == ["lfs-upload"] and len(parts) == 2:
            return self._lfs_put(parts[1]) or True
        if method == "POST" and parts[:1] == ["lfs-verify"] and len(parts) == 2:
            return self._lfs_verify(parts[1]) or True
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") \
                and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(parts[0] + "/" + parts[1][:-4]) or True
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:])) or True
        return False

    # ------------------------------------------------------------------ reads

    def _readable(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self._token() is None):
            self._error(401 if self._token() is None else 404, "RepoNotFound",
                        "Repository not found")
            return None
        return repo

    def _commit_files(self, repo_id: str, revision: str):
        repo = self._readable(repo_id)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha, repo.commits[sha]

    def _info(self, repo_id: str, revision: str) -> None:
        found = self._commit_files(repo_id, revision)
        if found is None:
            return
        repo, sha, files = found
        names = sorted(files) + repo.extra_names
        self._json(200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": sha,
                         "private": repo.private, "disabled": False, "gated": False,
                         "downloads": 0, "likes": 0, "tags": [], "lastModified":
                         "2025-01-01T00:00:00.000Z", "siblings": [{"rfilename": n}
                                                                  for n in names]})

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        found = self._commit_files(repo_id, revision)
        if found is None:
            return
        repo, _, files = found
        entries = []
        for path in sorted(files) + repo.extra_names:
            if folder and not path.startswith(folder + "/"):
                continue
            stored = files.get(path) or StoredFile(b"outside", False)
            entry = {"type": "file", "oid": git_blob_oid(stored.data), "size": len(stored.data),
                     "path": path}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.etag, "size": len(stored.data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        found = self._commit_files(repo_id, revision)
        if found is None:
            return
        repo, sha, files = found
        stored = files.get(path)
        if stored is None and path in repo.extra_names:   # a hostile server serves it too
            stored = StoredFile(b"written outside the target folder\n", False)
        if stored is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}")
        data, status, headers = stored.data, 200, {"X-Repo-Commit": sha,
                                                   "ETag": f'"{stored.etag}"',
                                                   "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.etag}"', "X-Linked-Size": str(len(data))})
        start = self._range_start()
        if start and self.command == "GET":
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        self._send(status, data, headers, content_type="application/octet-stream")

    def _range_start(self) -> int:
        value = self.headers.get("Range") or ""
        if value.startswith("bytes=") and value.endswith("-"):
            return int(value[len("bytes="):-1] or 0)
        return 0

    # ------------------------------------------------------------------ writes

    def _writer(self) -> bool:
        token = self._token()
        if token is None:
            self._error(401, None, "You must be authenticated to write")
            return False
        if token != WRITE_TOKEN:
            self._error(403, None, "This token has no write access")
            return False
        return True

    def _writable(self, repo_id: str) -> Repo | None:
        if not self._writer():
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _create(self) -> None:
        if not self._writer():
            return
        body = json.loads(self._body() or b"{}")
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        url = {"url": f"http://{self.headers.get('Host')}/{repo_id}", "name": repo_id}
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, dict(url, error="You already created this model repo"))
            private = bool(body.get("private")) or body.get("visibility") == "private"
            repo = self.state.repos[repo_id] = Repo(private=private)
            attributes = StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)
            self.state.commit(repo, "main", {".gitattributes": attributes}, "initial commit")
        self._json(200, url)

    def _branch(self, repo_id: str, branch: str) -> None:
        repo = self._writable(repo_id)
        if repo is None:
            return
        body = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            return self._error(409, None, f"Branch {branch} already exists")
        start = repo.resolve(body.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "RevisionNotFound", "Invalid starting point")
        repo.branches[branch] = start
        self._json(200, {})

    def _preupload(self, repo_id: str, revision: str) -> None:
        if not self._writer():
            return
        body = json.loads(self._body())
        files = [{"path": f["path"], "shouldIgnore": False,
                  "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                 for f in body["files"]]
        self._json(200, {"files": files})

    def _lfs_batch(self, repo_id: str) -> None:
        if not self._writer():
            return
        body = json.loads(self._body())
        host = f"http://{self.headers.get('Host')}"
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{host}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{host}/lfs-verify/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, None, "sha256 mismatch")
        with self.state.lock:
            self.state.lfs[oid] = data
        self._send(200)

    def _lfs_verify(self, oid: str) -> None:
        if not self._writer():
            return
        body = json.loads(self._body())
        ok = oid in self.state.lfs and len(self.state.lfs[oid]) == body["size"]
        self._json(200 if ok else 404, {"message": "ok" if ok else "object not found"})

    def _commit(self, repo_id: str, revision: str) -> None:
        repo = self._writable(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        with self.state.lock:
            if revision not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = dict(repo.commits[repo.branches[revision]])
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    if value["oid"] not in self.state.lfs:
                        return self._error(400, None, f"LFS object {value['oid']} missing")
                    files[value["path"]] = StoredFile(self.state.lfs[value["oid"]], True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
            sha = self.state.commit(repo, revision, files, header.get("summary", ""))
        host = f"http://{self.headers.get('Host')}"
        self._json(200, {"success": True, "commitOid": sha,
                         "commitUrl": f"{host}/{repo_id}/commit/{sha}"})


class TestHub:
    """A running server: ``endpoint``, ``state`` (repos, request log); ``stop()`` ends it."""

    __test__ = False   # not a pytest test class

    def __init__(self) -> None:
        self.state = HubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
        self.httpd.daemon_threads = True
        self.httpd.state = self.state
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_hub(monkeypatch, tmp_path):
    """Generator for a pytest fixture: a running TestHub, with huggingface_hub pointed at nothing
    else: Xet and telemetry off, online, a fresh cache under ``tmp_path``, no token from the
    environment or a stored login, no progress bars."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name, value in (("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True),
                        ("HF_HUB_DISABLE_TELEMETRY", True),
                        ("HF_HUB_CACHE", str(tmp_path / "hf-cache")),
                        ("HF_TOKEN_PATH", str(tmp_path / "no-stored-token")),
                        ("HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))):
        monkeypatch.setattr(constants, name, value)
    disable_progress_bars()
    server = TestHub()
    try:
        yield server
    finally:
        server.stop()
        enable_progress_bars()
