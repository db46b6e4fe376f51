"""A foreign engine's cold-start phases from its log lines, timed as they arrive."""

from __future__ import annotations

from zerostart.serve.backends._log_phases import (SGLANG_DETAILS, SGLANG_LAST, SGLANG_MARKERS, VLLM_DETAILS,
                                                  VLLM_LAST, VLLM_MARKERS, LogPhases)

# Lines vLLM 0.32 (CPU build) printed during one start of SmolLM2 here, with the seconds since
# the spawn at which they arrived (abridged: one line per kind).
VLLM_LOG = [
    (17.76, "Triton is installed, but doesn't include CPU backend. Disabling Triton."),
    (22.40, "(APIServer pid=22353) INFO 12-01 22:03:27 [api_utils.py:286] non-default args: {'host': '127.0.0.1'}"),
    (34.38, "(EngineCore pid=22632) INFO 12-01 22:03:39 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config"),
    (73.04, "(Worker pid=22982) INFO 12-01 22:04:17 [cpu_model_runner.py:68] Starting to load model /m..."),
    (78.55, "(Worker pid=22982) INFO 12-01 22:04:23 [_loader.py:80] zerostart loaded /m: 0.269 GB in 0.79 s "
            "(0.34 GB/s; files by strategy {'mmap': 1}; 0 bytes verified)"),
    (78.60, "(Worker pid=22982) INFO 12-01 22:04:23 [default_loader.py:501] Loading weights took 3.88 seconds"),
    (85.44, "(EngineCore pid=22632) INFO 12-01 22:04:30 [kv_cache_utils.py:2327] CPU KV cache size: 11,648 tokens, "
            "Maximum concurrency for 8,192 tokens per request: 1.42x"),
    (86.28, "(EngineCore pid=22632) INFO 12-01 22:04:31 [core.py:402] init engine (profile, create kv cache, warmup "
            "model) took 0.85 s (compilation: 31.20 s)"),
    (98.40, "(APIServer pid=22353) INFO 12-01 22:04:43 [entry.py:140] Starting vLLM server on http://127.0.0.1:18123"),
]


def feed(phases: LogPhases, log: list[tuple[float, str]], origin: float = 100.0) -> None:
    for at, line in log:
        phases.feed(line, origin + at)


def test_vllm_phases_follow_its_log():
    p = LogPhases(VLLM_MARKERS, VLLM_LAST, origin=100.0, details=VLLM_DETAILS)
    assert p.current == "import"
    feed(p, VLLM_LOG[:4])
    assert p.current == "read"  # "Starting to load model" ended device_init
    feed(p, VLLM_LOG[4:])
    assert p.current == "server_init"
    tl = p.timeline(ready_at=100.0 + 101.76, label="vllm")
    got = {ph.name: (round(ph.start, 2), round(ph.end, 2)) for ph in tl.phases}
    assert got == {"import": (0.0, 22.4), "device_init": (22.4, 73.04), "read": (73.04, 78.6),
                   "warmup": (78.6, 86.28), "server_init": (86.28, 101.76)}
    d = {ph.name: ph.detail for ph in tl.phases}
    assert d["read"] == {"load_s": 3.88, "zerostart_gb": 0.269, "zerostart_read_s": 0.79, "zerostart_gbps": 0.34}
    assert d["warmup"] == {"kv_tokens": 11648, "engine_s": 0.85, "compile_s": 31.2}
    assert tl.total == 101.76 or abs(tl.total - 101.76) < 1e-9


def test_a_missing_marker_merges_its_phase_into_the_next():
    p = LogPhases(VLLM_MARKERS, VLLM_LAST, origin=0.0, details=VLLM_DETAILS)
    feed(p, [line for line in VLLM_LOG if "Starting to load model" not in line[1]], origin=0.0)
    names = [(ph.name, round(ph.start, 2), round(ph.end, 2)) for ph in p.timeline(101.76).phases]
    assert names == [("import", 0.0, 22.4), ("read", 22.4, 78.6), ("warmup", 78.6, 86.28),
                     ("server_init", 86.28, 101.76)]


def test_markers_match_once_and_lines_after_ready_do_not_count():
    p = LogPhases(VLLM_MARKERS, VLLM_LAST, origin=0.0)
    feed(p, VLLM_LOG, origin=0.0)
    feed(p, [(200.0, "Loading weights took 9.99 seconds")], origin=0.0)  # a later reload
    tl = p.timeline(101.76)
    read = tl.get("read")
    assert read is not None and read.end == 78.6 and read.detail == {"load_s": 3.88}


def test_sglang_phases():
    log = [(1.0, "[2026-12-01 22:27:48] server_args=ServerArgs(model_path='/x')"),
           (5.0, "[2026-12-01 22:27:52] Load weight begin. avail mem=20.00 GB"),
           (9.5, "[2026-12-01 22:27:57] Load weight end. elapsed=4.50 s, type=LlamaForCausalLM, avail mem=19.70 GB"),
           (10.0, "[2026-12-01 22:27:57] KV Cache is allocated. #tokens: 4096, K size: 0.05 GB, V size: 0.05 GB"),
           (12.0, "[2026-12-01 22:27:59] Capture cuda graph end. Time elapsed: 1.80 s. mem usage=0.1 GB"),
           (13.0, "[2026-12-01 22:28:00] The server is fired up and ready to roll!")]
    p = LogPhases(SGLANG_MARKERS, SGLANG_LAST, origin=0.0, details=SGLANG_DETAILS)
    feed(p, log, origin=0.0)
    tl = p.timeline(13.2)
    assert [(ph.name, ph.start, ph.end) for ph in tl.phases] == [
        ("import", 0.0, 1.0), ("device_init", 1.0, 5.0), ("read", 5.0, 9.5), ("prepare", 9.5, 10.0),
        ("warmup", 10.0, 13.0), ("server_init", 13.0, 13.2)]
    read, prepare, warmup = tl.get("read"), tl.get("prepare"), tl.get("warmup")
    assert read is not None and prepare is not None and warmup is not None
    assert read.detail == {"load_s": 4.5}
    assert prepare.detail == {"kv_tokens": 4096}
    assert warmup.detail == {"graph_s": 1.8}
