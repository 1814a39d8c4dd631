"""A local stand-in for the Hugging Face Hub's upload and download API, served on loopback.

It answers the requests the real ``huggingface_hub`` client makes to publish a folder and to
download from it, so that ``surgeon push`` and every command that takes a repo id can be exercised
end to end without the internet::

    with HubStandIn() as hub:                     # http://127.0.0.1:<free port>
        # HF_ENDPOINT=hub.url HF_HUB_DISABLE_XET=1 (or surgeon.publish.push.push_folder(..., endpoint=hub.url))
        ...
        hub.files("acme/tiny-merge")              # {path: bytes} of what arrived on "main"
        hub.card("acme/tiny-merge")               # the README.md that arrived

    python -m surgeon.demo.hub_standin --port 8999     # serve until Ctrl-C, printing the env to set

Endpoints (model, dataset and space repos alike): ``POST /api/repos/create``,
``POST /api/{type}s/{repo}/branch/{branch}``, ``POST /api/validate-yaml``,
``POST /api/{type}s/{repo}/preupload/{rev}``, ``POST /{repo}.git/info/lfs/objects/batch`` with
``PUT /lfs-upload/{oid}`` (basic transfer, sha256 checked), ``POST /api/{type}s/{repo}/commit/{rev}``
(NDJSON), ``GET /api/{type}s/{repo}[/revision/{rev}]``, ``GET /api/{type}s/{repo}/refs``,
``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``, ``GET``/``HEAD /[{type}s/]{repo}/resolve/{rev}/{path}``
(a branch or a commit), ``GET /api/whoami-v2`` and ``GET /api/agent-harnesses`` (the client's telemetry registry). Xet
storage is not served: clients set ``HF_HUB_DISABLE_XET=1`` (``surgeon.publish.push.push_folder`` does so
itself for an explicit or loopback endpoint).

Write requests need ``Authorization: Bearer …`` (any token, or one of ``tokens`` when given), as
on the Hub. ``fail(status)`` makes it answer 401, 403, 404, 429 (or any status) the way the Hub
does, with its ``X-Error-Code`` / ``X-Error-Message`` headers. Every request is kept in
``requests``. Standard library only; it is a server, not a client of the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


from surgeon.demo.hub_repos import Commit, Repo, Request, git_blob_oid, validate_card_yaml
from surgeon.hub.repo_ids import REPO_ID

# What the Hub's default .gitattributes sends through LFS, plus anything binary or over 10 MB.
LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf",
    "*.npy", "*.npz", "*.pkl", "*.pickle", "*.zip", "*.tar", "*.tar.*", "*.tgz", "*.gz", "*.zst",
    "*.arrow", "*.parquet", "*.model", "*.tflite", "*.ot", "*.joblib", "*tfevents*",
)
LFS_MIN_SIZE = 10 * 10**6
_REPO_TYPES = ("models", "datasets", "spaces")
_RESOLVE = r"/((?P<t>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
_ERROR_HEADERS = {
    401: {"X-Error-Message": "Invalid credentials in Authorization header"},
    403: {"X-Error-Message": "You don't have the rights to write to this repo"},
    404: {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
    429: {"X-Error-Message": "Rate limit reached"},
}


class HubStandIn:
    """The stand-in server. Start with ``start()`` or ``with``; its address is ``url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tokens: set[str] | None = None) -> None:
        self.tokens = tokens
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self._failure: tuple[int, str | None] | None = None
        self.ignore_ranges = False  # serve whole files to range requests, as some mirrors and proxies do
        self.sent_bytes = 0  # body bytes the clients took (a client that stops reading takes fewer)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> HubStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail(self, status: int | None, on: str | None = None) -> None:
        """Answer every request (or only those of endpoint ``on``) with ``status``; None heals."""
        self._failure = None if status is None else (status, on)

    # ------------------------------------------------------------------ inspection
    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at branch ``revision``, path -> bytes."""
        return dict(self.repos[f"{repo_type}s/{repo_id}"].branches[revision])

    def card(self, repo_id: str, revision: str = "main") -> str:
        return self.files(repo_id, revision)["README.md"].decode()

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        return list(self.repos[f"{repo_type}s/{repo_id}"].commits)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[f"{repo_type}s/{repo_id}"]

    @property
    def unhandled(self) -> list[Request]:
        return [r for r in self.requests if r.endpoint == "unknown"]

    # ------------------------------------------------------------------ routing
    def handle(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        routes = [
            ("POST", r"/api/repos/create", "create", self._create),
            ("POST", r"/api/validate-yaml", "validate-yaml", self._validate_yaml),
            ("GET", r"/api/whoami-v2", "whoami", self._whoami),
            ("GET", r"/api/agent-harnesses", "agent-harnesses", self._harnesses),
            ("POST", r"/api/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", "branch", self._branch),
            ("POST", r"/api/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", "preupload", self._preupload),
            ("POST", r"/api/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", "commit", self._commit),
            ("GET", r"/api/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/refs", "refs", self._refs),
            ("GET", r"/api/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/(?P<path>.+))?", "tree", self._tree),
            ("GET", r"/api/(?P<t>\w+)/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>.+))?", "info", self._info),
            ("POST", r"/((?P<t>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs-batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs-upload", self._lfs_upload),
            ("GET", _RESOLVE, "resolve", self._resolve),
            ("HEAD", _RESOLVE, "resolve", self._resolve),
        ]
        for method, pattern, name, fn in routes:
            m = re.fullmatch(pattern, req.path)
            if req.method == method and m:
                req.endpoint = name
                if self._failure and self._failure[1] in (None, name):
                    status = self._failure[0]
                    return _json(status, {"error": f"stand-in answers {status}"}, _ERROR_HEADERS.get(status, {}))
                args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                if name == "resolve":
                    args["t"] = args.pop("t", None) or "models"
                if "t" in args or name == "lfs-batch":
                    args["t"] = args.get("t", "models")
                    if args["t"] not in _REPO_TYPES:
                        break
                with self._lock:
                    return fn(req, **args)
        req.endpoint = "unknown"
        return _json(404, {"error": f"the stand-in does not serve {req.method} {req.path}"})

    # ------------------------------------------------------------------ endpoints
    def _authorized(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        return bool(token) and (self.tokens is None or token in self.tokens)

    def _unauthorized(self) -> tuple[int, dict[str, str], bytes]:
        return _json(401, {"error": "Invalid username or password."}, _ERROR_HEADERS[401])

    def _repo(self, t: str, repo: str) -> Repo | None:
        return self.repos.get(f"{t}/{repo}")

    def _create(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        if not self._authorized(req):
            return self._unauthorized()
        body = json.loads(req.body or b"{}")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"standin-user/{body['name']}"
        t = f"{body.get('type') or 'model'}s"
        url = f"{self.url}/{'' if t == 'models' else t + '/'}{repo_id}"
        if not REPO_ID.match(repo_id):
            return _json(400, {"error": f"invalid repo name {repo_id!r}"})
        if f"{t}/{repo_id}" in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(repo_id, t, private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.heads["main"] = secrets.token_hex(20)
        self.repos[f"{t}/{repo_id}"] = repo
        return _json(200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _branch(self, req: Request, t: str, repo: str, branch: str) -> tuple[int, dict[str, str], bytes]:
        if not self._authorized(req):
            return self._unauthorized()
        r = self._repo(t, repo)
        if r is None:
            return _json(404, {"error": "Repository not found"}, _ERROR_HEADERS[404])
        if branch in r.branches:
            return _json(409, {"error": f"Reference refs/heads/{branch} already exists"})
        start = json.loads(req.body or b"{}").get("startingPoint") or "main"
        if start not in r.branches:
            return _json(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
        r.branches[branch] = dict(r.branches[start])
        r.heads[branch] = r.heads[start]
        return _json(200, {})

    def _validate_yaml(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        errors = validate_card_yaml(json.loads(req.body).get("content", ""))
        body = {"errors": [{"message": e} for e in errors], "warnings": []}
        return _json(400 if errors else 200, body)

    def _whoami(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        if not self._authorized(req):
            return self._unauthorized()
        return _json(200, {"type": "user", "name": "standin-user", "orgs": [], "auth": {"type": "access_token"}})

    def _harnesses(self, req: Request) -> tuple[int, dict[str, str], bytes]:
        return _json(200, {"standardEnvVars": [], "harnesses": {}})

    def _revision(self, r: Repo | None, rev: str) -> tuple[dict[str, bytes] | None, tuple[int, dict[str, str], bytes] | None]:
        """The files of a branch (writable) or of a commit (a snapshot), or the Hub's 404."""
        if r is None:
            return None, _json(404, {"error": "Repository not found"}, _ERROR_HEADERS[404])
        if rev in r.branches:
            return r.branches[rev], None
        if rev in r.snapshots:
            return r.snapshots[rev], None
        return None, _json(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})

    def _readable(self, req: Request, t: str, repo: str, rev: str) -> tuple[Repo | None, dict[str, bytes] | None, tuple[int, dict[str, str], bytes] | None]:
        """The repo and its files at ``rev`` when ``req`` may read them; else the error to answer."""
        r = self._repo(t, repo)
        files, error = self._revision(r, rev)
        if error is None and r is not None and r.private and not self._authorized(req):
            error = _json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return r, files, error

    def _sha(self, r: Repo, rev: str) -> str:
        return r.heads.get(rev, rev)

    def _preupload(self, req: Request, t: str, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        if not self._authorized(req):
            return self._unauthorized()
        files, error = self._revision(self._repo(t, repo), rev)
        if error:
            return error
        out = []
        for f in json.loads(req.body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["size"] >= LFS_MIN_SIZE or b"\0" in sample or any(fnmatch(f["path"], p) for p in LFS_PATTERNS)
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if f["path"] in files:
                data = files[f["path"]]
                entry["oid"] = hashlib.sha256(data).hexdigest() if lfs else git_blob_oid(data)
            out.append(entry)
        return _json(200, {"files": out, "commitOid": None})

    def _lfs_batch(self, req: Request, t: str, repo: str) -> tuple[int, dict[str, str], bytes]:
        if not self._authorized(req):
            return self._unauthorized()
        if self._repo(t, repo) is None:
            return _json(404, {"error": "Repository not found"}, _ERROR_HEADERS[404])
        objects = []
        for obj in json.loads(req.body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.blobs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}", "expires_in": 3600}}
            objects.append(entry)
        return _json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, req: Request, oid: str) -> tuple[int, dict[str, str], bytes]:
        if hashlib.sha256(req.body).hexdigest() != oid:
            return _json(400, {"error": "uploaded bytes do not match the announced sha256"})
        self.blobs[oid] = req.body
        return 200, {"Content-Length": "0"}, b""

    def _commit(self, req: Request, t: str, repo: str, rev: str) -> tuple[int, dict[str, str], bytes]:
        if not self._authorized(req):
            return self._unauthorized()
        r = self._repo(t, repo)
        files, error = self._revision(r, rev)
        if error:
            return error
        assert r is not None and files is not None
        header, changes = {}, {}
        deleted = []
        for line in req.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.blobs:
                    return _json(422, {"error": f"LFS object {value['oid']} for {value['path']} was never uploaded"})
                changes[value["path"]] = self.blobs[value["oid"]]
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return _json(400, {"error": f"unknown commit operation {item['key']!r}"})
        if "README.md" in changes:
            errors = validate_card_yaml(changes["README.md"].decode("utf-8", "replace"))
            if errors:
                return _json(400, {"error": "Invalid metadata in README.md: " + "; ".join(errors)})
        for path in deleted:
            for name in [n for n in files if n == path or n.startswith(path.rstrip("/") + "/")]:
                del files[name]
        files.update(changes)
        oid = secrets.token_hex(20)
        r.heads[rev] = oid
        r.snapshots[oid] = dict(files)
        r.commits.append(Commit(oid, rev, header.get("summary", ""), header.get("description", ""), sorted(changes) + deleted))
        prefix = "" if t == "models" else f"{t}/"
        return _json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{prefix}{repo}/commit/{oid}", "pullRequestUrl": None})

    def _info(self, req: Request, t: str, repo: str, rev: str = "main") -> tuple[int, dict[str, str], bytes]:
        r, files, error = self._readable(req, t, repo, rev)
        if error:
            return error
        assert r is not None and files is not None
        siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
        return _json(200, {"id": r.repo_id, "modelId": r.repo_id, "sha": self._sha(r, rev), "private": r.private, "siblings": siblings, "tags": []})

    def _tree(self, req: Request, t: str, repo: str, rev: str, path: str = "") -> tuple[int, dict[str, str], bytes]:
        """The files (and, unless ``recursive``, the folders) under ``path`` at ``rev``."""
        r, files, error = self._readable(req, t, repo, rev)
        if error:
            return error
        assert r is not None and files is not None
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name, data in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": name}
            if self._lfs(name, data):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": git_blob_oid(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        status, headers, body = 200, {"Content-Type": "application/json"}, json.dumps(entries).encode()
        return status, headers, body

    @staticmethod
    def _lfs(path: str, data: bytes) -> bool:
        return b"\0" in data[:1024] or len(data) >= LFS_MIN_SIZE or any(fnmatch(path, p) for p in LFS_PATTERNS)

    def _resolve(self, req: Request, t: str, repo: str, rev: str, path: str) -> tuple[int, dict[str, str], bytes]:
        """A file download (GET, or HEAD for its metadata), with the headers the client reads:
        the commit, the ETag (git blob id; sha256 and size as X-Linked-* for LFS files)."""
        r, files, error = self._readable(req, t, repo, rev)
        if error:
            return error
        assert r is not None and files is not None
        if path not in files:
            return _json(404, {"error": f"Entry not found: {path}"}, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        data = files[path]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": self._sha(r, rev), "ETag": f'"{git_blob_oid(data)}"'}
        if self._lfs(path, data):
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("range", "").strip())
        if wanted and req.method == "GET" and not self.ignore_ranges:  # a byte range, as the Hub's storage serves it
            a, b = int(wanted.group(1)), min(int(wanted.group(2) or len(data) - 1), len(data) - 1)
            if a >= len(data):
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
            return 206, headers | {"Content-Range": f"bytes {a}-{b}/{len(data)}"}, data[a : b + 1]
        return 200, headers, data

    def _refs(self, req: Request, t: str, repo: str) -> tuple[int, dict[str, str], bytes]:
        r = self._repo(t, repo)
        if r is None:
            return _json(404, {"error": "Repository not found"}, _ERROR_HEADERS[404])
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": r.heads[b]} for b in r.branches]
        return _json(200, {"branches": branches, "tags": [], "converts": []})


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _handler(standin: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            url = urlsplit(self.path)
            req = Request(self.command, unquote(url.path), parse_qs(url.query), {k.lower(): v for k, v in self.headers.items()}, self._body())
            standin.requests.append(req)
            status, headers, body = standin.handle(req)
            self.send_response(status)
            for k, v in headers.items():
                if k != "Content-Length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for start in range(0, len(body) if self.command != "HEAD" else 0, 1 << 16):  # counting what the client takes
                    self.wfile.write(piece := body[start : start + (1 << 16)])
                    standin.sent_bytes += len(piece)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

    return Handler


def unreachable_url() -> str:
    """An http URL on loopback where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Serve a local stand-in of the Hub's upload API until Ctrl-C.")
    parser.add_argument("--port", type=int, default=8999)
    args = parser.parse_args()
    with HubStandIn(port=args.port) as hub:
        print(f"export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_standin", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
