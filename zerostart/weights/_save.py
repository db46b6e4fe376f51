"""Write safetensors files atomically (temp file + fsync + rename): a reader never sees a
partial file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import torch

from zerostart.weights._dtypes import SAFETENSORS_NAMES

_WRITE_BLOCK = 64 << 20
# The reference writer's dtype order; tensors are written by descending rank, then name.
_RANK = {n: i for i, n in enumerate(
    ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0",
     "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"])}


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None,
              *, keep_order: bool = False) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format.

    Tensors are laid out as the reference writer lays them out (by dtype, widest first, then
    name: every tensor aligned to its element size), or with ``keep_order`` in the mapping's
    order (layer order keeps a layer's tensors together, and q/k/v back to back for a fused
    matmul); the header is padded to 8 bytes.
    """
    path = os.fspath(path)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    order = list(tensors) if keep_order else sorted(tensors, key=lambda n: (-_RANK[SAFETENSORS_NAMES[tensors[n].dtype]], n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name in order:
                t = tensors[name].detach()
                if t.numel() == 0:
                    continue
                flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
                for i in range(0, flat.numel(), _WRITE_BLOCK):
                    f.write(flat[i : i + _WRITE_BLOCK].numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
