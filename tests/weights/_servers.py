"""Real servers on loopback for remote-source tests: an HTTP range server with fault knobs,
and an S3 server (moto's server mode) in its own process."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from email.utils import formatdate


class Faults:
    def __init__(self) -> None:
        self.cut_after: int | None = None  # close the connection after this many body bytes...
        self.cut_times = 0  # ...for this many responses
        self.fail_503 = 0  # answer this many GETs with 503 first
        self.fail_range_at: int | None = None  # always answer 500 for ranges covering this offset
        self.delay_per_mb = 0.0  # seconds of delay per MiB sent
        self.mutate: str | None = None  # after the first range GET, rewrite this file (new ETag)
        self.mutated = False


class RangeServer:
    """Serves a directory over HTTP/1.1 with Range, ETag, If-Match and HEAD."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.faults = Faults()
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.gets = 0
        self.requests = 0  # HEAD and GET
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _file(self):
                p = os.path.join(server.root, self.path.lstrip("/").split("?")[0])
                return p if os.path.isfile(p) else None

            def _etag(self, p):
                st = os.stat(p)
                return '"' + hashlib.sha1(f"{p}{st.st_mtime_ns}{st.st_size}".encode()).hexdigest() + '"'

            def do_HEAD(self):
                with server.lock:
                    server.requests += 1
                p = self._file()
                if p is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(os.path.getsize(p)))
                self.send_header("ETag", self._etag(p))
                self.send_header("Last-Modified", formatdate(os.path.getmtime(p), usegmt=True))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                f = server.faults
                p = self._file()
                with server.lock:
                    server.gets += 1
                    server.requests += 1
                    fail = f.fail_503 > 0
                    if fail:
                        f.fail_503 -= 1
                if p is None:
                    return self._empty(404)
                if fail:
                    return self._empty(503)
                size = os.path.getsize(p)
                etag = self._etag(p)
                if self.headers.get("If-Match") and self.headers["If-Match"] != etag:
                    return self._empty(412)
                rng = self.headers.get("Range")
                start, end = 0, size - 1
                status = 200
                if rng:
                    a, _, b = rng.split("=")[1].partition("-")
                    start, end = int(a), min(int(b) if b else size - 1, size - 1)
                    status = 206
                if f.fail_range_at is not None and start <= f.fail_range_at <= end:
                    return self._empty(500)
                if f.mutate and not f.mutated and os.path.basename(p) == f.mutate and start > 0:
                    f.mutated = True
                    with open(p, "r+b") as fh:
                        fh.seek(size - 1)
                        fh.write(b"\x01")
                    os.utime(p, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
                    etag = self._etag(p)
                    if self.headers.get("If-Match") and self.headers["If-Match"] != etag:
                        return self._empty(412)
                n = end - start + 1
                self.send_response(status)
                self.send_header("Content-Length", str(n))
                self.send_header("ETag", etag)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                cut = None
                with server.lock:
                    if f.cut_times > 0 and f.cut_after is not None and n > f.cut_after:
                        f.cut_times -= 1
                        cut = f.cut_after
                with open(p, "rb") as fh:
                    fh.seek(start)
                    left = n if cut is None else cut
                    while left > 0:
                        chunk = fh.read(min(1 << 20, left))
                        if not chunk:
                            break
                        if f.delay_per_mb:
                            time.sleep(f.delay_per_mb * len(chunk) / (1 << 20))
                        self.wfile.write(chunk)
                        left -= len(chunk)
                        with server.lock:
                            server.bytes_sent += len(chunk)
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _empty(self, code):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server in a child process (its own interpreter: no GIL shared with loads)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("moto server did not start")

    def set_auth(self, unauthenticated_actions: str) -> None:
        """'0': every request must carry valid IAM credentials; 'inf': no checks."""
        req = urllib.request.Request(self.url + "/moto-api/reset-auth", data=unauthenticated_actions.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=5).read()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
