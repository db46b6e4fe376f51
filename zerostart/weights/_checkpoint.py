"""Resolve a checkpoint path to its safetensors files (the Hugging Face layouts)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from zerostart.weights._format import Header, read_header
from zerostart.weights._errors import WeightsError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    path: str  # what the user named: a file or a directory
    headers: tuple[Header, ...]  # one per file, in load order

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the data sections), excluding headers."""
        return sum(h.data_size for h in self.headers)

    @property
    def tensor_names(self) -> list[str]:
        return [n for h in self.headers for n in h.tensors]


def resolve(path: str | os.PathLike[str]) -> Checkpoint:
    """A ``.safetensors`` file, or a directory holding ``model.safetensors`` or shards listed by
    ``model.safetensors.index.json`` (or one other ``*.safetensors.index.json``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return _from_index(path)
        return Checkpoint(path, (read_header(path),))
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: neither a regular file nor a directory")
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        return _from_index(index, root=path)
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return Checkpoint(path, (read_header(single),))
    entries = sorted(os.listdir(path))
    indexes = [e for e in entries if e.endswith(".safetensors.index.json")]
    if len(indexes) == 1:
        return _from_index(os.path.join(path, indexes[0]), root=path)
    files = [e for e in entries if e.endswith(".safetensors")]
    if len(files) == 1:
        return Checkpoint(path, (read_header(os.path.join(path, files[0])),))
    found = ", ".join(indexes + files) or "no .safetensors files"
    raise WeightsError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} here (found: {found})")


def _from_index(index_path: str, root: str | None = None) -> Checkpoint:
    root = os.path.dirname(index_path) if root is None else root
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsError(f"{index_path}: not a valid JSON index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index_path}: missing or malformed 'weight_map' (an object of tensor name -> shard file)")
    shards: dict[str, Header] = {}
    for shard in dict.fromkeys(weight_map.values()):  # first-seen order
        shard_path = os.path.join(root, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
            raise WeightsError(f"{index_path}: names shard {shard!r}, which is missing from {root}")
        shards[shard] = read_header(shard_path)
    for name, shard in weight_map.items():
        if name not in shards[shard].tensors:
            raise WeightsError(f"{index_path}: tensor {name!r} is absent from the shard it names ({shard})")
    seen: dict[str, str] = {}
    for shard, header in shards.items():
        for name in header.tensors:
            if name in seen:
                raise WeightsError(f"{index_path}: tensor {name!r} is in both {seen[name]} and {shard}")
            seen[name] = shard
    return Checkpoint(root, tuple(shards.values()))
