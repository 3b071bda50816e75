"""A small local Hugging Face Hub: just the API calls huggingface_hub makes to publish a model.

Point the client at it with HF_ENDPOINT (and HF_HUB_DISABLE_XET=1: uploads then take the LFS
path; the Xet storage protocol is not implemented here). Shapes follow huggingface_hub 1.x
(hf_api.py, _commit_api.py, lfs.py) and the git-lfs batch API:

  GET  /api/whoami-v2
  POST /api/repos/create                               {name, organization, visibility|private, type}
  GET  /api/{models,datasets,spaces}/NS/NAME[/revision/REV]
  POST /api/models/NS/NAME/branch/BRANCH
  POST /api/validate-yaml                              {content, repoType}
  POST /api/models/NS/NAME/preupload/REV               {files: [{path, sample, size}]}
  POST /NS/NAME.git/info/lfs/objects/batch             git-lfs batch (basic + multipart)
  PUT  /__lfs/OID  |  PUT /__lfs/OID/part/N + POST /__lfs/OID/complete   (storage, no auth)
  POST /__lfs/verify
  POST /api/models/NS/NAME/commit/REV                  ndjson: header, file, lfsFile, deletedFile
  GET  /api/{models,datasets}/NS/NAME/tree/REV         the file listing (recursive; LFS files with lfs.oid)
  HEAD|GET /[datasets/]NS/NAME/resolve/REV/PATH        a file: X-Repo-Commit, ETag (git sha1) or
                                                       X-Linked-Etag (sha256, LFS), as hf_hub_download reads them

Repos start with the Hub's initial commit (a .gitattributes); committing an LFS file that no
pattern covers appends it to .gitattributes, as the Hub does. Tests read the state directly
(``files``, ``commits``) and the request log (``requests``, ``lfs_events``), and inject faults
into LFS uploads (``fail_lfs_upload``).
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The .gitattributes the Hub writes into a new model repo (LFS part, as of 2024-2025).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)
REGULAR_MAX = 10 * 1024 * 1024  # larger files must go through LFS
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Entry:
    lfs: bool
    oid: str  # sha256 for LFS files, git blob sha1 for regular ones (what preupload returns)
    size: int
    content: bytes | None  # regular files only; LFS content lives in FakeHub.lfs


@dataclasses.dataclass
class Commit:
    sha: str
    parent: str | None
    summary: str
    description: str
    tree: dict[str, Entry]


@dataclasses.dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    refs: dict[str, str]
    commits: dict[str, Commit]


@dataclasses.dataclass
class Fault:
    oid: str
    kind: str  # "status" (answer `status`) or "drop" (close the connection without an answer)
    status: int
    remaining: int


class FakeHub:
    def __init__(self, *, users: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None,
                 multipart_threshold: int | None = None, part_size: int = 256 * 1024):
        self.users = users or {"hf_fake_write_token_0123456789": "alice"}  # token -> user
        self.orgs = orgs or {"alice": ["acme"]}
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.parts: dict[tuple[str, int], bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lfs_events: list[tuple[str, str]] = []  # (oid, stored|rejected|dropped|part)
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---------------------------------------------------------------- test helpers

    def add_repo(self, repo_id: str, repo_type: str = "model", files: dict[str, bytes] | None = None,
                 private: bool = False) -> Repo:
        with self.lock:
            repo = self._create(repo_type, repo_id, private)
            if files:
                tree = dict(repo.commits[repo.refs["main"]].tree)
                for path, data in files.items():
                    tree[path] = Entry(False, git_blob_sha1(data), len(data), data)
                self._commit(repo, "main", tree, "seed files", "")
            return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """path -> content of a revision (LFS content resolved)."""
        repo = self.repos[("model", repo_id)]
        tree = repo.commits[repo.refs[revision]].tree
        return {p: (self.lfs[e.oid] if e.lfs else e.content) for p, e in tree.items()}

    def entries(self, repo_id: str, revision: str = "main") -> dict[str, Entry]:
        repo = self.repos[("model", repo_id)]
        return dict(repo.commits[repo.refs[revision]].tree)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """Commits of a branch, newest first."""
        repo = self.repos[("model", repo_id)]
        out, sha = [], repo.refs.get(revision)
        while sha:
            out.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return out

    def fail_lfs_upload(self, oid: str, *, times: int = 1, status: int = 400, drop: bool = False) -> None:
        """The next `times` uploads of object `oid` fail (HTTP `status`, or a dropped connection)."""
        with self.lock:
            self.faults.append(Fault(oid, "drop" if drop else "status", status, times))

    def writes(self) -> list[tuple[str, str, int]]:
        """Requests that change state (anything but GETs and validation)."""
        return [r for r in self.requests if r[0] != "GET" and not r[1].startswith("/api/validate-yaml")]

    # ---------------------------------------------------------------- state changes

    def _create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private, {}, {})
        self.repos[(repo_type, repo_id)] = repo
        data = DEFAULT_GITATTRIBUTES.encode()
        self._commit(repo, "main", {".gitattributes": Entry(False, git_blob_sha1(data), len(data), data)},
                     "initial commit", "")
        return repo

    def _commit(self, repo: Repo, branch: str, tree: dict[str, Entry], summary: str, description: str) -> str:
        parent = repo.refs.get(branch)
        digest = hashlib.sha1(
            json.dumps([parent, summary, sorted((p, e.oid) for p, e in tree.items()), time.time_ns()]).encode()
        ).hexdigest()
        repo.commits[digest] = Commit(digest, parent, summary, description, tree)
        repo.refs[branch] = digest
        return digest


def _lfs_patterns(tree: dict[str, Entry]) -> list[str]:
    entry = tree.get(".gitattributes")
    if entry is None or entry.content is None:
        return []
    return [line.split()[0] for line in entry.content.decode().splitlines() if "filter=lfs" in line]


def _matches(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(path, p) or ("/" not in p and fnmatch.fnmatch(name, p)) for p in patterns)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # -- plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: object = None, headers: dict | None = None) -> None:
        payload = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
        with self.fake.lock:
            self.fake.requests.append((self.command, self.path, status))

    def _user(self, required: bool) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            if required:
                raise _HTTPError(401, "Invalid username or password.")
            return None
        user = self.fake.users.get(token)
        if user is None:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: str | None, repo_id: str) -> None:
        ns = repo_id.split("/")[0]
        if user is None or (ns != user and ns not in self.fake.orgs.get(user, [])):
            raise _HTTPError(403, f"You don't have the rights to write to {repo_id}")

    def _repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.fake.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (user is None or user != repo_id.split("/")[0]
                                              and repo_id.split("/")[0] not in self.fake.orgs.get(user, []))):
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    def _head(self, repo: Repo, revision: str) -> str:
        sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        try:
            with self.fake.lock:
                handled = self._route(method, path, query)
            if handled is not None:
                status, body = handled
                self._send(status, body)
        except _HTTPError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message}, headers)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # -- routes

    def _route(self, method: str, path: str, query: dict):
        fake = self.fake
        if path == "/api/whoami-v2" and method == "GET":
            user = self._user(required=True)
            return 200, {"type": "user", "name": user, "orgs": [{"name": o} for o in fake.orgs.get(user, [])],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}
        if path == "/api/repos/create" and method == "POST":
            user = self._user(required=True)
            body = json.loads(self._body())
            repo_type = body.get("type") or "model"
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            self._can_write(user, repo_id)
            if (repo_type, repo_id) in fake.repos:
                raise _HTTPError(409, f"You already created this {repo_type} repo")
            private = body.get("visibility") == "private" or bool(body.get("private"))
            fake._create(repo_type, repo_id, private)
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            return 200, {"url": f"{fake.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id}
        if path == "/api/validate-yaml" and method == "POST":
            self._user(required=False)
            content = json.loads(self._body())["content"]
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(m.group(1)) if m else {}
            except yaml.YAMLError as e:
                return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
            return 200, {"errors": [], "warnings": []}
        if path.startswith("/__lfs/"):
            return self._storage(method, path)
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            return self._lfs_batch(TYPES.get(m.group(1) or "models"), f"{m.group(2)}/{m.group(3)}")
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)/tree/([^/]+)", path)
        if m and method == "GET":
            return self._tree(TYPES[m.group(1)], f"{m.group(2)}/{m.group(3)}", unquote(m.group(4)))
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(method, TYPES.get(m.group(1) or "models"), f"{m.group(2)}/{m.group(3)}",
                                 unquote(m.group(4)), unquote(m.group(5)))
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(revision|preupload|commit|branch)/(.+))?", path)
        if m:
            repo_type, repo_id = TYPES[m.group(1)], f"{m.group(2)}/{m.group(3)}"
            action, rev = m.group(4), unquote(m.group(5) or "main")
            if method == "GET" and action in (None, "revision"):
                return self._info(repo_type, repo_id, rev)
            if method == "POST" and action == "preupload":
                return self._preupload(repo_type, repo_id, rev)
            if method == "POST" and action == "commit":
                return self._commit(repo_type, repo_id, rev, query)
            if method == "POST" and action == "branch":
                user = self._user(required=True)
                self._can_write(user, repo_id)
                repo = self._repo(repo_type, repo_id, user)
                if rev in repo.refs:
                    raise _HTTPError(409, f"Reference already exists: {rev}")
                body = json.loads(self._body() or b"{}")
                repo.refs[rev] = self._head(repo, body.get("startingPoint") or "main")
                return 200, {}
        raise _HTTPError(404, f"no route for {method} {path}")

    def _info(self, repo_type: str, repo_id: str, rev: str):
        user = self._user(required=False)
        repo = self._repo(repo_type, repo_id, user)
        sha = self._head(repo, rev)
        tree = repo.commits[sha].tree
        info = {"_id": repo_id, "id": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "private": repo.private, "lastModified": "2025-01-01T00:00:00.000Z", "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(tree)]}
        if repo_type == "model":
            info["modelId"] = repo_id
        readme = tree.get("README.md")
        if readme is not None and readme.content:
            m = re.match(r"^---\n(.*?)\n---\n", readme.content.decode(), re.S)
            if m:
                info["cardData"] = yaml.safe_load(m.group(1))
        return 200, info

    def _tree(self, repo_type: str, repo_id: str, rev: str):
        repo = self._repo(repo_type, repo_id, self._user(required=False))
        out = []
        for path, e in sorted(repo.commits[self._head(repo, rev)].tree.items()):
            if e.lfs:  # git stores the LFS pointer; its blob id is what the tree lists as oid
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{e.oid}\nsize {e.size}\n".encode()
                out.append({"type": "file", "path": path, "size": e.size, "oid": git_blob_sha1(pointer),
                            "lfs": {"oid": e.oid, "size": e.size, "pointerSize": len(pointer)}})
            else:
                out.append({"type": "file", "path": path, "size": e.size, "oid": e.oid})
        return 200, out

    def _resolve(self, method: str, repo_type: str, repo_id: str, rev: str, path: str):
        repo = self._repo(repo_type, repo_id, self._user(required=False))
        sha = self._head(repo, rev)
        entry = repo.commits[sha].tree.get(path)
        if entry is None:
            raise _HTTPError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        data = self.fake.lfs[entry.oid] if entry.lfs else entry.content
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.oid}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.oid}"', "X-Linked-Size": str(entry.size)})
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method == "GET":
            self.wfile.write(data)
        self.fake.requests.append((method, self.path, 200))
        return None

    def _preupload(self, repo_type: str, repo_id: str, rev: str):
        user = self._user(required=True)
        self._can_write(user, repo_id)
        repo = self._repo(repo_type, repo_id, user)
        sha = self._head(repo, rev)
        tree = repo.commits[sha].tree
        patterns = _lfs_patterns(tree)
        out = []
        for f in json.loads(self._body())["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = _matches(f["path"], patterns) or f["size"] >= REGULAR_MAX or b"\0" in sample
            entry = tree.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": entry.oid if entry else None})
        return 200, {"files": out, "commitOid": sha}

    def _lfs_batch(self, repo_type: str, repo_id: str):
        user = self._user(required=True)
        self._can_write(user, repo_id)
        self._repo(repo_type, repo_id, user)
        body = json.loads(self._body())
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.fake.lfs:
                base = f"{self.fake.url}/__lfs/{oid}"
                if self.fake.multipart_threshold is not None and size > self.fake.multipart_threshold:
                    n = -(-size // self.fake.part_size)
                    header = {"chunk_size": str(self.fake.part_size)}
                    header.update({str(i): f"{base}/part/{i}" for i in range(1, n + 1)})
                    upload = {"href": f"{base}/complete", "header": header}
                else:
                    upload = {"href": base}
                item["actions"] = {"upload": upload, "verify": {"href": f"{self.fake.url}/__lfs/verify", "header": {}}}
            objects.append(item)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _storage(self, method: str, path: str):
        fake = self.fake
        if path == "/__lfs/verify" and method == "POST":
            self._user(required=True)
            body = json.loads(self._body())
            data = fake.lfs.get(body["oid"])
            if data is None or len(data) != body["size"]:
                raise _HTTPError(404, "object not found")
            return 200, {}
        m = re.fullmatch(r"/__lfs/([0-9a-f]{64})(?:/(part)/(\d+)|/(complete))?", path)
        if not m:
            raise _HTTPError(404, "no such storage path")
        oid = m.group(1)
        if method == "PUT":
            data = self._body()
            fault = next((f for f in fake.faults if f.oid == oid and f.remaining > 0), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.kind == "drop":
                    fake.lfs_events.append((oid, "dropped"))
                    fake.requests.append((self.command, self.path, 0))
                    self.close_connection = True
                    return None
                fake.lfs_events.append((oid, "rejected"))
                raise _HTTPError(fault.status, "Request has expired")
            if m.group(2):
                fake.parts[(oid, int(m.group(3)))] = data
                fake.lfs_events.append((oid, "part"))
                etag = hashlib.md5(data).hexdigest()
                self._send(200, None, {"ETag": f'"{etag}"'})
                return None
            return self._store(oid, data)
        if method == "POST" and m.group(4):
            body = json.loads(self._body())
            chunks = []
            for part in body["parts"]:
                data = fake.parts.get((oid, part["partNumber"]))
                if data is None or f'"{hashlib.md5(data).hexdigest()}"' != part["etag"]:
                    raise _HTTPError(400, f"bad part {part['partNumber']}")
                chunks.append(data)
            return self._store(oid, b"".join(chunks))
        raise _HTTPError(405, "method not allowed")

    def _store(self, oid: str, data: bytes):
        if hashlib.sha256(data).hexdigest() != oid:
            self.fake.lfs_events.append((oid, "corrupt"))
            raise _HTTPError(400, "content does not match its sha256")
        self.fake.lfs[oid] = data
        self.fake.lfs_events.append((oid, "stored"))
        return 200, {}

    def _commit(self, repo_type: str, repo_id: str, rev: str, query: dict):
        user = self._user(required=True)
        self._can_write(user, repo_id)
        repo = self._repo(repo_type, repo_id, user)
        head = self._head(repo, rev)
        if rev not in repo.refs:
            raise _HTTPError(400, f"cannot commit to {rev}: not a branch")
        tree = dict(repo.commits[head].tree)
        header = None
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                if value.get("parentCommit") and value["parentCommit"] != head:
                    raise _HTTPError(412, "parent commit is not the head of the branch")
            elif key == "file":
                data = base64.b64decode(value["content"])
                if len(data) > REGULAR_MAX:
                    raise _HTTPError(400, f"{value['path']} is too large for a regular file; use LFS")
                tree[value["path"]] = Entry(False, git_blob_sha1(data), len(data), data)
            elif key == "lfsFile":
                data = self.fake.lfs.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise _HTTPError(422, f"Your push was rejected because an LFS pointer pointed to a file that "
                                          f"does not exist: {value['path']}")
                tree[value["path"]] = Entry(True, value["oid"], len(data), None)
                if not _matches(value["path"], _lfs_patterns(tree)):
                    attrs = tree[".gitattributes"].content or b""
                    attrs += f"{value['path']} filter=lfs diff=lfs merge=lfs -text\n".encode()
                    tree[".gitattributes"] = Entry(False, git_blob_sha1(attrs), len(attrs), attrs)
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            else:
                raise _HTTPError(400, f"unsupported commit operation {key}")
        if header is None:
            raise _HTTPError(400, "missing commit header")
        sha = self.fake._commit(repo, rev, tree, header["summary"], header.get("description", ""))
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.fake.url}/{repo_id}/commit/{sha}",
                     "hookOutput": ""}
