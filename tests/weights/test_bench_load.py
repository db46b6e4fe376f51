"""`zerostart bench load` end to end on a small generated checkpoint: every contestant loads
the same bytes in a fresh process, and the table and JSON report what was measured."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_load_races_peers_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "zerostart", "bench", "load", "--size", "24MB", "--repeat", "3",
         "--only", "zerostart,zerostart-reserved,safetensors,safe_open", "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "zerostart" in r.stdout and "safetensors load_file" in r.stdout and "memcpy" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["mismatched"] == []  # every contestant ended with the same bytes
    assert rep["bytes"] > 20_000_000 and rep["files"] >= 1
    assert set(rep["rows"]) == {"zerostart", "zerostart-reserved", "safetensors", "safe_open"}
    for name, row in rep["rows"].items():
        warm = row["warm"]
        assert warm["runs"] == 3, name
        assert warm["gbps"] == pytest.approx(rep["bytes"] / warm["seconds"] / 1e9), name
        assert warm["peak_rss_bytes"] < 2.2 * rep["bytes"], name  # never two full copies
    best = max(row["warm"]["gbps"] for n, row in rep["rows"].items() if not n.startswith("zerostart"))
    assert rep["rows"]["zerostart"]["warm"]["vs_best_peer"] == pytest.approx(rep["rows"]["zerostart"]["warm"]["gbps"] / best)
    assert rep["ceilings_gbps"]["memcpy"] > 0
    trials = [t for t in rep["trials"] if t["contestant"] == "zerostart"]
    assert trials and all(t["stats"]["bytes"] == rep["bytes"] for t in trials)
    assert all(t["stats"]["prefaulted_bytes"] == 0 for t in trials)
    reserved = [t for t in rep["trials"] if t["contestant"] == "zerostart-reserved"]
    assert reserved and all(t["stats"]["prefaulted_bytes"] >= rep["bytes"] for t in reserved)  # the arena was the reserve
    assert "reserved ahead" in r.stdout and "not a fresh-process load" in r.stdout
