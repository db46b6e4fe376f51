import json
import re
from pathlib import Path

import pytest

from zerostart.cli import main
from zerostart.policy import CostModel, Rung

TRACES = Path("/work/shared/data/traces")
REQUIRED = {"policy", "requests", "cold_starts", "p50_added_latency_s", "p99_added_latency_s", "gpu_hours",
            "total_cost_usd"}


@pytest.fixture
def small_csv(tmp_path):
    p = tmp_path / "small.csv"
    rows = ["timestamp,model,input_tokens,output_tokens"]
    for i in range(200):
        rows.append(f"{i * 37.0 % 3600 + i},{'abc'[i % 3]},{100 + i},{10 + i % 7}")
    p.write_text("\n".join(rows) + "\n")
    return p


def test_simulate_writes_json_and_plot(small_csv, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["simulate", "--trace", str(small_csv), "--policy", "always", "ttl:60", "hybrid",
               "--policy", "ladder", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "workload: 200 requests for 3 models" in text
    assert re.search(r"replay ladder: 200 requests in [\d.]+ s = [\d.]+ M requests/min", text)
    results = json.loads(out.read_text())
    assert [r["policy"] for r in results] == ["always", "ttl:60", "hybrid", "ladder"]
    for r in results:
        assert REQUIRED <= r.keys() and r["requests"] == 200
        assert r["workload"]["trace"] == "small.csv"
    assert results[0]["total_cost_usd"] == pytest.approx(results[0]["always_warm_cost_usd"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.skipif(not TRACES.is_dir(), reason="the published traces are not available here")
def test_simulate_derives_models_from_a_single_service_trace(capsys, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["simulate", "--trace", str(TRACES / "azure_llm_2023_code.csv"), "--models", "12", "--thin", "0.2",
               "--stretch", "4", "--seed", "5", "--policy", "ttl:300", "ladder", "--capacity", "hot=4,parked=6",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "split across 12 models by zipf(s=1), seed 5" in text and "time stretched 4x" in text
    assert "capacity: hot 4, parked 6" in text
    r = json.loads(out.read_text())
    assert len(r) == 2 and r[0]["models"] == 12
    assert any("thinned to 0.2" in step for step in r[0]["workload"]["derivation"])


def test_simulate_uses_measured_wake_times(small_csv, tmp_path, capsys):
    cold = tmp_path / "cold.json"
    cold.write_text(json.dumps({"model": "llama", "bytes": 2_000_000_000,
                                "rungs": {"parked": {"median_s": 0.2, "p90_s": 0.3}, "source": {"median_s": 12.0}},
                                "phases": []}))
    out = tmp_path / "r.json"
    assert main(["simulate", "--trace", str(small_csv), "--coldstart", str(cold), "--policy", "ttl:0,down=parked",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model size: 2 GB" in text and "0.20 s (measured)" in text and "12.00 s (measured)" in text
    r = json.loads(out.read_text())[0]
    assert r["max_added_latency_s"] == pytest.approx(0.2)


@pytest.mark.parametrize("extra, match", [
    (["--policy", "lru"], "unknown policy 'lru'; valid policies: always, hybrid, ladder, ttl"),
    (["--capacity", "gpus=2"], "bad --capacity"),
    (["--models", "5"], "already names 3 models"),
    (["--model-gb", "0"], "--model-gb must be positive"),
])
def test_simulate_errors_are_one_line(small_csv, capsys, extra, match):
    assert main(["simulate", "--trace", str(small_csv), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zerostart: error: ") and match in err


def test_simulate_reports_a_bad_costs_key(small_csv, tmp_path, capsys):
    costs = tmp_path / "c.yaml"
    costs.write_text("gpu_dollars: 3\n")
    assert main(["simulate", "--trace", str(small_csv), "--costs", str(costs)]) == 1
    assert "unknown key 'gpu_dollars'" in capsys.readouterr().err


def test_plan_prints_its_arithmetic(capsys):
    assert main(["plan", "--params", "8B", "--rate", "20"]) == 0
    text = capsys.readouterr().out
    c = CostModel()
    assert "model: 16 GB of weights" in text
    assert "16 GB / 25 GB/s" in text and f"= {c.wake_s(Rung.PARKED):.2f} s" in text
    assert "3 s spawn + 1 s warm-up + 16 GB / 6 GB/s" in text
    assert f"= {c.break_even_s(Rung.HOT, Rung.PARKED):.3g} s" in text
    assert "mean idle gap 3600 / 20 = 3 min" in text
    assert "verdict: scale down" in text


def test_plan_with_rare_periodic_traffic_and_a_target(capsys):
    assert main(["plan", "--model-gb", "140", "--rate", "2", "--pattern", "periodic", "--p99", "1",
                 "--source-gbps", "3", "--standby"]) == 0
    text = capsys.readouterr().out
    assert "140 GB / 3 GB/s" in text and "standby worker" in text
    assert "pre-warm" in text and "p99 target 1 s" in text


def test_plan_keeps_a_busy_model_warm(capsys):
    assert main(["plan", "--model-gb", "16", "--rate", "20000"]) == 0
    assert "verdict: stay warm" in capsys.readouterr().out


def test_plan_takes_measured_wake_times(tmp_path, capsys):
    cold = tmp_path / "cold.json"
    cold.write_text(json.dumps({"model": "m", "bytes": 4_000_000_000, "rungs": {"image": {"median_s": 1.5}}}))
    assert main(["plan", "--coldstart", str(cold), "--rate", "10"]) == 0
    text = capsys.readouterr().out
    assert "model: 4 GB" in text and "measured (coldstart telemetry)" in text and "= 1.50 s" in text


@pytest.mark.parametrize("args, match", [
    (["--rate", "0"], "--rate must be a positive"),
    (["--params", "lots"], "bad --params 'lots'"),
    (["--h2d-gbps", "-1"], "'h2d_gbps' must not be negative"),
])
def test_plan_errors(capsys, args, match):
    assert main(["plan", *args]) == 1
    assert match in capsys.readouterr().err
