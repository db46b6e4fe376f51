"""A foreign engine's cold-start phases, read off its log: each marker line ends one phase and
begins the next; every line is timestamped as it reaches the gateway (the child's output is
unbuffered), so the phases are on the gateway's clock from the spawn.

    phases = LogPhases(VLLM_MARKERS, last="server_init", origin=spawned_perf)
    phases.feed(line, time.perf_counter())      # for every line the process prints
    phases.current                              # "read": where a start is (timeout messages)
    timeline = phases.timeline(ready_perf)      # spawn -> ... -> ready, one Phase per marker

A marker missing from the log (another version, another log level) merges its phase into the
next one found; lines that only carry numbers (``Detail``) add to the phase they fall in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from zerostart.telemetry import Timeline


@dataclass(frozen=True)
class Marker:
    """A line that ends phase ``ends`` (its first match only)."""

    ends: str
    pattern: re.Pattern[str]
    detail: Callable[[re.Match[str]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Detail:
    """A line that adds numbers to the phase it falls in (every match; later ones win)."""

    pattern: re.Pattern[str]
    detail: Callable[[re.Match[str]], dict[str, Any]]


def _floats(**groups: str) -> Callable[[re.Match[str]], dict[str, Any]]:
    """``detail`` of named regex groups as floats: ``_floats(load_s="s")``."""
    def get(m: re.Match[str]) -> dict[str, Any]:
        return {key: float(m.group(g)) for key, g in groups.items() if m.group(g) is not None}
    return get


@dataclass
class LogPhases:
    markers: Sequence[Marker]
    last: str  # the phase from the last marker to ready (``timeline``'s ``ready``)
    origin: float  # perf_counter at the spawn
    details: Sequence[Detail] = ()
    _ends: dict[str, float] = field(default_factory=dict)  # marker phase -> perf_counter of its line
    _detail: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def feed(self, line: str, at: float) -> None:
        for m in self.markers:
            if m.ends in self._ends:
                continue
            found = m.pattern.search(line)
            if found:
                self._ends[m.ends] = at
                if m.detail is not None:
                    self._detail.append((at, m.detail(found)))
                return
        for d in self.details:
            found = d.pattern.search(line)
            if found:
                self._detail.append((at, d.detail(found)))
                return

    @property
    def current(self) -> str:
        """The phase the engine is in now: the one after the latest marker seen."""
        seen = [m.ends for m in self.markers if m.ends in self._ends]
        if not seen:
            return self.markers[0].ends if self.markers else self.last
        latest = max(seen, key=lambda name: self._ends[name])
        names = [m.ends for m in self.markers] + [self.last]
        return names[names.index(latest) + 1]

    def timeline(self, ready_at: float, label: str = "") -> Timeline:
        """Spawn to ``ready_at`` (perf_counter), one phase per marker seen, then ``last``."""
        tl = Timeline(origin=self.origin, label=label)
        bounds = sorted((at, name) for name, at in self._ends.items() if at <= ready_at)
        start = self.origin
        for at, name in bounds + [(ready_at, self.last)]:
            tl.add(name, start, max(start, at))
            start = max(start, at)
        for when, d in self._detail:  # each line's numbers to the phase it falls in (a marker's: the one it ends)
            p = next((p for p in tl.phases if when - self.origin <= p.end), None)
            if p is not None:
                p.detail.update(d)
        return tl


# -- vLLM 0.32 (the lines its API server, engine core and worker print at INFO) -----------------

VLLM_MARKERS = (
    Marker("import", re.compile(r"non-default args: ")),  # the API server has imported vLLM and read its args
    # the engine core and worker processes are up, their imports done, the device initialized
    Marker("device_init", re.compile(r"Starting to load model ")),
    # the model built and its weights loaded (vLLM's default loader, or zerostart's, say so alike)
    Marker("read", re.compile(r"Loading weights took (?P<s>[\d.]+) seconds"), _floats(load_s="s")),
    # memory profiled, KV cache allocated, the model compiled or warmed up
    Marker("warmup", re.compile(r"init engine \(profile, create kv cache, warmup model\) took (?P<s>[\d.]+) s"
                                r"(?: \(compilation: (?P<c>[\d.]+) s)?"), _floats(engine_s="s", compile_s="c")),
)
VLLM_LAST = "server_init"  # the API server's routes, tokenizer and chat template, until /health answers 200
VLLM_DETAILS = (
    Detail(re.compile(r"zerostart loaded .*?: (?P<gb>[\d.]+) GB in (?P<s>[\d.]+) s \((?P<gbps>[\d.]+) GB/s"),
           _floats(zerostart_gb="gb", zerostart_read_s="s", zerostart_gbps="gbps")),
    Detail(re.compile(r"(?:CPU|GPU) KV cache size: (?P<t>[\d,]+) tokens"),
           lambda m: {"kv_tokens": int(m.group("t").replace(",", ""))}),
    Detail(re.compile(r"Model loading took (?P<gib>[\d.]+) GiB memory"), _floats(weights_gib="gib")),
)

# -- SGLang (its scheduler's and HTTP server's INFO lines) ------------------------------------

SGLANG_MARKERS = (
    Marker("import", re.compile(r"server_args=ServerArgs\(")),
    Marker("device_init", re.compile(r"Load weight begin\.")),
    Marker("read", re.compile(r"Load weight end\.(?: elapsed=(?P<s>[\d.]+) s)?"), _floats(load_s="s")),
    Marker("prepare", re.compile(r"KV Cache is allocated\.(?: #tokens: (?P<t>\d+))?"),
           lambda m: {"kv_tokens": int(m.group("t"))} if m.group("t") else {}),
    Marker("warmup", re.compile(r"The server is fired up and ready to roll!")),
)
SGLANG_LAST = "server_init"
SGLANG_DETAILS = (
    Detail(re.compile(r"Capture \w* ?graph end\. Time elapsed: (?P<s>[\d.]+) s"), _floats(graph_s="s")),
)

# -- llama.cpp's llama-server (build 11434; the lines of its default verbosity) ----------------

LLAMACPP_MARKERS = (
    # the binary is up: its backends (CPU, CUDA ...) registered, the HTTP server bound; the model next
    Marker("device_init", re.compile(r"load_model: loading model '")),
    # its memory fitted to the device, the GGUF's metadata read and its tensors mapped, the
    # context's KV cache and compute buffers allocated (then its compute threads start)
    Marker("read", re.compile(r"llama threadpool init, n_threads = (?P<t>\d+)"),
           lambda m: {"threads": int(m.group("t"))}),
    # the warm-up run (every weight read once: mapped pages fault in here), then its slots
    Marker("warmup", re.compile(r"load_model: initializing, n_slots = (?P<n>\d+), n_ctx_slot = (?P<ctx>\d+)"),
           lambda m: {"slots": int(m.group("n")), "slot_tokens": int(m.group("ctx"))}),
)
LLAMACPP_LAST = "server_init"  # chat template, "model loaded", until /health answers 200
LLAMACPP_DETAILS = (  # at -lv 4 (llamacpp.args), the sizes too
    Detail(re.compile(r"load_tensors: +\S+ model buffer size = +(?P<mib>[\d.]+) MiB"), _floats(weights_mib="mib")),
    Detail(re.compile(r"llama_kv_cache: size = +(?P<mib>[\d.]+) MiB \( *(?P<cells>\d+) cells"),
           lambda m: {"kv_mib": float(m.group("mib")), "kv_tokens": int(m.group("cells"))}),
)
