"""``http(s)://host/path``: a URL under which a model's Hugging Face file names can be fetched.

HTTP cannot list a directory, so the store asks (HEAD) for each name a model may have, then
for the shards its index names; ``.../file.safetensors`` names one file. An object's identity
is its ETag, else its Last-Modified.
"""

from __future__ import annotations

import builtins
import json

from zerostart.weights._remote import Transport
from zerostart.weights._errors import SourceError
from zerostart.weights._store import MODEL_FILES, ObjectInfo, digest, fetch


class HttpStore:
    def __init__(self, spec: str, transport: Transport | None = None) -> None:
        self.spec = spec.rstrip("/")
        self.transport = transport or Transport()
        self._listed: list[ObjectInfo] | None = None

    def local_dir(self) -> None:
        return None

    def list(self) -> list[ObjectInfo]:
        if self._listed is None:
            self._listed = self._discover()
        return self._listed

    def _discover(self) -> builtins.list[ObjectInfo]:  # (in this class `list` names the method above)
        if self.spec.endswith(".safetensors"):
            return [head(self.spec, self.transport)]
        found = []
        for name in MODEL_FILES:
            try:
                found.append(head(f"{self.spec}/{name}", self.transport))
            except SourceError as e:
                if "404" not in str(e):
                    raise
        index = next((o for o in found if o.name == "model.safetensors.index.json"), None)
        if index is not None:
            weight_map = json.loads(fetch(self, index)).get("weight_map", {})
            for shard in sorted(set(weight_map.values())):
                found.append(head(f"{self.spec}/{shard}", self.transport))
        if not any(o.name.endswith(".safetensors") for o in found):
            raise SourceError(f"{self.spec}: neither model.safetensors nor model.safetensors.index.json is there")
        return found

    def stat(self, name: str) -> ObjectInfo:
        for o in self.list():
            if o.name == name:
                return o
        return head(f"{self.spec}/{name}", self.transport)

    def read_range(self, obj: ObjectInfo, offset: int, buf: memoryview) -> None:
        self.transport.read_range(obj, offset, buf)

    def identity(self) -> str:
        return digest(self.list(), self.spec)

    def close(self) -> None:
        self.transport.close()


def head(url: str, transport: Transport) -> ObjectInfo:
    status, h, _ = transport.request(url, "HEAD")
    if status == 404:
        raise SourceError(f"{url}: not found (HTTP 404)")
    if status in (401, 403):
        raise SourceError(f"{url}: access denied (HTTP {status}); check the credentials and the endpoint")
    if status >= 400:
        raise SourceError(f"{url}: HEAD answered HTTP {status}")
    try:
        size = int(h["content-length"])
    except (KeyError, ValueError):
        raise SourceError(f"{url}: the server gives no Content-Length, so it cannot be read by ranges") from None
    return ObjectInfo(url, size, h.get("etag"), h.get("last-modified"))


def open_store(spec: str) -> HttpStore:
    return HttpStore(spec)
