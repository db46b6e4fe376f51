"""Seeing the fleet from a terminal: ``GET /zerostart/status``'s shape, and ``zerostart status``'s
table against a gateway whose models rest on four rungs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

from zerostart.serve._cli_status import COLUMNS
from zerostart.serve._status import FleetStatus, parse_status
from zerostart.units import format_size

from tests.serve import _ladder
from tests.serve._helpers import Gateway, child_env


def _status_cli(*args: str, key: str | None = _ladder.API_KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in child_env().items() if k not in ("ZEROSTART_API_KEYS", "ZEROSTART_URL")}
    if key is not None:
        env["ZEROSTART_API_KEYS"] = key
    return subprocess.run([sys.executable, "-m", "zerostart", "status", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def _table(out: str) -> dict[str, dict[str, str]]:
    """The models' rows of ``zerostart status``, cut at its header's column starts."""
    lines = out.splitlines()
    header = lines[0]
    starts = [header.index(c) for c in COLUMNS]
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line)])]
        rows[cells[0]] = dict(zip(COLUMNS, cells))
    return rows


def test_status_route_has_every_rung_memory_and_the_recent_cold_starts(ladder_fleet: Gateway) -> None:
    raw = _ladder.settled(ladder_fleet)
    FleetStatus.model_validate(raw)  # strictly: every field the gateway sends is declared
    status = parse_status(raw)
    by_name = {m.name: m for m in status.models}
    assert {m.name: m.rung for m in status.models} == _ladder.RUNGS
    # memory: what each replica reserved; on CPU a parked replica's weights stay in host RAM
    est = by_name["assistant"].memory_estimate_bytes
    assert est and by_name["assistant"].memory_bytes == by_name["coder"].memory_bytes == est
    assert by_name["summarizer"].memory_bytes == by_name["translator"].memory_bytes == 0
    (cpu,) = status.devices
    assert (cpu.hot_bytes, cpu.parked_bytes, cpu.reserved_bytes) == (est, est, 2 * est)
    assert cpu.budget_bytes == 2_000_000
    # counts since the start: one request each, two for coder (its wake)
    assert {m.name: (m.requests, m.cold_starts) for m in status.models} == {
        "assistant": (1, 1), "coder": (2, 2), "summarizer": (1, 1), "translator": (0, 0)}
    recent = status.recent_cold_starts
    assert [c.model for c in recent][0] == "coder" and recent[0].rung == "parked"  # newest first: the wake
    assert sorted(c.model for c in recent[1:]) == ["assistant", "coder", "summarizer"]
    # (summarizer writes and uses ready images: one this session's tests wrote may be restored)
    assert {c.model: c.rung for c in recent[1:] if c.model != "summarizer"} == {"assistant": "source", "coder": "source"}
    assert not any(c.ahead for c in recent)
    assert by_name["coder"].last_cold_start is not None and by_name["coder"].last_cold_start.rung == "parked"
    assert "wake" in [p.name for p in by_name["coder"].last_cold_start.phases]
    assert by_name["summarizer"].unavailable_rungs.keys() == {"parked"} and not by_name["coder"].unavailable_rungs


def test_zerostart_status_prints_the_fleet_on_its_rungs(ladder_fleet: Gateway) -> None:
    status = parse_status(_ladder.settled(ladder_fleet))
    r = _status_cli("--url", ladder_fleet.url)
    assert r.returncode == 0, r.stderr
    rows = _table(r.stdout)
    assert list(rows) == ["assistant", "coder", "summarizer", "translator"]
    for m in status.models:
        row = rows[m.name]
        assert row["RUNG"] == m.rung and row["MEMORY"] == format_size(m.memory_bytes), row
        assert row["BACKEND"] == "zerostart" and row["IN FLIGHT"] == row["QUEUED"] == "0"
    kept = re.fullmatch(r"(\d+)m(\d\d)s", rows["assistant"]["KEPT FOR"])
    assistant = next(m for m in status.models if m.name == "assistant")
    assert kept is not None and assistant.workers[0].kept_for_s is not None, rows["assistant"]
    assert abs(int(kept[1]) * 60 + int(kept[2]) - assistant.workers[0].kept_for_s) < 10
    assert rows["translator"]["KEPT FOR"] == "-"
    # the last cold start: the rung it climbed from, its seconds, and its slowest phase
    coder = next(m for m in status.models if m.name == "coder").last_cold_start
    assert coder is not None
    slowest = max(coder.phases, key=lambda p: p.seconds)
    assert rows["coder"]["LAST COLD START (SLOWEST PHASE)"].startswith("parked ")
    assert f"({slowest.name} " in rows["coder"]["LAST COLD START (SLOWEST PHASE)"]
    assert rows["assistant"]["LAST COLD START (SLOWEST PHASE)"].startswith("source ")
    assert rows["translator"]["LAST COLD START (SLOWEST PHASE)"] == "-"
    # why a rung is out of reach, in a column and in full below the table
    assert rows["summarizer"]["CANNOT REST ON"] == "parked" and rows["coder"]["CANNOT REST ON"] == "-"
    assert "summarizer parked: not parkable" in r.stdout
    est = format_size(next(m for m in status.models if m.name == "assistant").memory_bytes)
    assert f"cpu memory: budget {format_size(2_000_000)}, held {format_size(status.devices[0].reserved_bytes)} " \
           f"(hot {est}, parked {est})" in r.stdout


def test_zerostart_status_json_and_url_from_the_environment(ladder_fleet: Gateway) -> None:
    host_port = ladder_fleet.url.removeprefix("http://")  # host:port is enough
    env_url = {**child_env(), "ZEROSTART_URL": host_port, "ZEROSTART_API_KEYS": f"{_ladder.API_KEY},other"}
    r = subprocess.run([sys.executable, "-m", "zerostart", "status", "--json"], env=env_url, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    status = parse_status(json.loads(r.stdout))
    assert {m.name: m.rung for m in status.models} == _ladder.RUNGS


def test_zerostart_status_says_what_is_wrong(ladder_fleet: Gateway) -> None:
    no_key = _status_cli("--url", ladder_fleet.url, key=None)
    assert no_key.returncode == 1 and "asks for an API key: set $ZEROSTART_API_KEYS" in no_key.stderr
    wrong = _status_cli("--url", ladder_fleet.url, key="nope")
    assert wrong.returncode == 1 and "refused the API key in $ZEROSTART_API_KEYS" in wrong.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = _status_cli("--url", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert nobody.returncode == 1 and "no zerostart gateway answers at" in nobody.stderr
    assert "Traceback" not in no_key.stderr + wrong.stderr + nobody.stderr


def _watch(url: str, lines: int) -> list[str]:
    """The first ``lines`` lines of ``zerostart status --watch``, then Ctrl-C (which ends it
    with 0 and no traceback)."""
    env = {**child_env(), "ZEROSTART_API_KEYS": _ladder.API_KEY}
    # Ctrl-C as a terminal delivers it, whatever the test runner's own SIGINT disposition (a
    # runner started in the background of a non-interactive shell ignores SIGINT, and a child
    # inherits that: Python would then never raise KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "zerostart", "status", "--url", url, "--watch", "--interval", "0.3",
                             "--timeout", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(lines)]
    finally:
        proc.send_signal(2)  # SIGINT: Ctrl-C
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return seen


def test_zerostart_status_watch_redraws_until_interrupted(ladder_fleet: Gateway) -> None:
    seen = _watch(ladder_fleet.url, 40)
    assert sum("(Ctrl-C to stop)" in line for line in seen) >= 2, seen  # drawn at least twice
    assert sum(line.startswith("assistant ") for line in seen) >= 2


def test_zerostart_status_watch_keeps_asking_a_gateway_that_is_away() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = _watch(f"127.0.0.1:{port}", 4)
    assert sum("no zerostart gateway answers at" in line for line in seen) == 2, seen


def test_status_cli_stays_torch_free() -> None:
    code = ("import sys; from zerostart import cli; cli._build_parser(('status',)); "
            "import zerostart.serve._cli_status; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60,
                       cwd=os.getcwd())
    assert r.returncode == 0, r.stderr
