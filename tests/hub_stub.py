"""A loopback Hugging Face Hub for tests: the part of the Hub protocol the real `huggingface_hub` client
uses to create repos, upload (preupload, LFS batch + PUT, NDJSON commit), and download (revision info,
resolve with `ETag` / `X-Repo-Commit`), for model repos and Spaces.

Stdlib only, in memory, on 127.0.0.1. Clients must run with `HF_ENDPOINT=<stub.endpoint>` and
`HF_HUB_DISABLE_XET=1` (hub 2.x always uploads through Xet otherwise), both set before `huggingface_hub`
is imported: run them in subprocesses. See hf-ecosystem notes, section 4.6.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# What the real Hub stores in LFS: binary weights and images (decided server-side from .gitattributes).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".jpeg", ".npz", ".onnx")
GITATTRIBUTES = "".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES
).encode()


# The route patterns' repo parts: the API's type segment, the download/LFS URLs' type prefix (none for a
# model), and `org/name`.
API = r"(?P<kind>models|spaces)"
PREFIX = r"(?:(?P<kind>spaces)/)?"
REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, the Hub's ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    """One file of a commit: its bytes, and whether it was uploaded through LFS."""

    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


def repo_key(repo_id: str, kind: str | None = None) -> str:
    """The stub's key of a repo, its path on the Hub: `org/name` for a model, `spaces/org/name` for a Space.
    `kind` is the URL's type segment (`models`, `spaces`; None for a model) or `create_repo`'s `type`."""
    return repo_id if kind in (None, "models", "model") else f"spaces/{repo_id}"


@dataclass
class Repo:
    """A model repo or a Space: branches point to commits, a commit is a full snapshot
    `{path: StoredFile}`. `sdk` is a Space's (`gradio`, ...), None for a model."""

    repo_id: str
    private: bool
    sdk: str | None = None
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """The commit sha of a branch name or a full sha, or None."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def commit(self, parent: str | None, files: dict[str, StoredFile], message: str) -> str:
        sha = hashlib.sha1(
            json.dumps([parent, message, sorted((p, f.etag) for p, f in files.items())]).encode()
        ).hexdigest()
        self.commits[sha] = files
        return sha


class HubStub:
    """The loopback Hub. Use as a context manager; `endpoint` is its base URL.

    `repos` and `files` key a model by `org/name` and a Space by `spaces/org/name`, as in the Hub's URLs.
    Writes, and reads of private repos, need `Authorization: Bearer <token>` when `token` is set.
    `requests` records `(method, path)` of every request, `unhandled` those the stub does not know (a test
    should assert it is empty), `authorizations` every Authorization header received.
    """

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.authorizations: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo (`org/name`, or `spaces/org/name`) at a revision, for assertions."""
        repo = self.repos[repo_id]
        return {path: f.data for path, f in repo.commits[repo.resolve(revision)].items()}

    # -- the protocol ---------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                stub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                stub._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                stub._dispatch(self, "POST")

            def do_PUT(self) -> None:
                stub._dispatch(self, "PUT")

        return Handler

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        auth = h.headers.get("Authorization")
        with self.lock:
            self.requests.append((method, path))
            if auth:
                self.authorizations.append(auth)
        body = self._read_body(h) if method in ("POST", "PUT") else b""
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda h, m, b: self._json(h, {"errors": [], "warnings": []})),
            # huggingface_hub's agent detection fetches this registry once a day (best effort).
            (
                "GET",
                r"/api/agent-harnesses",
                lambda h, m, b: self._json(h, {"standardEnvVars": [], "harnesses": {}}),
            ),
            ("POST", rf"/api/{API}/{REPO}/preupload/(?P<rev>.+)", self._preupload),
            ("POST", rf"/api/{API}/{REPO}/commit/(?P<rev>.+)", self._commit),
            ("POST", rf"/api/{API}/{REPO}/branch/(?P<branch>.+)", self._create_branch),
            ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("GET", rf"/api/{API}/{REPO}/tree/(?P<rev>[^/]+)", self._tree),
            ("GET", rf"/api/{API}/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>.+))?", self._repo_info),
            ("GET|HEAD", rf"/{PREFIX}{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method in methods.split("|") and match:
                params = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
                if "repo" in params:  # handlers see the repo's key, whatever its type
                    params["repo"] = repo_key(params["repo"], params.pop("kind"))
                return handler(h, method, body, **params)
        with self.lock:
            self.unhandled.append((method, path))
        self._error(h, 404, "NotFound", f"the stub Hub has no route for {method} {path}")

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    h.rfile.readline()
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    def _send(self, h, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, data, status: int = 200) -> None:
        self._send(h, status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(
        self, h, status: int, code: str, message: str, head: bool = False, headers: dict | None = None
    ):
        headers = {
            "X-Error-Code": code,
            "X-Error-Message": message,
            "Content-Type": "application/json",
            **(headers or {}),
        }
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head=head)

    def _authorized(self, h) -> bool:
        return self.token is None or h.headers.get("Authorization") == f"Bearer {self.token}"

    def _writable_repo(self, h, repo_id: str, head: bool = False) -> Repo | None:
        if not self._authorized(h):
            self._error(h, 401, "Unauthorized", "Invalid credentials in Authorization header", head=head)
            return None
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def _readable_repo(self, h, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(h)):
            self._error(h, 401 if repo else 404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            return None
        return repo

    def _create_repo(self, h, method, body) -> None:
        if not self._authorized(h):
            return self._error(h, 401, "Unauthorized", "Invalid credentials in Authorization header")
        payload = json.loads(body)
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        )
        key, kind = repo_key(repo_id, payload.get("type")), payload.get("type") or "model"
        if kind == "space" and not payload.get("sdk"):
            return self._error(h, 400, "BadRequest", "a Space needs an sdk (gradio, docker, static)")
        with self.lock:
            if key in self.repos:  # the Hub's 409 carries the url too (create_repo(exist_ok=True) reads it)
                body = {"error": f"You already created this {kind} repo", "url": f"{self.endpoint}/{key}"}
                return self._send(h, 409, json.dumps(body).encode(), {"Content-Type": "application/json"})
            repo = Repo(
                repo_id,
                private=payload.get("visibility") == "private" or bool(payload.get("private")),
                sdk=payload.get("sdk"),
            )
            # Like the Hub: a new repo has one commit holding .gitattributes.
            repo.branches["main"] = repo.commit(
                None, {".gitattributes": StoredFile(GITATTRIBUTES, False)}, "initial"
            )
            self.repos[key] = repo
        self._json(h, {"url": f"{self.endpoint}/{key}", "name": repo_id})

    def _create_branch(self, h, method, body, repo: str, branch: str) -> None:
        stored = self._writable_repo(h, repo)
        if stored is None:
            return
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        with self.lock:
            if branch in stored.branches:
                return self._error(h, 409, "BranchExists", f"branch {branch} already exists")
            sha = stored.resolve(start)
            if sha is None:
                return self._error(h, 404, "RevisionNotFound", f"revision {start} not found")
            stored.branches[branch] = sha
        self._json(h, {})

    def _preupload(self, h, method, body, repo: str, rev: str) -> None:
        if self._writable_repo(h, repo) is None:
            return
        files = json.loads(body)["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].lower().endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for f in files
        ]
        self._json(h, {"files": modes})

    def _lfs_batch(self, h, method, body, repo: str) -> None:
        if self._writable_repo(h, repo) is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:  # already stored: no action, the client skips the upload
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._json(h, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, h, method, body, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(h, 400, "BadRequest", "sha256 of the uploaded content does not match the oid")
        with self.lock:
            self.lfs_objects[oid] = body
        self._send(h, 200, b"")

    def _commit(self, h, method, body, repo: str, rev: str) -> None:
        stored = self._writable_repo(h, repo)
        if stored is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.lock:
            parent = stored.resolve(rev)
            if parent is None:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(stored.commits[parent])
            message = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs_objects:
                        return self._error(
                            h, 400, "BadRequest", f"LFS object {value['oid']} was never uploaded"
                        )
                    files[value["path"]] = StoredFile(self.lfs_objects[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {
                        p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")
                    }
                else:
                    return self._error(h, 400, "BadRequest", f"unknown commit operation {key}")
            sha = stored.commit(parent, files, message)
            if rev not in stored.branches:
                return self._error(h, 400, "BadRequest", f"commits go to a branch, not to {rev}")
            stored.branches[rev] = sha
        self._json(
            h, {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "success": True}
        )

    def _repo_info(self, h, method, body, repo: str, rev: str | None = None) -> None:
        stored = self._readable_repo(h, repo)
        if stored is None:
            return
        sha = stored.resolve(rev or "main")
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        siblings = [{"rfilename": p, "size": len(f.data)} for p, f in sorted(stored.commits[sha].items())]
        self._json(
            h,
            {
                "id": stored.repo_id,
                "modelId": stored.repo_id,
                "sha": sha,
                "private": stored.private,
                "siblings": siblings,
                "tags": [],
                **({"sdk": stored.sdk} if stored.sdk else {}),
            },
        )

    def _tree(self, h, method, body, repo: str, rev: str) -> None:
        # Every file at any depth (folders are implied by the paths): the recursive listing; one page.
        stored = self._readable_repo(h, repo)
        if stored is None:
            return
        sha = stored.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        entries = []
        for path, f in sorted(stored.commits[sha].items()):
            entry = {"type": "file", "path": path, "size": len(f.data), "oid": git_blob_sha1(f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": f.etag, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        self._json(h, entries)

    def _resolve(self, h, method, body, repo: str, rev: str, file: str) -> None:
        head = method == "HEAD"
        stored = self._readable_repo(h, repo, head=head)
        if stored is None:
            return
        sha = stored.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        entry = stored.commits[sha].get(file)
        if entry is None:
            return self._error(
                h, 404, "EntryNotFound", f"{file} does not exist", head=head, headers={"X-Repo-Commit": sha}
            )
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry.etag}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(h, 200, entry.data, headers, head=head)
