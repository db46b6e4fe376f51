"""A GGUF file's tensors in one arena, layer by layer: kept quantized, or dequantized.

Each tensor is read from the file's memory map, and its pages are dropped from the mapping once
it is copied (the page cache keeps them; mapped pages would count in the process's resident
memory beside the arena's copy until the whole load ended). With ``keep_quantized`` a matrix of a type in
``_quant.GGUF_FORMATS`` is held as its integers and group scales (``<prefix>.qweight``,
``.scales``, ``.mins``: the same values in the engine's layout, ``_quant.from_gguf``); other
tensors are dequantized by ``gguf.quants`` into float32 (F16/BF16/F32 tensors are only viewed).
Q/K rows are put back in Hugging Face order, floats cast to the load's dtype, and each part
copied into its slot: at most one tensor's converted copy per thread is alive at a time.
Within a layer, the parts of the matrices the engine fuses (q/k/v, gate/up) sit back to back
per kind, so fusing them moves no byte. Tensors are marked ready one by one in layer order, so
the engine can start on the first layers while later ones are still converting. Conversion
costs CPU time on every load; a ready image of the result (``zerostart snapshot``, or a server
model's ``images: write``) pays it once.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from zerostart.weights._arena import Arena, LoadStats, views
from zerostart.weights._dtypes import parse_dtype
from zerostart.weights._errors import WeightsError
from zerostart.weights._gguf import _LAYER_ORDER, TABLE, GgufModel, GgufTensor, _order, open_gguf
from zerostart.weights._quant import QUANT_SUFFIXES, from_gguf, gguf_qformat
from zerostart.weights._io import DIRECT_ALIGN, Region, align_up
from zerostart.weights._plan import TENSOR_ALIGN, Layout, Slot
from zerostart.weights._save import save_file
from zerostart.weights._store_local import file_identity

# stored types whose values a torch dtype holds exactly (no dequantization)
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def load_gguf(model: GgufModel, dev: torch.device, target: torch.dtype | None, *, threads: int = 0,
              progress: Callable[[int, int], None] | None = None, background: bool = False,
              allocator: Callable[[int, torch.device], torch.Tensor] | None = None, t_start: float = 0.0,
              keep_quantized: bool = False) -> Arena:
    """The model's tensors, under Hugging Face names, in one arena on ``dev`` (floats in
    ``target`` dtype; None: float32, or the stored dtype of F16/BF16 tensors). With
    ``keep_quantized`` the quantized matrices stay quantized (see the module's docstring)."""
    t_start = t_start or time.perf_counter()
    slots, size = _layout(model, target, keep_quantized)
    region, storage = _allocate(size, dev, allocator)
    stats = LoadStats(path=model.path, device=str(dev), bytes=model.nbytes, arena_bytes=size, files=1,
                      tensors=len(slots), strategy={"gguf": 1}, layout="gguf", residency=0.0)
    stats.threads = threads or max(1, min(4, os.cpu_count() or 1))
    arena = Arena(storage, views(storage, slots), Layout("gguf", size, slots, [], []), stats, region)
    stats.setup_s = time.perf_counter() - t_start
    job = _Dequantize(model, arena, stats.threads, progress, t_start, keep_quantized)
    if background:
        threading.Thread(target=job.run, name="zerostart-gguf-load", daemon=True).start()
    else:
        job.run()
        arena.wait()
    return arena


# the groups the engine fuses (gguf names): member -> (the group's first member, place in the group)
_FUSED = {"attn_q": ("attn_q", 0), "attn_k": ("attn_q", 1), "attn_v": ("attn_q", 2),
          "ffn_gate": ("ffn_gate", 0), "ffn_up": ("ffn_gate", 1)}
_KINDS = ("weight", "bias") + QUANT_SUFFIXES


def parts(t: GgufTensor, keep_quantized: bool) -> list[tuple[str, torch.dtype | None, tuple[int, ...]]]:
    """The arena tensors ``t`` becomes: (name, dtype or None for the load's float dtype, shape)."""
    fmt = gguf_qformat(t.qtype, t.shape) if keep_quantized and t.name.endswith(".weight") else None
    if fmt is None:
        return [(t.name, None, t.shape)]
    prefix = t.name.removesuffix(".weight")
    return [(f"{prefix}.{k}", dtype, shape) for k, (shape, dtype) in fmt.shapes().items()]


def _layout(model: GgufModel, target: torch.dtype | None, keep_quantized: bool) -> tuple[dict[str, Slot], int]:
    """Layer order; each fused group's members back to back per kind (q, k, v weights, then
    their biases, or their qweights, scales, mins), a group where its first member would be."""
    entries = []
    for t in model.tensors:
        stage, layer, _, _ = _order(t)
        part = t.gguf_name.split(".")[-2]
        first, member = _FUSED.get(part, (part, 0))
        where = _LAYER_ORDER.index(first) if first in _LAYER_ORDER else 0
        for name, dtype, shape in parts(t, keep_quantized):
            kind = name.rpartition(".")[2]
            entries.append(((stage, layer, where, first, _KINDS.index(kind), member), name,
                            dtype or target or _PLAIN.get(t.qtype, torch.float32), shape))
    entries.sort(key=lambda e: e[0])
    slots: dict[str, Slot] = {}
    cursor, previous = 0, None
    for key, name, dtype, shape in entries:
        follows = previous is not None and key[:5] == previous[:5] and key[5] == previous[5] + 1
        cursor = align_up(cursor, dtype.itemsize if follows else max(TENSOR_ALIGN, dtype.itemsize))
        slots[name] = Slot(name, cursor, dtype, shape, None, 0)
        n = 1
        for d in shape:
            n *= d
        cursor += n * dtype.itemsize
        previous = key
    return slots, align_up(cursor, TENSOR_ALIGN)


def _allocate(size: int, dev: torch.device, allocator) -> tuple[Region | None, torch.Tensor]:
    if dev.type == "cuda":
        n = align_up(max(size, 1), DIRECT_ALIGN)
        return None, (allocator(n, dev) if allocator is not None else torch.empty(n, dtype=torch.uint8, device=dev))
    region = Region.anonymous(max(size, 1))
    return region, region.tensor()


class _Dequantize:
    """The load's work: tensors in layer order over a few threads, each marked when in place."""

    def __init__(self, model: GgufModel, arena: Arena, threads: int, progress, t_start: float, keep: bool) -> None:
        self.model, self.arena, self.threads, self.progress, self.t_start = model, arena, threads, progress, t_start
        self.keep = keep
        self.done = 0
        self.failed = False
        self.lock = threading.Lock()

    def run(self) -> None:
        stats = self.arena.stats
        error: BaseException | None = None
        stats.read_from = time.perf_counter()
        try:
            _check_unchanged(self.model)
            with open(self.model.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            data = np.frombuffer(mapped, dtype=np.uint8)

            def one(t: GgufTensor) -> None:
                self.one(data, t)
                _unmap(mapped, t.offset, t.nbytes)

            with ThreadPoolExecutor(self.threads, thread_name_prefix="zerostart-dequant") as ex:
                list(ex.map(one, self.model.tensors))
            if self.arena.device.type == "cuda":
                torch.cuda.synchronize(self.arena.device)
        except BaseException as e:  # noqa: BLE001 - handed to the arena's waiters
            error = e
        stats.read_until = stats.copy_until = time.perf_counter()
        stats.copy_from, stats.started_at = stats.read_from, self.t_start
        stats.read_s = stats.copy_s = stats.read_until - stats.read_from
        stats.total_s = time.perf_counter() - self.t_start
        self.arena.finish(error)

    def one(self, data: np.ndarray, t: GgufTensor) -> None:
        if self.failed:
            return  # another tensor failed: the load is over
        try:
            out = convert(data, t, self.keep)
        except (ValueError, NotImplementedError) as e:
            self.failed = True
            raise WeightsError(f"{self.model.path}: tensor {t.gguf_name!r} ({t.qtype}) could not be converted: {e}") from None
        for name, src in out.items():
            dst = self.arena.tensors[name]
            dst.copy_(src.to(dst.dtype), non_blocking=False)
        self.arena.mark(list(out))
        with self.lock:
            self.done += t.nbytes
            if self.progress is not None:
                self.progress(self.done, self.model.nbytes)


def _unmap(mapped: mmap.mmap, offset: int, nbytes: int) -> None:
    """Drop the pages of [offset, offset + nbytes) from this process's map of the file (a later
    read of a shared edge page maps it again from the page cache)."""
    lo = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, lo, offset + nbytes - lo)


def convert(data: np.ndarray, t: GgufTensor, keep_quantized: bool) -> dict[str, torch.Tensor]:
    """One tensor in Hugging Face layout, as the parts :func:`parts` names: its quantized
    parts, or one float tensor (float32, or the stored dtype of F16/BF16 tensors)."""
    if keep_quantized and len(parts(t, True)) > 1:
        raw = data[t.offset : t.offset + t.nbytes]
        prefix = t.name.removesuffix(".weight")
        assert len(t.shape) == 2  # parts() holds matrices only
        return {f"{prefix}.{k}": _unpermute(torch.from_numpy(v), t.heads)
                for k, v in from_gguf(np.asarray(raw), t.qtype, (t.shape[0], t.shape[1])).items()}
    return {t.name: dequantize(data, t)}


def dequantize(data: np.ndarray, t: GgufTensor) -> torch.Tensor:
    """One tensor in Hugging Face layout: float32, or its stored dtype for F16/BF16 tensors."""
    raw = data[t.offset : t.offset + t.nbytes]
    if t.qtype in _PLAIN:
        out = torch.from_numpy(np.array(raw)).view(_PLAIN[t.qtype]).reshape(t.shape)
    else:
        rows = t.numel // t.shape[-1]
        values = gguf_dequantize(np.asarray(raw).reshape(rows, -1), GGMLQuantizationType[t.qtype])
        out = torch.from_numpy(values).reshape(t.shape)
    return _unpermute(out, t.heads)


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Q/K rows [N, ...] (whole rows: float, or a quantized matrix's parts) in Hugging Face order.
    llama.cpp stores each head's rotary pairs as [first halves..., second halves...]
    interleaved; Hugging Face keeps the halves apart: [heads, 2, d/2] <- [heads, d/2, 2]."""
    if not heads:
        return rows
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _check_unchanged(model: GgufModel) -> None:
    now = file_identity(os.stat(model.path))
    if now != model.identity:
        raise WeightsError(f"{model.path}: the file changed since its tensor table was read ({model.identity} -> {now}); "
                           "load it again")


def convert_gguf(path: str, out: str, dtype: str | torch.dtype = "bfloat16") -> str:
    """Write the model in a GGUF file as a Hugging Face checkpoint (``model.safetensors`` in
    ``dtype``, in layer order, config and tokenizer files) into the directory ``out``, which
    appears whole or not at all. Returns ``out``."""
    model = open_gguf(path)
    arena = load_gguf(model, torch.device("cpu"), parse_dtype(dtype))
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        save_file(arena.tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"}, keep_order=True)
        for name in os.listdir(model.dir):
            if name != TABLE:
                shutil.copyfile(os.path.join(model.dir, name), os.path.join(tmp, name))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)  # atomic; an empty directory is replaced, anything else refused
        except OSError:
            raise WeightsError(f"{out}: exists and is not empty; choose another directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
