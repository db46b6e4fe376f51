import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.weights._files import entry, raw_file
from zerostart.weights import Header, WeightsError, parse_header, read_header
from zerostart.weights._format import DTYPE_BITS, MAX_HEADER_BYTES


def write(tmp_path, blob: bytes, name="m.safetensors"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def test_valid_header_parses(tmp_path):
    hdr = {"b": entry("F32", [2], 8, 16), "a": entry("I64", [1], 0, 8), "__metadata__": {"format": "pt"}}
    p = write(tmp_path, raw_file(hdr, bytes(16)))
    h = read_header(p)
    assert isinstance(h, Header)
    assert list(h.tensors) == ["a", "b"]  # offset order
    assert h.tensors["b"].shape == (2,) and h.tensors["b"].nbytes == 8
    assert h.metadata == {"format": "pt"}
    assert h.data_size == 16 and h.data_start == h.file_size - 16


def test_zero_dim_and_empty_tensors(tmp_path):
    hdr = {"scalar": entry("F64", [], 0, 8), "empty": entry("BF16", [0, 7], 8, 8)}
    h = read_header(write(tmp_path, raw_file(hdr, bytes(8))))
    assert h.tensors["scalar"].shape == () and h.tensors["scalar"].numel == 1
    assert h.tensors["empty"].nbytes == 0


def test_no_tensors(tmp_path):
    h = read_header(write(tmp_path, raw_file({}, b"")))
    assert h.tensors == {}


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"", "truncated file"),
        (b"\x10\x00\x00", "truncated file"),
        (struct.pack("<Q", 1000) + b"{}", "beyond the end of the file"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "over the 100000000-byte limit"),
        (raw_file({}, b"", header_bytes=b"{not json"), "not valid JSON"),
        (raw_file({}, b"", header_bytes=b"[1, 2]"), "not a JSON object"),
        (raw_file({}, b"", header_bytes=b'{"a": 1, "a": 2}'), "has key 'a' twice"),
        (raw_file({}, b"", header_bytes=b'{"\xff": 1}'), "not valid UTF-8"),
        (raw_file({}, b"", header_bytes=b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"), "nested too deeply"),
    ],
)
def test_malformed_containers(tmp_path, blob, match):
    p = write(tmp_path, blob)
    with pytest.raises(WeightsError, match=match) as e:
        read_header(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "hdr, data, match",
    [
        ({"w": entry("F33", [1], 0, 4)}, 4, "tensor 'w': unknown dtype 'F33'"),
        ({"w": entry("F32", [3], 0, 8)}, 8, r"tensor 'w': shape \[3\] x F32 is 12 bytes but its byte range \[0, 8\) holds 8"),
        ({"w": entry("F32", [2], 0, 8), "v": entry("F32", [2], 4, 12)}, 12, "tensor 'v' overlaps"),
        ({"w": entry("F32", [1], 0, 4), "v": entry("F32", [1], 8, 12)}, 12, "hole of 4 bytes before tensor 'v'"),
        ({"w": entry("F32", [1], 4, 8)}, 8, "hole of 4 bytes before tensor 'w'"),
        ({"w": entry("F32", [4], 0, 16)}, 8, "tensor 'w' ends at byte 16 of the data section, beyond its 8 bytes"),
        ({"w": entry("F32", [1], 0, 4)}, 12, "8 trailing bytes after the last tensor"),
        ({"w": entry("F32", [1], 8, 4)}, 8, "begin 8 is after end 4"),
        ({"w": entry("F32", [-1], 0, 4)}, 4, "non-negative integers"),
        ({"w": entry("F32", [1.0], 0, 4)}, 4, "non-negative integers"),  # type: ignore[list-item]  # on purpose
        ({"w": entry("F32", [True], 0, 4)}, 4, "non-negative integers"),
        ({"w": {"dtype": "F32", "shape": [1]}}, 4, "data_offsets must be"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, 4, "unexpected keys"),
        ({"w": [1, 2]}, 4, "entry is not an object"),
        ({"w": entry("F4", [3], 0, 1)}, 1, "not a whole number of bytes"),
        ({"__metadata__": {"a": 1}}, 0, "__metadata__ must be an object of strings"),
    ],
)
def test_malformed_tensors(tmp_path, hdr, data, match):
    p = write(tmp_path, raw_file(hdr, bytes(data)))
    with pytest.raises(WeightsError, match=match) as e:
        read_header(p)
    assert str(p) in str(e.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(WeightsError, match="is a directory"):
        read_header(tmp_path)


def test_weights_error_is_value_error():
    assert issubclass(WeightsError, ValueError)


def test_parser_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, zerostart.weights as w; w.resolve; w.read_header; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fuzzing: no input may make the parser fail with anything but WeightsError -----------------

def _check_parse(blob: bytes) -> None:
    try:
        parse_header(blob)
    except WeightsError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(blob):
    _check_parse(blob)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_header_bytes(hb):
    _check_parse(struct.pack("<Q", len(hb)) + hb + bytes(16))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(sorted(DTYPE_BITS)) | st.text(max_size=5) | json_values,
        "shape": st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(min_value=-3, max_value=2**66), min_size=0, max_size=3) | json_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5), st.integers(0, 64))
def test_fuzz_structured_headers(hdr, data_len):
    _check_parse(raw_file(hdr, bytes(data_len)))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_file(data):
    hdr = {"a": entry("F32", [2, 2], 0, 16), "b": entry("BF16", [3], 16, 22), "__metadata__": {"k": "v"}}
    blob = bytearray(raw_file(hdr, bytes(22)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    _check_parse(bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob))


def test_header_json_is_exactly_what_safetensors_writes(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    p = tmp_path / "ref.safetensors"
    save_file({"x": torch.zeros(3, 5, dtype=torch.float16), "y": torch.ones(2, dtype=torch.int32)}, str(p), metadata={"m": "1"})
    h = read_header(p)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    ref = json.loads(raw[8 : 8 + n])
    for name in ("x", "y"):
        assert list(h.tensors[name].shape) == ref[name]["shape"]
        assert [h.tensors[name].start, h.tensors[name].end] == ref[name]["data_offsets"]
        assert h.tensors[name].dtype == ref[name]["dtype"]
    assert h.metadata == {"m": "1"}
