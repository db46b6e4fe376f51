"""Worker pieces that need no server: the grammar a chat request's tools and response_format
ask for, embedding inputs and encodings, log-probability shapes, the heap policy and the code pages it releases."""

import base64
import ctypes
import json
import struct
import subprocess
import sys
from typing import Any

import pytest

from zerostart.engine import TokenLogprob, ToolParser, tool_parser
from zerostart.serve.edge import BadRequest
from zerostart.serve.edge import DetokenizeRequest, EmbeddingRequest, TokenizeRequest, parse_request
from zerostart.serve.worker._embeddings import body, encode
from zerostart.serve.worker._logprobs import CompletionLogprobs, chat_logprobs
from zerostart.serve.worker._structured import plan

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def parser(tiny_dir):
    from zerostart.engine import Tokenizer

    return tool_parser("hermes", Tokenizer(tiny_dir))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from zerostart.engine.demo import write_demo_model

    return write_demo_model(str(tmp_path_factory.mktemp("demo") / "tiny"), size="tiny", seed=0)


def test_tool_choice_plans(parser: ToolParser):
    assert plan(parser, TOOLS, "none", True, None).tools is None
    auto = plan(parser, TOOLS, None, True, None)
    assert auto.tools == TOOLS and auto.parser is parser and auto.constraint is None
    forced = plan(parser, TOOLS, {"type": "function", "function": {"name": "f"}}, True, None)
    assert forced.constraint is not None
    assert forced.constraint.kind == "lark" and "<tool_call>" in forced.constraint.spec
    fmt = plan(parser, None, None, True, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert fmt.constraint is not None and fmt.constraint.kind == "json_schema" and fmt.tools is None
    obj = plan(parser, None, None, True, {"type": "json_object"}).constraint
    assert obj is not None and obj.kind == "json_object"


@pytest.mark.parametrize("tools, choice, fmt, param", [
    (TOOLS, "sometimes", None, "tool_choice"),
    (None, "required", None, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "g"}}, None, "tool_choice"),
    (TOOLS, "required", {"type": "json_object"}, "response_format"),
    (None, None, {"type": "json_schema"}, "response_format"),
    (None, None, {"type": "yaml"}, "response_format"),
])
def test_bad_tool_requests_name_the_field(parser, tools, choice, fmt, param):
    with pytest.raises(BadRequest) as e:
        plan(parser, tools, choice, True, fmt)
    assert e.value.param == param


def _parse(schema, **body):
    return parse_request(schema, json.dumps({"model": "m", **body}).encode())


def test_embedding_inputs_and_base64():
    def inputs(value):
        return _parse(EmbeddingRequest, input=value).inputs()

    assert inputs("a") == ["a"] and inputs(["a", "b"]) == ["a", "b"] and inputs([1, 2]) == [[1, 2]]
    assert inputs([[1], [2, 3]]) == [[1], [2, 3]]
    bad: Any
    for bad in ([], [[]], ["a", 1], [-1], "", {"a": 1}):
        with pytest.raises(BadRequest, match="input"):
            inputs(bad)
    with pytest.raises(BadRequest, match="encoding_format"):
        _parse(EmbeddingRequest, input="a", encoding_format="int8")
    vec = [0.5, -1.25, 3.0]
    b64 = encode(vec, "base64")
    assert isinstance(b64, str) and list(struct.unpack("<3f", base64.b64decode(b64))) == vec
    out = body("m", [vec], "float", 7)
    assert out["data"][0] == {"object": "embedding", "index": 0, "embedding": vec} and out["usage"]["total_tokens"] == 7


def test_logprob_shapes():
    text_of = {1: ("A", b"A"), 2: ("b", b"b"), 3: ("cd", b"cd")}.__getitem__
    chat = chat_logprobs(text_of, [TokenLogprob(2, -0.5, ((2, -0.5), (3, -1.0)))])
    assert chat == {"content": [{"token": "b", "logprob": -0.5, "bytes": [98], "top_logprobs": [
        {"token": "b", "logprob": -0.5, "bytes": [98]}, {"token": "cd", "logprob": -1.0, "bytes": [99, 100]}]}]}
    c = CompletionLogprobs(text_of)
    c.add_first(1)
    c.add(TokenLogprob(3, -2.0, ((2, -0.1),)))
    assert c.body() == {"tokens": ["A", "cd"], "token_logprobs": [None, -2.0],
                        "top_logprobs": [None, {"b": -0.1, "cd": -2.0}], "text_offset": [0, 1]}
    assert c.body(1)["tokens"] == ["cd"]


