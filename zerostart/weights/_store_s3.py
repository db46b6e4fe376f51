"""``s3://bucket/prefix``: the model files under a prefix of any S3-compatible store.

Credentials come from the standard AWS chain (environment, shared files, config) through
botocore, and requests are signed with SigV4; the endpoint comes from ``AWS_ENDPOINT_URL_S3``
/ ``AWS_ENDPOINT_URL`` (path-style addressing) or defaults to AWS (virtual-hosted). An
object's identity is its ETag.
"""

from __future__ import annotations

import builtins
import os
import threading
import urllib.parse
import xml.etree.ElementTree as ET

from zerostart.weights._errors import SourceError, WeightsError
from zerostart.weights._remote import Transport, error_message
from zerostart.weights._store import ObjectInfo, digest, is_model_file


class _Signer:
    """Turns s3://bucket/key into a request URL and signed headers."""

    def __init__(self) -> None:
        try:
            # botocore (optional, the s3 extra) only when an S3 source is opened
            import botocore.session
            from botocore.auth import S3SigV4Auth
            from botocore.awsrequest import AWSRequest
        except ImportError:
            raise SourceError("s3:// sources need botocore: pip install 'zerostart[s3]'") from None
        self._auth_cls, self._request_cls = S3SigV4Auth, AWSRequest
        session = botocore.session.get_session()
        self.region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or session.get_config_variable("region") or "us-east-1")
        self.endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "").rstrip("/")
        creds = session.get_credentials()
        self.credentials = creds.get_frozen_credentials() if creds is not None else None

    def http_url(self, bucket: str, key: str, query: str = "") -> str:
        quoted = urllib.parse.quote(key, safe="/~")
        if self.endpoint:
            url = f"{self.endpoint}/{bucket}/{quoted}"
        else:
            url = f"https://{bucket}.s3.{self.region}.amazonaws.com/{quoted}"
        return url + (f"?{query}" if query else "")

    def __call__(self, url: str, method: str, headers: dict[str, str], query: str) -> tuple[str, dict[str, str]]:
        bucket, key = split(url)
        http_url = self.http_url(bucket, key, query)
        if self.credentials is None:
            return http_url, headers  # anonymous access (public buckets)
        req = self._request_cls(method=method, url=http_url, headers=dict(headers))
        self._auth_cls(self.credentials, "s3", self.region).add_auth(req)
        return http_url, dict(req.headers.items())


_signer: _Signer | None = None
_signer_lock = threading.Lock()


def signer() -> _Signer:
    global _signer
    with _signer_lock:
        if _signer is None:
            _signer = _Signer()
        return _signer


def reset_credentials() -> None:
    """Forget cached S3 endpoint and credentials (re-read from the environment next time)."""
    global _signer
    with _signer_lock:
        _signer = None


def split(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise WeightsError(f"{url}: no bucket in this s3:// URL (expected s3://bucket/prefix)")
    return bucket, key


class S3Store:
    def __init__(self, spec: str, transport: Transport | None = None) -> None:
        self.spec = spec.rstrip("/")
        split(self.spec)
        self.transport = transport or Transport(target=signer())
        self._listed: list[ObjectInfo] | None = None

    def local_dir(self) -> None:
        return None

    def list(self) -> list[ObjectInfo]:
        if self._listed is None:
            self._listed = [o for o in self._list_prefix() if is_model_file(o.name)]
            if not self._listed:
                raise SourceError(f"{self.spec}: no objects under this prefix")
        return self._listed

    def _list_prefix(self) -> builtins.list[ObjectInfo]:  # (in this class `list` names the method above)
        bucket, prefix = split(self.spec)
        prefix = prefix + "/" if prefix else ""
        out: list[ObjectInfo] = []
        token = None
        while True:
            q = {"list-type": "2", "prefix": prefix}
            if token:
                q["continuation-token"] = token
            query = urllib.parse.urlencode(sorted(q.items()), quote_via=urllib.parse.quote)
            status, _, body = self.transport.request(f"s3://{bucket}/", "GET", query=query)
            if status in (401, 403):
                raise SourceError(f"{self.spec}: access denied listing the bucket (HTTP {status}: {error_message(body)}); "
                                  "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the endpoint")
            if status == 404:
                raise SourceError(f"{self.spec}: no such bucket ({error_message(body)})")
            if status != 200:
                raise SourceError(f"{self.spec}: listing failed with HTTP {status}: {error_message(body)}")
            root = ET.fromstring(body)
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            for c in root.iter(f"{ns}Contents"):
                key = c.findtext(f"{ns}Key") or ""
                rel = key[len(prefix):]
                if not rel or "/" in rel:
                    continue  # the model's own files only, not sub-folders
                out.append(ObjectInfo(f"s3://{bucket}/{key}", int(c.findtext(f"{ns}Size") or 0), c.findtext(f"{ns}ETag"),
                                      c.findtext(f"{ns}LastModified")))
            if (root.findtext(f"{ns}IsTruncated") or "false").lower() != "true":
                return out
            token = root.findtext(f"{ns}NextContinuationToken")

    def stat(self, name: str) -> ObjectInfo:
        for o in self.list():
            if o.name == name:
                return o
        raise SourceError(f"{self.spec}/{name}: not found")

    def read_range(self, obj: ObjectInfo, offset: int, buf: memoryview) -> None:
        self.transport.read_range(obj, offset, buf)

    def identity(self) -> str:
        return digest(self.list(), self.spec)

    def close(self) -> None:
        self.transport.close()


def open_store(spec: str) -> S3Store:
    return S3Store(spec)
