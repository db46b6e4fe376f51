import json
from pathlib import Path

import numpy as np
import pytest

from zerostart.sim import Trace, TraceError, derive, load_trace, parse_popularity
from zerostart.sim._traces import detect_format

TRACES = Path(__file__).resolve().parents[2] / "data" / "traces"  # vendored copies of the published traces
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason="the published traces are not available here")


@needs_traces
@pytest.mark.parametrize("name, fmt, count, hours", [
    ("azure_llm_2023_code.csv", "azure-llm", 8819, 0.954),
    ("azure_llm_2023_conv.csv", "azure-llm", 19366, 0.973),
    ("mooncake_conversation.jsonl", "mooncake", 12031, 0.982),
])
def test_published_traces_load_whole(name, fmt, count, hours):
    t = load_trace(TRACES / name)
    assert t.format == fmt and len(t) == count and t.single_service
    assert t.times[0] == 0.0 and np.all(np.diff(t.times) >= 0)
    assert t.duration_s / 3600 == pytest.approx(hours, abs=0.001)
    assert t.input_tokens is not None and t.output_tokens is not None
    assert t.input_tokens.min() >= 0 and t.output_tokens.sum() > 0


@needs_traces
def test_azure_timestamps_keep_sub_millisecond_order():
    t = load_trace(TRACES / "azure_llm_2023_code.csv")
    # the first two rows: 18:17:03.9799600 and 18:17:04.0319600
    assert t.times[1] == pytest.approx(0.052, abs=1e-6)
    assert t.input_tokens is not None and t.output_tokens is not None
    assert t.input_tokens[:2].tolist() == [4808, 3180] and t.output_tokens[:2].tolist() == [10, 8]


