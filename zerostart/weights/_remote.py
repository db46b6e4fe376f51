"""Remote checkpoints: S3 (any S3-compatible endpoint) and HTTP(S) with range requests.

Reads are positional ranges fetched over keep-alive connections (one per reader thread) and
read straight into the caller's buffer. Transient failures (connection resets, timeouts, 5xx,
429) are retried with exponential back-off, resuming where the bytes stopped; a range that
keeps failing raises :class:`SourceError` naming the object and the range. Every range after
the first is conditional on the object's ETag (or Last-Modified), so an object replaced in the
middle of a load fails the load instead of mixing two versions.

S3 credentials come from the standard AWS chain (environment, shared files, config) through
botocore, requests are signed with SigV4; the endpoint comes from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (path-style addressing) or defaults to AWS (virtual-hosted).
"""

from __future__ import annotations

import http.client
import os
import random
import ssl
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable

from zerostart.weights._format import WeightsError


class SourceError(OSError):
    """A remote object could not be read (after retries), was refused, or changed mid-load."""


class ObjectChanged(SourceError):
    """The object's ETag / Last-Modified changed between two reads of one load."""


@dataclass(frozen=True)
class RemoteObject:
    url: str  # canonical: s3://bucket/key or http(s)://host/path
    size: int
    etag: str | None = None
    last_modified: str | None = None

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class RetryPolicy:
    attempts: int = 5  # tries per range (the first included)
    backoff_s: float = 0.2  # first back-off; doubles each retry, with jitter
    max_backoff_s: float = 5.0
    timeout_s: float = 30.0  # socket timeout per operation


DEFAULT_RETRY = RetryPolicy()


# ---------------------------------------------------------------------------------------------
# Addressing and signing


