"""``gguf.GGUFReader`` with the checks a file from anywhere needs before it is trusted.

The reference reader parses by offsets into a memory map and trusts the lengths it finds: a
truncated file gives short arrays (or an endless loop over an array that claims 2**63
elements), an unknown type number a bare ``ValueError``. This subclass checks, at the places
the reader reads: that every read lies inside the file, that an array's claimed length fits in
the bytes left, and that each tensor's type is known and its data inside the file, naming the
tensor or key that fails. Parsing itself stays the library's.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from zerostart.weights._errors import WeightsError

# the fewest bytes one element of an array of this type occupies in the file
_MIN_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}


class Reader(GGUFReader):
    def __init__(self, path: str) -> None:
        self.path = path
        self._key = "the header"  # what is being read, for errors
        self._depth = 0  # nesting of the value being read (0: between keys)
        self._what = "key"  # then "tensor", in the tensor table
        super().__init__(path, "r")

    def _get(self, offset, dtype, count=1, override_order=None):
        arr = super()._get(offset, dtype, count, override_order)
        if len(arr) != int(count):
            raise WeightsError(f"{self.path}: truncated while reading {self._key} (at byte {offset}, the file has "
                               f"{len(self.data)} bytes)")
        return arr

    def _build_fields(self, offs, count):
        if int(count) > len(self.data):
            raise WeightsError(f"{self.path}: the header claims {int(count)} metadata keys, more than the file could hold")
        return super()._build_fields(offs, count)

    def _get_str(self, offset):
        length, data = super()._get_str(offset)
        if self._depth == 0:  # a key's or a tensor's name (values are read one level down)
            self._key = f"{self._what} {bytes(data).decode('utf-8', 'replace')!r}"
        return length, data

    def _push_field(self, field, skip_sum=False):
        if field.name in self.fields:
            raise WeightsError(f"{self.path}: metadata key {field.name!r} appears twice")
        return super()._push_field(field, skip_sum)

    def _get_field_parts(self, orig_offs, raw_type):
        self._depth += 1
        try:
            return self._field_parts(orig_offs, raw_type)
        finally:
            self._depth -= 1

    def _field_parts(self, orig_offs, raw_type):
        try:
            gtype = GGUFValueType(int(raw_type))
        except ValueError:
            raise WeightsError(f"{self.path}: {self._key}: unknown value type {int(raw_type)}") from None
        if gtype == GGUFValueType.ARRAY:
            item = int(self._get(orig_offs, np.uint32)[0])
            length = int(self._get(orig_offs + 4, np.uint64)[0])
            try:
                itype = GGUFValueType(item)
            except ValueError:
                raise WeightsError(f"{self.path}: {self._key}: array of unknown value type {item}") from None
            per = _MIN_BYTES.get(itype) or np.dtype(self.gguf_scalar_to_np[itype]).itemsize
            if length * per > len(self.data) - orig_offs - 12:
                raise WeightsError(f"{self.path}: {self._key}: an array of {length} elements does not fit in the "
                                   f"{len(self.data) - orig_offs - 12} bytes left (truncated or corrupt)")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensor_info(self, offs, count):
        if int(count) * 24 > len(self.data):
            raise WeightsError(f"{self.path}: the header claims {int(count)} tensors, more than the file could hold")
        self._key, self._what = "the tensor table", "tensor"
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs, fields):
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise WeightsError(f"{self.path}: tensor {name!r} has unknown quantization type {int(raw_dtype[0])}") from None
            block, size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims.astype(np.uint64))) if len(dims) else 1
            if any(int(d) == 0 for d in dims) or n % block:
                raise WeightsError(f"{self.path}: tensor {name!r} has shape {dims.tolist()}, not a whole number of "
                                   f"{qtype.name} blocks of {block}")
            start, end = start_offs + int(offset[0]), start_offs + int(offset[0]) + n // block * size
            if end > len(self.data):
                raise WeightsError(f"{self.path}: tensor {name!r} ({qtype.name}) needs bytes {start}..{end}, but the file "
                                   f"ends at {len(self.data)} (truncated)")
        self._key = "the tensor data"
        super()._build_tensors(start_offs, fields)
