"""A Hugging Face Hub on loopback, for ``HF_ENDPOINT``: the routes ``huggingface_hub`` uses to
download a snapshot, answered the way the Hub answers them (headers and error codes included).

    GET  /api/models/{org}/{name}/revision/{rev}        repo info: the commit a revision names
    GET  /api/models/{org}/{name}/tree/{commit}         the files of a commit (recursive)
    HEAD /{org}/{name}/resolve/{rev}/{path}             a file's commit, ETag and size
    GET  /{org}/{name}/resolve/{rev}/{path}             its bytes (with Range)

A repository is a directory of files and a commit id. Knobs: ``gated`` repositories answer 401
``GatedRepo`` unless the request carries the right token; ``drop_after`` cuts the connection
after that many bytes of a file's body, for ``drop_times`` responses; every request is logged.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class Repo:
    root: str  # a directory holding the repository's files
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: dict[str, str] = field(default_factory=lambda: {"main": ""})  # name -> commit ("" = self.commit)
    gated_token: str | None = None  # set: only requests with this bearer token see the repository

    def files(self) -> list[str]:
        out = []
        for d, _, names in os.walk(self.root):
            out += [os.path.relpath(os.path.join(d, n), self.root) for n in names]
        return sorted(out)

    def resolve(self, rev: str) -> str | None:
        if rev == self.commit:
            return rev
        if rev in self.branches:
            return self.branches[rev] or self.commit
        return None


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Hub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None, str | None]] = []  # (method, path, authorization, range)
        self.drop_after: int | None = None
        self.drop_times = 0
        self.lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                hub._handle(self, body=True)

            def do_HEAD(self):
                hub._handle(self, body=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requested(self, what: str = "resolve") -> list[str]:
        """Paths asked for by resolve GETs (or any route containing ``what``)."""
        return [p for m, p, _, _ in self.log if what in p and (what != "resolve" or m == "GET")]

    # -- routes ---------------------------------------------------------------------------------

    def _handle(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = urllib.parse.urlsplit(h.path).path
        with self.lock:
            self.log.append((h.command, path, h.headers.get("authorization"), h.headers.get("range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            return self._api(h, m.group(1), m.group(2), urllib.parse.unquote(m.group(3)))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(h, m.group(1), urllib.parse.unquote(m.group(2)), urllib.parse.unquote(m.group(3)), body)
        self._error(h, 404, "RepoNotFound", "not a route of this hub")

    def _repo(self, h, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", f"Repository Not Found for url: {h.path}.")
            return None
        if repo.gated_token is not None and h.headers.get("authorization") != f"Bearer {repo.gated_token}":
            self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                        "and be authenticated to access it. Please log in.")
            return None
        return repo

    def _api(self, h, repo_id: str, what: str, rev: str) -> None:
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if what == "revision":
            info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "gated": bool(repo.gated_token),
                    "siblings": [{"rfilename": f} for f in repo.files()]}
            return self._json(h, info)
        tree = []
        for f in repo.files():
            p = os.path.join(repo.root, f)
            size = os.path.getsize(p)
            entry = {"type": "file", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": size, "path": f}
            if f.endswith(".safetensors"):
                entry["lfs"] = {"oid": _sha256(p), "size": size, "pointerSize": 134}
            tree.append(entry)
        self._json(h, tree)

    def _resolve(self, h, repo_id: str, rev: str, name: str, body: bool) -> None:
        repo = self._repo(h, repo_id)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        p = os.path.join(repo.root, name)
        if not os.path.isfile(p):
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist at {rev}")
        with open(p, "rb") as f:
            data = f.read()
        etag = f'"{_sha256(p) if name.endswith(".safetensors") else hashlib.sha1(data).hexdigest()}"'
        start, status = 0, 200
        rng = h.headers.get("range")
        if rng and body:
            m = re.match(r"bytes=(\d+)-", rng)
            assert m is not None, rng  # the clients under test send bytes=N-
            start = int(m.group(1))
            status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", etag)
        if name.endswith(".safetensors"):
            h.send_header("X-Linked-Etag", etag)
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if not body:
            return
        chunk = data[start:]
        with self.lock:
            drop = self.drop_after is not None and self.drop_times > 0 and len(chunk) > self.drop_after
            if drop:
                self.drop_times -= 1
        if drop:  # the connection dies mid-file
            h.wfile.write(chunk[: self.drop_after])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(chunk)

    def _json(self, h, obj) -> None:
        raw = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(raw)

    def _error(self, h, status: int, code: str, message: str) -> None:
        raw = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(raw)
