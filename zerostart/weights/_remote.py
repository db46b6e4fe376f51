"""Ranged HTTP reads with retries: the machinery under the S3 and HTTP stores.

Reads are positional ranges fetched over keep-alive connections (one per reader thread) and
read straight into the caller's buffer. Transient failures (connection resets, timeouts, 5xx,
429) are retried with exponential back-off, resuming where the bytes stopped; a range that
keeps failing raises :class:`SourceError` naming the object and the range. Every range after
the first is conditional on the object's ETag (or Last-Modified), so an object replaced in the
middle of a load fails the load instead of mixing two versions.

A store that signs its requests (S3) gives the transport a ``target``: a function from an
object's URL to the HTTP URL to ask and the headers to send (``_store_s3.py``).
"""

from __future__ import annotations

import http.client
import random
import ssl
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from zerostart.weights._errors import ObjectChanged, SourceError
from zerostart.weights._store import ObjectInfo

Target = Callable[[str, str, dict[str, str], str], tuple[str, dict[str, str]]]


@dataclass
class RetryPolicy:
    attempts: int = 5  # tries per range (the first included)
    backoff_s: float = 0.2  # first back-off; doubles each retry, with jitter
    max_backoff_s: float = 5.0
    timeout_s: float = 30.0  # socket timeout per operation


DEFAULT_RETRY = RetryPolicy()


# ---------------------------------------------------------------------------------------------
# Transport


