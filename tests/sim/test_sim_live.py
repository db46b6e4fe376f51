"""``zerostart replay`` end to end: a real gateway on loopback (started by the replay from a
config), real workers on the tiny demo model, the trace's requests sent over HTTP, and the
simulator's prediction set beside what the server measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import zerostart
from zerostart.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A config of two models, each a directory of links to one tiny demo checkpoint (so each
    has a ready image of its own), one worker thread each."""
    root = tmp_path_factory.mktemp("fleet")
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "zerostart", "demo-model", "--out", str(root / "tiny"), "--size", "tiny"],
                   check=True, env=env, capture_output=True)
    lines = ["models:"]
    for name in ("a", "b"):
        (root / name).mkdir()
        for f in (root / "tiny").iterdir():
            (root / name / f.name).symlink_to(f)
        lines.append(f"  - {{path: {name}, name: {name}, env: {{OMP_NUM_THREADS: '1'}}}}")
    (root / "config.yaml").write_text("\n".join(lines) + "\n")
    return str(root / "config.yaml")


def test_a_tiny_replay_measures_the_live_server_and_simulates_the_same_slice(fleet, tmp_path, capsys):
    # a arrives at 0 (a start from source), again during that start (it joins it), and once more
    # long after its 1 s keep-alive (a start from its ready image, unless the first start took
    # most of those 10 s); b once (from source). Output lengths from the trace, bounded at 6.
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp,model,input_tokens,output_tokens\n"
                     "0.0,a,20,4\n0.3,b,8,30\n0.6,a,5,3\n10.0,a,12,2\n")
    cold = tmp_path / "cold.json"
    cold.write_text(json.dumps({"model": "tiny", "bytes": 1_000_000,
                                "rungs": {"source": {"median_s": 2.0}, "image": {"median_s": 1.8},
                                          "parked": {"median_s": 0.05}}}))
    out = tmp_path / "replay.json"
    rc = main(["replay", "--trace", str(trace), "--config", fleet, "--policy", "ttl:1", "--max-output-tokens", "6",
               "--coldstart", str(cold), "--workdir", str(tmp_path / "work"), "--sample-s", "0.2",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    run = json.loads(out.read_text())["runs"][0]
    fields = run["requests"]["fields"]
    sent = [dict(zip(fields, row)) for row in run["requests"]["rows"]]
    assert [r["status"] for r in sent] == [200] * 4 and [r["model"] for r in sent] == ["a", "b", "a", "a"]
    assert [r["usage"]["completion_tokens"] for r in sent] == [4, 6, 3, 2]  # bounded, ignore_eos
    first_a, first_b, join_a, late_a = sent
    # the server's cold-start header: each model's first request waited for its start; the
    # request that came during a's start waited for the rest of it (from when it was sent: on a
    # loaded machine the driver sends late)
    assert first_a["cold_start_s"] > 0.6 and first_b["cold_start_s"] > 0
    joined_after = join_a["sent"] - first_a["sent"]
    assert join_a["cold_start_s"] == pytest.approx(first_a["cold_start_s"] - joined_after, abs=0.3)
    live, sim = run["measured"], run["simulated"]
    # the rung each waiting request's climb came from (the server's header)
    assert first_a["rung"] == first_b["rung"] == join_a["rung"] == "source"
    assert late_a["rung"] == ("image" if late_a["cold_start_s"] > 0 else None)
    # the server's counters agree with its headers: a and b from source once each, and a once
    # more (from its image) if the last request found it gone
    later = 1 if late_a["cold_start_s"] > 0 else 0
    assert live["cold_starts_by_label"] == {"source": 2, **({"image": 1} if later else {})}
    assert live["cold_starts_by_rung"] == {"parked": 0, "image": later, "zero": 2}
    assert live["max_added_latency_s"] == max(r["cold_start_s"] for r in sent)
    # the replicas' states were sampled: something was hot, for no longer than two models' run
    assert 0 < live["state_hours"]["hot"] * 3600 <= 2 * live["hours"] * 3600 + 1
    # the simulator ran the same slice from a fresh start, images kept, with the given wake
    # times: a and b from source (2 s), a's second request joins, its last climbs from its image
    assert sim["requests"] == 4 and sim["cold_starts_by_rung"] == {"parked": 0, "image": 1, "zero": 2}
    assert sim["max_added_latency_s"] == pytest.approx(2.0)
    assert "simulated against measured" in text and "ttl:1" in text
