"""Local paths: a model directory, one ``.safetensors`` file or index, or one ``.gguf`` file.

A file's identity is its size, modification and change times and inode: writing it in place,
replacing it by a rename, or restoring an old modification time (which sets the change time)
all change it, and a ``stat`` per file is all it costs.
"""

from __future__ import annotations

import os

from zerostart.weights._errors import WeightsError
from zerostart.weights._io import pread_into
from zerostart.weights._store import MODEL_FILES, ObjectInfo, digest


class LocalStore:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.path = os.path.abspath(os.path.expanduser(spec))

    def local_dir(self) -> str:
        return self.path if os.path.isdir(self.path) else os.path.dirname(self.path)

    def list(self) -> list[ObjectInfo]:
        if not os.path.exists(self.path):
            raise WeightsError(f"{self.spec}: no such file or directory")
        d = self.local_dir()
        names = set(MODEL_FILES) & set(os.listdir(d))
        if os.path.isdir(self.path):
            names |= {n for n in os.listdir(d) if n.endswith((".safetensors", ".safetensors.index.json", ".gguf"))}
        else:
            names.add(os.path.basename(self.path))
        return [self.stat(n) for n in sorted(names) if os.path.isfile(os.path.join(d, n))]

    def stat(self, name: str) -> ObjectInfo:
        path = os.path.join(self.local_dir(), name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise WeightsError(f"{path}: no such file") from None
        return ObjectInfo(path, st.st_size, file_identity(st))

    def read_range(self, obj: ObjectInfo, offset: int, buf: memoryview) -> None:
        fd = os.open(obj.url, os.O_RDONLY)
        try:
            pread_into(fd, buf[: max(0, min(len(buf), obj.size - offset))], offset, obj.size, obj.url)
        finally:
            os.close(fd)

    def identity(self) -> str:
        return digest(self.list())

    def close(self) -> None:
        pass


def file_identity(st: os.stat_result) -> str:
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}"


def open_store(spec: str) -> LocalStore:
    return LocalStore(spec)