class Transport:
    """Keep-alive HTTP connections, one set per thread, and ranged reads with retries."""

    def __init__(self, retry: RetryPolicy | None = None, target: Target | None = None) -> None:
        self.retry = retry or DEFAULT_RETRY
        self._target = target or plain_target
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._all_lock = threading.Lock()

    def _conn(self, parsed: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        key = (parsed.scheme, parsed.netloc)
        c = conns.get(key)
        if c is None:
            if parsed.scheme == "https":
                c = http.client.HTTPSConnection(parsed.netloc, timeout=self.retry.timeout_s, context=ssl.create_default_context())
            else:
                c = http.client.HTTPConnection(parsed.netloc, timeout=self.retry.timeout_s)
            conns[key] = c
            with self._all_lock:
                self._all.append(c)
        return c

    def _drop(self, parsed: urllib.parse.SplitResult) -> None:
        conns = getattr(self._local, "conns", {})
        c = conns.pop((parsed.scheme, parsed.netloc), None)
        if c is not None:
            c.close()

    def close(self) -> None:
        """Close every connection this transport opened, in any thread (call when done)."""
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()

    def request(self, url: str, method: str = "GET", headers: dict[str, str] | None = None, query: str = "") -> tuple[int, dict[str, str], bytes]:
        """A small request (HEAD, listing, a small file), retried on transient failures."""
        last: BaseException | None = None
        for attempt in range(self.retry.attempts):
            http_url, hdrs = self._target(url, method, dict(headers or {}), query)
            parsed = urllib.parse.urlsplit(http_url)
            try:
                conn = self._conn(parsed)
                conn.request(method, _path(parsed), headers=hdrs)
                resp = conn.getresponse()
                body = resp.read()
                status, rh = resp.status, {k.lower(): v for k, v in resp.getheaders()}
            except (OSError, http.client.HTTPException) as e:
                self._drop(parsed)
                last = e
                self._sleep(attempt)
                continue
            if status in (429, 500, 502, 503, 504):
                last = SourceError(f"{url}: HTTP {status}")
                self._sleep(attempt, rh.get("retry-after"))
                continue
            return status, rh, body
        raise SourceError(f"{url}: {method} failed after {self.retry.attempts} attempts: {last}")

    def read_range(self, obj: ObjectInfo, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes at ``offset`` (up to the end of the object)."""
        want = min(len(buf), obj.size - offset)
        done = 0
        attempt = 0
        last: BaseException | None = None
        while done < want:
            start = offset + done
            headers = {"Range": f"bytes={start}-{offset + want - 1}"}
            if obj.etag:
                headers["If-Match"] = obj.etag
            elif obj.last_modified:
                headers["If-Unmodified-Since"] = obj.last_modified
            http_url, hdrs = self._target(obj.url, "GET", headers, "")
            parsed = urllib.parse.urlsplit(http_url)
            try:
                conn = self._conn(parsed)
                conn.request("GET", _path(parsed), headers=hdrs)
                resp = conn.getresponse()
                if resp.status == 206 or (resp.status == 200 and start == 0):
                    _check_content_range(obj, resp, start)
                    got = _readinto(resp, buf[done:want])
                    done += got
                    if got:
                        attempt = 0  # progress: a later break resumes here with fresh retries
                    if resp.status == 200 and not resp.isclosed():
                        self._drop(parsed)  # the server ignored Range: drop the unread tail
                    if done < want:
                        raise http.client.IncompleteRead(b"", want - done)
                    continue
                body = resp.read()
                if resp.status in (412,):
                    raise ObjectChanged(f"{obj.url}: the object changed during the load (ETag {obj.etag} no longer matches); retry the load")
                if resp.status in (401, 403):
                    raise SourceError(f"{obj.url}: access denied (HTTP {resp.status}: {error_message(body)}); check the "
                                      "credentials and the endpoint")
                if resp.status == 404:
                    raise SourceError(f"{obj.url}: not found (HTTP 404)")
                if resp.status == 416:
                    raise ObjectChanged(f"{obj.url}: range {start}..{offset + want} is beyond the object (it shrank during the load?)")
                if resp.status not in (429, 500, 502, 503, 504):
                    raise SourceError(f"{obj.url}: unexpected HTTP {resp.status} for bytes {start}..{offset + want}: {error_message(body)}")
                last = SourceError(f"HTTP {resp.status}")
                retry_after = resp.getheader("retry-after")
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, SourceError):
                    raise
                self._drop(parsed)
                last, retry_after = e, None
            attempt += 1
            if attempt >= self.retry.attempts:
                raise SourceError(f"{obj.url}: bytes {start}..{offset + want} failed after {attempt} attempts "
                                  f"({type(last).__name__}: {last}); the server keeps failing this range") from None
            self._sleep(attempt - 1, retry_after)

    def _sleep(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(self.retry.max_backoff_s, self.retry.backoff_s * (2 ** attempt)) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.retry.max_backoff_s))
            except ValueError:
                pass
        time.sleep(delay)


def plain_target(url: str, method: str, headers: dict[str, str], query: str) -> tuple[str, dict[str, str]]:
    """An http(s) URL is asked as it is, unsigned."""
    return url + (f"?{query}" if query else ""), headers


def _path(parsed: urllib.parse.SplitResult) -> str:
    return (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")


def _readinto(resp: http.client.HTTPResponse, buf: memoryview) -> int:
    done = 0
    while done < len(buf):
        n = resp.readinto(buf[done:])
        if not n:
            break
        done += n
    return done


def _check_content_range(obj: ObjectInfo, resp: http.client.HTTPResponse, start: int) -> None:
    cr = resp.getheader("content-range")
    if resp.status == 206 and cr:
        try:
            first = int(cr.split()[1].split("-")[0])
            total = cr.rsplit("/", 1)[1]
        except (IndexError, ValueError):
            raise SourceError(f"{obj.url}: malformed Content-Range {cr!r}") from None
        if first != start:
            raise SourceError(f"{obj.url}: asked for bytes from {start}, server sent from {first}")
        if total != "*" and int(total) != obj.size:
            raise ObjectChanged(f"{obj.url}: size changed during the load ({obj.size} -> {total} bytes); retry the load")
    etag = resp.getheader("etag")
    if obj.etag and etag and etag != obj.etag:
        raise ObjectChanged(f"{obj.url}: the object changed during the load (ETag {obj.etag} -> {etag}); retry the load")


def error_message(body: bytes) -> str:
    """The message of an error response: an S3 XML error's code and message, else its text."""
    try:
        root = ET.fromstring(body)
        code = root.findtext("Code") or ""
        msg = root.findtext("Message") or ""
        return f"{code} {msg}".strip() or body[:200].decode("utf-8", "replace")
    except ET.ParseError:
        return body[:200].decode("utf-8", "replace").strip()


def raw_throughput(obj: ObjectInfo, concurrency: int, part: int, transport: Transport | None = None,
                   progress: Callable[[int], None] | None = None) -> float:
    """GB/s of plain concurrent ranged GETs of one object into reused buffers (a ceiling)."""
    t = transport or Transport()
    bufs = threading.local()
    t0 = time.perf_counter()

    def get(off: int) -> None:
        b = getattr(bufs, "b", None)
        if b is None:
            b = bufs.b = bytearray(part)
        t.read_range(obj, off, memoryview(b)[: min(part, obj.size - off)])

    try:
        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(get, range(0, obj.size, part)))
    finally:
        if transport is None:
            t.close()
    return obj.size / (time.perf_counter() - t0) / 1e9