def test_csv_format_with_models_and_tokens(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("timestamp,model,input_tokens,output_tokens\n10.5,b,100,5\n3,a,10,1\n7,b,20,2\n")
    t = load_trace(p)
    assert detect_format(p) == "csv" and t.format == "csv"
    assert t.times.tolist() == [0.0, 4.0, 7.5]  # sorted, from the first request
    assert [t.model_names[m] for m in t.models] == ["a", "b", "b"]
    assert t.input_tokens is not None and t.input_tokens.tolist() == [10, 20, 100] and not t.single_service


def test_csv_without_tokens(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("model,timestamp\nx,1\nx,2\n")
    t = load_trace(p, "csv")
    assert t.input_tokens is None and t.output_tokens is None and t.single_service


@pytest.mark.parametrize("text, fmt, match", [
    ("timestamp,input_tokens\n1,2\n", "csv", "missing the 'model' column"),
    ("timestamp,model\n1,a\nsoon,a\n", "csv", r"t\.x:3: timestamp 'soon' is not a number"),
    ("timestamp,model\n1,\n", "csv", r":2: empty model name"),
    ("timestamp,model,input_tokens\n1,a,-5\n", "csv", r":2: input_tokens -5 is negative"),
    ("timestamp,model\n", "csv", "no requests"),
    ("TIMESTAMP,ContextTokens\n", "azure-llm", "expected the header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,1,2\nyesterday,1,2\n", "azure-llm",
     r":3: bad timestamp 'yesterday'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,1,x\n", "azure-llm",
     r":2: GeneratedTokens 'x' is not an integer"),
    ('{"timestamp": 0, "input_length": 1, "output_length": 2}\n{"timestamp": 5\n', "mooncake", r":2: not valid JSON"),
    ('{"timestamp": 0, "input_length": 1}\n', "mooncake", r":1: missing 'output_length'"),
    ("a,b\n1,2\n", None, "cannot tell the trace format"),
])
def test_trace_errors_name_file_and_line(tmp_path, text, fmt, match):
    p = tmp_path / "t.x"
    p.write_text(text)
    with pytest.raises(TraceError, match=match):
        load_trace(p, fmt)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.csv")
    p = tmp_path / "t.csv"
    p.write_text("timestamp,model\n1,a\n")
    with pytest.raises(TraceError, match="unknown trace format 'parquet'"):
        load_trace(p, "parquet")


def service_trace(n=20000, seed=3) -> Trace:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(0.2, n))
    times -= times[0]
    return Trace(times=times, models=np.zeros(n, dtype=np.int32), model_names=["service"],
                 input_tokens=np.full(n, 100), output_tokens=np.full(n, 10), source="synthetic", format="csv")


def test_derivation_is_reproducible_and_described():
    base = service_trace()
    a = derive(base, models=50, popularity="zipf:1.2", stretch=24, thin=0.5, repeat=2, seed=7)
    b = derive(base, models=50, popularity="zipf:1.2", stretch=24, thin=0.5, repeat=2, seed=7)
    c = derive(base, models=50, popularity="zipf:1.2", stretch=24, thin=0.5, repeat=2, seed=8)
    assert np.array_equal(a.times, b.times) and np.array_equal(a.models, b.models)
    assert not np.array_equal(a.models[: len(c)], c.models[: len(a)])
    text = "\n".join(a.derivation)
    for word in ("repeated 2x", "thinned to 0.5", "50 models by zipf(s=1.2), seed 7", "time stretched 24x"):
        assert word in text
    assert a.model_names[0] == "m000" and len(a.model_names) == 50


def test_zipf_split_follows_the_law_and_stretch_and_thin_and_repeat_do_what_they_say():
    base = service_trace()
    d = derive(base, models=10, popularity="zipf:1.0", seed=1)
    share = np.bincount(d.models, minlength=10) / len(d)
    expected = (1 / np.arange(1, 11)) / (1 / np.arange(1, 11)).sum()
    assert np.allclose(share, expected, atol=0.01)
    u = derive(base, models=4, popularity="uniform", seed=1)
    assert np.allclose(np.bincount(u.models) / len(u), 0.25, atol=0.02)
    s = derive(base, stretch=3.0)
    assert np.allclose(s.times, base.times * 3.0) and len(s) == len(base)
    th = derive(base, thin=0.25, seed=2)
    assert abs(len(th) / len(base) - 0.25) < 0.02 and np.all(np.isin(th.times, base.times))
    r = derive(base, repeat=3)
    assert len(r) == 3 * len(base) and np.all(np.diff(r.times) >= 0)
    assert r.times[len(base)] > base.times[-1]


@pytest.mark.parametrize("kwargs, match", [
    ({"models": 0}, "--models must be at least 1"),
    ({"thin": 0.0}, "--thin must be in"),
    ({"stretch": -1.0}, "--stretch must be positive"),
    ({"repeat": 0}, "--repeat must be at least 1"),
    ({"models": 5, "popularity": "pareto:2"}, "unknown popularity law 'pareto:2'"),
    ({"models": 5, "popularity": "zipf:x"}, "zipf needs an exponent"),
])
def test_derive_errors(kwargs, match):
    with pytest.raises(TraceError, match=match):
        derive(service_trace(100), **kwargs)


def test_models_cannot_be_resplit(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("timestamp,model\n1,a\n2,b\n")
    with pytest.raises(TraceError, match="already names 2 models"):
        derive(load_trace(p), models=10)
    assert parse_popularity("zipf:0.8") == 0.8 and parse_popularity("uniform") == 0.0


def test_mooncake_reader_handles_blank_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    lines = [json.dumps({"timestamp": ts, "input_length": 5, "output_length": 6, "hash_ids": [0]})
             for ts in (0, 1500, 3000)]
    p.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    t = load_trace(p)
    assert t.times.tolist() == [0.0, 1.5, 3.0] and t.format == "mooncake"


def test_a_window_of_the_trace_at_a_speed_with_bounded_tokens():
    base = service_trace()
    span = base.duration_s
    # the second quarter of the trace, compressed 4x: a window of span/4 trace seconds is
    # duration = span/16 seconds of the derived workload
    d = derive(base, start=span / 4, duration=span / 16, stretch=0.25, max_input_tokens=64, max_output_tokens=5)
    inside = (base.times >= span / 4) & (base.times < span / 2)
    assert len(d) == int(inside.sum()) and d.times[0] >= 0 and d.times[-1] < span / 16
    assert np.allclose(d.times, (base.times[inside] - span / 4) * 0.25)
    assert d.input_tokens is not None and d.output_tokens is not None
    assert d.input_tokens.max() == 64 and d.output_tokens.max() == 5
    text = "\n".join(d.derivation)
    assert "window" in text and "prompt tokens capped at 64" in text and "output tokens capped at 5" in text
    with pytest.raises(TraceError, match="no requests between"):
        derive(base, start=span * 2)
    with pytest.raises(TraceError, match="--max-output-tokens must be at least 1"):
        derive(base, max_output_tokens=0)


def test_token_counts_survive_a_derivation_without_bounds():
    base = service_trace(100)
    d = derive(base, models=3, stretch=2.0)
    assert d.input_tokens is not None and d.output_tokens is not None
    assert base.input_tokens is not None and base.output_tokens is not None
    assert np.array_equal(d.input_tokens, base.input_tokens) and np.array_equal(d.output_tokens, base.output_tokens)