class _S3:
    """Turns s3://bucket/key into a request URL and signed headers."""

    def __init__(self) -> None:
        try:
            import botocore.session
            from botocore.auth import S3SigV4Auth
            from botocore.awsrequest import AWSRequest
        except ImportError:
            raise SourceError("s3:// sources need botocore: pip install 'zerostart[s3]'") from None
        self._auth_cls, self._request_cls = S3SigV4Auth, AWSRequest
        session = botocore.session.get_session()
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or session.get_config_variable("region") or "us-east-1"
        self.endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "").rstrip("/")
        creds = session.get_credentials()
        self.credentials = creds.get_frozen_credentials() if creds is not None else None
        self._lock = threading.Lock()

    def http_url(self, bucket: str, key: str, query: str = "") -> str:
        quoted = urllib.parse.quote(key, safe="/~")
        if self.endpoint:
            url = f"{self.endpoint}/{bucket}/{quoted}"
        else:
            url = f"https://{bucket}.s3.{self.region}.amazonaws.com/{quoted}"
        return url + (f"?{query}" if query else "")

    def sign(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        if self.credentials is None:
            return headers  # anonymous access (public buckets)
        req = self._request_cls(method=method, url=url, headers=dict(headers))
        self._auth_cls(self.credentials, "s3", self.region).add_auth(req)
        return dict(req.headers.items())


_s3_singleton: _S3 | None = None
_s3_lock = threading.Lock()


def _s3() -> _S3:
    global _s3_singleton
    with _s3_lock:
        if _s3_singleton is None:
            _s3_singleton = _S3()
        return _s3_singleton


def reset_credentials() -> None:
    """Forget cached S3 endpoint and credentials (re-read from the environment next time)."""
    global _s3_singleton
    with _s3_lock:
        _s3_singleton = None


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise WeightsError(f"{url}: no bucket in this s3:// URL (expected s3://bucket/prefix)")
    return bucket, key


def _request_target(url: str, method: str = "GET", headers: dict[str, str] | None = None, query: str = "") -> tuple[str, dict[str, str]]:
    headers = dict(headers or {})
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        s3 = _s3()
        http_url = s3.http_url(bucket, key, query)
        return http_url, s3.sign(method, http_url, headers)
    return url + (f"?{query}" if query else ""), headers


# ---------------------------------------------------------------------------------------------
# Transport


class Transport:
    """Keep-alive HTTP connections, one set per thread, and ranged reads with retries."""

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        self.retry = retry or DEFAULT_RETRY
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
            http_url, hdrs = _request_target(url, method, headers, query)
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

    def read_range(self, obj: RemoteObject, offset: int, buf: memoryview) -> None:
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
            http_url, hdrs = _request_target(obj.url, "GET", headers)
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
                    raise SourceError(f"{obj.url}: access denied (HTTP {resp.status}: {_s3_message(body)}); check the credentials "
                                      f"(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the endpoint")
                if resp.status == 404:
                    raise SourceError(f"{obj.url}: not found (HTTP 404)")
                if resp.status == 416:
                    raise ObjectChanged(f"{obj.url}: range {start}..{offset + want} is beyond the object (it shrank during the load?)")
                if resp.status not in (429, 500, 502, 503, 504):
                    raise SourceError(f"{obj.url}: unexpected HTTP {resp.status} for bytes {start}..{offset + want}: {_s3_message(body)}")
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


def _check_content_range(obj: RemoteObject, resp: http.client.HTTPResponse, start: int) -> None:
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


def _s3_message(body: bytes) -> str:
    try:
        root = ET.fromstring(body)
        code = root.findtext("Code") or ""
        msg = root.findtext("Message") or ""
        return f"{code} {msg}".strip() or body[:200].decode("utf-8", "replace")
    except ET.ParseError:
        return body[:200].decode("utf-8", "replace").strip()


# ---------------------------------------------------------------------------------------------
# Discovery

def head(url: str, transport: Transport) -> RemoteObject:
    t = transport
    status, h, _ = t.request(url, "HEAD")
    if status == 404:
        raise SourceError(f"{url}: not found (HTTP 404)")
    if status in (401, 403):
        raise SourceError(f"{url}: access denied (HTTP {status}); check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the endpoint")
    if status >= 400:
        raise SourceError(f"{url}: HEAD answered HTTP {status}")
    try:
        size = int(h["content-length"])
    except (KeyError, ValueError):
        raise SourceError(f"{url}: the server gives no Content-Length, so it cannot be read by ranges") from None
    return RemoteObject(url, size, h.get("etag"), h.get("last-modified"))


def fetch(obj: RemoteObject, transport: Transport) -> bytes:
    buf = bytearray(obj.size)
    if obj.size:
        transport.read_range(obj, 0, memoryview(buf))
    return bytes(buf)


def list_objects(url: str, transport: Transport) -> list[RemoteObject]:
    """The objects of a remote model: every object under an s3:// prefix; for HTTP (which
    cannot list), the Hugging Face file names that exist under the URL."""
    t = transport
    base = url.rstrip("/")
    if url.startswith("s3://"):
        bucket, prefix = _split_s3(base)
        prefix = prefix + "/" if prefix else ""
        out: list[RemoteObject] = []
        token = None
        while True:
            q = {"list-type": "2", "prefix": prefix}
            if token:
                q["continuation-token"] = token
            status, _, body = t.request(f"s3://{bucket}/", "GET", query=urllib.parse.urlencode(sorted(q.items()), quote_via=urllib.parse.quote))
            if status in (401, 403):
                raise SourceError(f"{url}: access denied listing the bucket (HTTP {status}: {_s3_message(body)}); check the credentials")
            if status == 404:
                raise SourceError(f"{url}: no such bucket ({_s3_message(body)})")
            if status != 200:
                raise SourceError(f"{url}: listing failed with HTTP {status}: {_s3_message(body)}")
            root = ET.fromstring(body)
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            for c in root.iter(f"{ns}Contents"):
                key = c.findtext(f"{ns}Key") or ""
                rel = key[len(prefix):]
                if not rel or "/" in rel:
                    continue  # the model's own files only, not sub-folders
                out.append(RemoteObject(f"s3://{bucket}/{key}", int(c.findtext(f"{ns}Size") or 0), c.findtext(f"{ns}ETag"),
                                        c.findtext(f"{ns}LastModified")))
            if (root.findtext(f"{ns}IsTruncated") or "false").lower() != "true":
                break
            token = root.findtext(f"{ns}NextContinuationToken")
        if not out:
            raise SourceError(f"{url}: no objects under this prefix")
        return out
    if base.endswith(".safetensors"):
        return [head(base, t)]
    found = []
    for name in _HF_FILES:
        try:
            found.append(head(f"{base}/{name}", t))
        except SourceError as e:
            if "404" not in str(e):
                raise
    names = {o.name for o in found}
    if "model.safetensors.index.json" in names:
        import json

        index = json.loads(fetch(next(o for o in found if o.name == "model.safetensors.index.json"), t))
        for shard in sorted(set(index.get("weight_map", {}).values())):
            found.append(head(f"{base}/{shard}", t))
    if not any(o.name.endswith(".safetensors") for o in found):
        raise SourceError(f"{url}: neither model.safetensors nor model.safetensors.index.json is there")
    return found


_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "model.safetensors", "model.safetensors.index.json", "zerostart-image.json")


def raw_throughput(obj: RemoteObject, concurrency: int, part: int, transport: Transport | None = None,
                   progress: Callable[[int], None] | None = None) -> float:
    """GB/s of plain concurrent ranged GETs of one object into reused buffers (a ceiling)."""
    from concurrent.futures import ThreadPoolExecutor

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