def test_tokenize_detokenize_info(tiny_dir):
    from zerostart.engine import Tokenizer
    from zerostart.serve.worker._tokenize import detokenize, tokenize, tokenizer_info

    tok = Tokenizer(tiny_dir)
    out = tokenize(tok, 1024, _parse(TokenizeRequest, prompt="Hello world", return_token_strs=True))
    assert out["tokens"] == tok.encode("Hello world") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 1024 and len(out["token_strs"]) == out["count"]
    assert tokenize(tok, 1024, _parse(TokenizeRequest, prompt="Hello", add_special_tokens=False))["tokens"] == \
        tok.encode("Hello", add_special_tokens=False)
    chat = tokenize(tok, 1024, _parse(TokenizeRequest, messages=[{"role": "user", "content": "hi"}]))
    assert chat["tokens"] == tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]),
                                        add_special_tokens=False)
    assert detokenize(tok, _parse(DetokenizeRequest, tokens=out["tokens"]))["prompt"] == tok.decode(out["tokens"])
    for bad in ([-1], "x", [10**9]):
        with pytest.raises(BadRequest, match="tokens"):
            detokenize(tok, _parse(DetokenizeRequest, tokens=bad))
    bad_bodies: list[dict[str, Any]] = [{}, {"prompt": "a", "messages": [{"role": "user", "content": "hi"}]}]
    for body_ in bad_bodies:
        with pytest.raises(BadRequest, match="prompt"):
            _parse(TokenizeRequest, **body_)
    info = tokenizer_info(tok, 1024)
    assert info["eos_token"] == "<|eot_id|>" and info["chat_template"] and info["model_max_length"] == 1024


_MALLOC_PROBE = r"""
import ctypes, sys
from zerostart.serve.worker import _memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] in ("loading", "serving"):
    assert _memory.for_loading()
if sys.argv[1] == "serving":
    assert _memory.for_serving()
libc.free(libc.malloc(16 << 20))  # a large free: glibc's dynamic threshold rises to 16 MiB
for size in (2 << 20, 24 << 20):  # is each block a mapping of its own?
    before = libc.mallinfo2().hblkhd
    libc.malloc(size)
    print(libc.mallinfo2().hblkhd - before >= size, end=" ")
assert _memory.trim()
"""


def test_the_worker_maps_the_loads_blocks_apart_and_keeps_the_steps():
    """The worker's heap policy (``_memory.py``): while loading, 2 MiB and larger blocks are
    mapped on their own (and unmapped when freed) even after a larger free, which left to glibc
    raises the threshold so such blocks stay in the heap; while serving, blocks up to 32 MiB
    come from the heap, for the steps to reuse without faulting them in again."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33+")
    out = {mode: subprocess.run([sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True,
                                check=True).stdout.strip() for mode in ("default", "loading", "serving")}
    assert out == {"default": "False True", "loading": "True True", "serving": "False False"}


_SMAPS = """\
7f0000000000-7f0000100000 r-xp 00000000 fd:01 11 /venv/lib/libtorch_cpu.so
Rss:                 400 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000100000-7f0000200000 r--p 00100000 fd:01 11 /venv/lib/libtorch_cpu.so
Rss:                 100 kB
Anonymous:            12 kB
7f0000200000-7f0000300000 rw-p 00200000 fd:01 11 /venv/lib/libtorch_cpu.so
Rss:                  50 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r--s 00000000 fd:01 12 /venv/lib/libshared.so.1
Rss:                  80 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00000000 fd:01 13 /models/x/model.safetensors
Rss:                  80 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 r--p 00000000 fd:01 14 /usr/lib/libc.so.6
Rss:                   0 kB
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 fd:01 15 /usr/lib/x86_64-linux-gnu/libz.so.1.2.13 (deleted)
Rss:                   8 kB
Anonymous:             0 kB
7f0000700000-7f0000800000 rw-p 00000000 00:00 0
Rss:                  64 kB
Anonymous:            64 kB
"""


def test_only_a_librarys_own_bytes_are_released(tmp_path):
    """``release_code`` unmaps a library's read-only private pages that hold no copies of their
    own, and nothing else: not a writable or relocated (copied-on-write) mapping, not a shared one,
    not a model file's, not anonymous memory."""
    from zerostart.serve.worker._memory import _clean_file_mappings

    smaps = tmp_path / "smaps"
    smaps.write_text(_SMAPS)
    assert _clean_file_mappings(str(smaps)) == [(0x7F0000000000, 0x7F0000100000, 400 << 10),
                                                (0x7F0000600000, 0x7F0000700000, 8 << 10)]


_RELEASE_PROBE = r"""
import numpy as np
from zerostart.serve.worker import _memory

np.linalg.svd(np.ones((64, 64)))
released = _memory.release_code()
left = sum(r for _, _, r in _memory._clean_file_mappings("/proc/self/smaps"))  # mapped back since
s = np.linalg.svd(np.diag([3.0, 2.0, 1.0]), compute_uv=False)
print(released > (1 << 20), left < released // 2, [round(float(x), 6) for x in s])
"""


def test_the_libraries_code_is_released_and_runs_again():
    """A process that released its libraries' resident code (numpy's, Python's, libc's) holds
    less than half of it, and the code still runs, mapped back from the page cache."""
    out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 2) == ["True", "True", "[3.0, 2.0, 1.0]\n"]
