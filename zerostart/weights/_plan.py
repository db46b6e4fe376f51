"""Where every byte goes: the arena layout of a checkpoint and the read items that fill it.

Two layouts:

- **mirror** (no dtype change): each file occupies its own page-aligned region of the arena,
  at the same offsets as in the file. One read (or one file mapping) fills a whole range, and
  direct I/O lands aligned file blocks on aligned arena addresses. A tensor whose file offset
  is not a multiple of its element size (legal but rare) is relocated to an aligned slot at
  the end of the arena after the load.
- **packed** (a dtype cast during the load): tensors of the target dtype laid out one after
  another, each at a 256-byte boundary. Bytes pass through bounded staging buffers and are
  converted on their way in; nothing holds a second full copy.
"""

from __future__ import annotations

import bisect

from dataclasses import dataclass, field

import torch

from zerostart.weights._checkpoint import Checkpoint
from zerostart.weights._dtypes import to_torch
from zerostart.weights._format import Header, TensorInfo
from zerostart.weights._io import DIRECT_ALIGN, PAGE, align_down, align_up

TENSOR_ALIGN = 256  # packed-layout tensor alignment (bytes); also the relocation slot alignment

# Floating dtypes a load-time cast applies to. Others (integers, bool, fp8 with their scales)
# keep their stored dtype, as Hugging Face's torch_dtype does.
CASTABLE = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclass(frozen=True)
class Slot:
    """A tensor's place in the arena."""

    name: str
    offset: int  # arena byte offset
    dtype: torch.dtype  # dtype in the arena
    shape: tuple[int, ...]
    src: TensorInfo | None  # where it is in its safetensors file (None: not from one)
    file: int  # index of the file holding it
    relocate_from: int | None = None  # mirror layout: unaligned offset to copy from after the load

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass
class Delivery:
    """Part of a read item that goes somewhere other than straight into the arena."""

    buf_offset: int  # offset of the source bytes in the item's read buffer
    nbytes: int  # source bytes
    arena_offset: int  # destination byte offset in the arena (for a cast: of the first element)
    src_dtype: torch.dtype | None = None  # set when the bytes are converted on the way
    dst_dtype: torch.dtype | None = None


@dataclass
class Item:
    """One positional read of ``[start, end)`` from a file (``end`` may pass EOF when aligned)."""

    file: int
    start: int
    end: int
    payload: int  # tensor bytes this item carries (for progress)
    arena_offset: int | None = None  # mirror: the read lands in the arena here (no staging)
    deliveries: list[Delivery] = field(default_factory=list)  # staged: where the bytes go
    tensors: tuple[str, ...] = ()  # tensors (fully or partly) carried by this item
    populate: bool = False  # a mapped file's span: fault its pages in (no read into memory)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class Layout:
    mode: str  # "mirror" | "packed"
    size: int  # arena bytes
    slots: dict[str, Slot]
    file_base: list[int]  # mirror: arena offset of each file's region (file offset 0)
    file_span: list[int]  # mirror: bytes of each file's region


def plan_layout(ckpt: Checkpoint, target: torch.dtype | None, align_files: int = PAGE) -> Layout:
    """The arena layout for ``ckpt`` (mirror without a cast, packed with one)."""
    need_cast = target is not None and any(
        to_torch(t.dtype) in CASTABLE and to_torch(t.dtype) != target for h in ckpt.headers for t in h.tensors.values())
    return _packed(ckpt, target) if target is not None and need_cast else _mirror(ckpt, align_files)


def _mirror(ckpt: Checkpoint, align_files: int) -> Layout:
    slots: dict[str, Slot] = {}
    bases, spans = [], []
    cursor = 0
    for h in ckpt.headers:
        base = align_up(cursor, align_files)
        span = align_up(h.file_size, DIRECT_ALIGN)
        bases.append(base)
        spans.append(span)
        cursor = base + span
    reloc = align_up(cursor, TENSOR_ALIGN)
    for i, h in enumerate(ckpt.headers):
        for t in h.tensors.values():
            dt = to_torch(t.dtype, f"{h.path}: tensor {t.name!r}: ")
            off = bases[i] + h.data_start + t.start
            if off % dt.itemsize:
                slots[t.name] = Slot(t.name, reloc, dt, t.shape, t, i, relocate_from=off)
                reloc = align_up(reloc + t.nbytes, TENSOR_ALIGN)
            else:
                slots[t.name] = Slot(t.name, off, dt, t.shape, t, i)
    return Layout("mirror", max(reloc, cursor), slots, bases, spans)


def _packed(ckpt: Checkpoint, target: torch.dtype) -> Layout:
    slots: dict[str, Slot] = {}
    cursor = 0
    for i, h in enumerate(ckpt.headers):
        for t in h.tensors.values():
            src = to_torch(t.dtype, f"{h.path}: tensor {t.name!r}: ")
            dt = target if src in CASTABLE else src
            slots[t.name] = Slot(t.name, cursor, dt, t.shape, t, i)
            cursor = align_up(cursor + _numel(t.shape) * dt.itemsize, TENSOR_ALIGN)
    return Layout("packed", cursor, slots, [], [])


def mirror_items(h: Header, file: int, base: int, chunk: int, direct: bool) -> list[Item]:
    """Reads covering a file's data section, landing straight in its mirror region at ``base``.

    With direct I/O every range is block-aligned (the region mirrors file offsets, so aligned
    file offsets land on aligned arena addresses); the last may run past EOF.
    """
    start = align_down(h.data_start, DIRECT_ALIGN)
    stop = align_up(h.file_size, DIRECT_ALIGN) if direct else h.file_size
    chunk = max(DIRECT_ALIGN, align_down(chunk, DIRECT_ALIGN))
    infos = list(h.tensors.values())
    starts = [t.start for t in infos]
    items: list[Item] = []
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        payload = max(0, min(b, h.file_size) - max(a, h.data_start))
        items.append(Item(file, a, b, payload, arena_offset=base + a, tensors=_names_in(h, infos, starts, a, b)))
    return items


def populate_items(h: Header, file: int, base: int, span: int, sums=None) -> list[Item]:
    """Spans of a file mapped at ``base`` whose pages the reader threads fault in (and check),
    in file order so early layers are ready first. With checksums, spans cover whole blocks."""
    if sums is not None:
        step = max(sums.block_bytes, span // sums.block_bytes * sums.block_bytes)
        cuts = ([0] if sums.data_start else []) + list(range(sums.data_start, h.file_size, step)) + [h.file_size]
    else:
        cuts = list(range(0, h.file_size, span)) + [h.file_size]
    infos = list(h.tensors.values())
    starts = [t.start for t in infos]
    items = []
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        payload = max(0, b - max(a, h.data_start))
        items.append(Item(file, a, b, payload, arena_offset=base + a, tensors=_names_in(h, infos, starts, a, b), populate=True))
    return items


def staged_mirror_items(h: Header, file: int, base: int, chunk: int, direct: bool) -> list[Item]:
    """Like :func:`mirror_items`, but each read goes to a staging buffer and is then copied
    whole to its mirror position (the CUDA path without a cast)."""
    items = mirror_items(h, file, base, chunk, direct)
    for it in items:
        n = min(it.end, h.file_size) - it.start
        it.deliveries = [Delivery(0, n, base + it.start)]
        it.arena_offset = None
    return items


def packed_items(h: Header, file: int, slots: dict[str, Slot], chunk: int, direct: bool) -> list[Item]:
    """Reads of whole small tensors grouped up to ``chunk`` bytes, and element-aligned pieces of
    large ones; each delivers (and converts) its bytes into the tensors' packed slots."""
    items: list[Item] = []
    group: list[tuple[TensorInfo, int, int]] = []  # (tensor, byte offset in tensor, bytes)

    def flush() -> None:
        if not group:
            return
        first, last = group[0], group[-1]
        fstart = h.data_start + first[0].start + first[1]
        fend = h.data_start + last[0].start + last[1] + last[2]
        a = align_down(fstart, DIRECT_ALIGN) if direct else fstart
        b = min(align_up(fend, DIRECT_ALIGN), align_up(h.file_size, DIRECT_ALIGN)) if direct else fend
        deliveries = []
        for t, off, n in group:
            s = slots[t.name]
            src = to_torch(t.dtype)
            elem = off // src.itemsize
            deliveries.append(Delivery(h.data_start + t.start + off - a, n, s.offset + elem * s.dtype.itemsize,
                                       src if src != s.dtype else None, s.dtype if src != s.dtype else None))
        items.append(Item(file, a, b, sum(n for _, _, n in group), deliveries=deliveries,
                          tensors=tuple(dict.fromkeys(t.name for t, _, _ in group))))
        group.clear()

    size = 0
    for t in h.tensors.values():
        if t.nbytes == 0:
            continue
        itemsize = to_torch(t.dtype).itemsize
        if t.nbytes > chunk:
            flush()
            size = 0
            # pieces that keep element boundaries and (where the chunk allows) block alignment
            piece = align_down(chunk, itemsize * DIRECT_ALIGN) or max(itemsize, align_down(chunk, itemsize))
            for off in range(0, t.nbytes, piece):
                group.append((t, off, min(piece, t.nbytes - off)))
                flush()
            continue
        if size + t.nbytes > chunk:
            flush()
            size = 0
        group.append((t, 0, t.nbytes))
        size += t.nbytes
    flush()
    return items


def _names_in(h: Header, infos: list[TensorInfo], starts: list[int], a: int, b: int) -> tuple[str, ...]:
    """Names of the tensors overlapping file bytes ``[a, b)`` (``infos`` in offset order)."""
    lo, hi = a - h.data_start, b - h.data_start
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    out = []
    while i < len(infos) and infos[i].start < hi:
        if infos[i].end > lo or (infos[i].nbytes == 0 and infos[i].start >= lo):
            out.append(infos[i].name)
        i += 1
    return tuple(out)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
