import json
import math
from typing import Any

import pytest

from zerostart.policy import CostModel, PolicyError, Rung

GB = 1e9


def test_defaults_holding_costs_follow_the_prices():
    c = CostModel()
    assert c.hold_usd_per_s(Rung.HOT) == pytest.approx(2.99 / 3600)
    assert c.hold_usd_per_s(Rung.PARKED) == pytest.approx((16 + 1) * 0.004237 / 3600)
    assert c.hold_usd_per_s(Rung.IMAGE) == pytest.approx(16 * 0.08 / (730 * 3600))
    assert c.hold_usd_per_s(Rung.ZERO) == 0.0
    # a given size overrides the default size; device share scales the device price
    assert c.hold_usd_per_s(Rung.PARKED, int(70 * GB)) == pytest.approx(71 * 0.004237 / 3600)
    half = CostModel(device_share=0.5)
    assert half.hold_usd_per_s(Rung.HOT) == pytest.approx(2.99 / 7200)


def test_bandwidth_model_of_wake_times():
    c = CostModel()
    assert c.wake_s(Rung.HOT) == 0.0
    assert c.wake_s(Rung.PARKED) == pytest.approx(0.05 + 16 / 25)
    assert c.wake_s(Rung.IMAGE) == pytest.approx(3 + 1 + 16 / 6)
    assert c.wake_s(Rung.ZERO) == pytest.approx(3 + 15 + 16 / 1.25)
    # the slower of disk and host->device bounds an image wake
    slow_pcie = CostModel(h2d_gbps=4.0)
    assert slow_pcie.wake_s(Rung.IMAGE) == pytest.approx(3 + 1 + 16 / 4)
    # a standby worker has already spawned, imported and initialized the device
    standby = CostModel(standby=True)
    assert standby.wake_s(Rung.IMAGE) == pytest.approx(1 + 16 / 6)
    assert standby.wake_s(Rung.PARKED) == pytest.approx(c.wake_s(Rung.PARKED))
    assert c.wake_source(Rung.IMAGE) == "bandwidth model"


def test_wake_cost_and_break_even_arithmetic():
    c = CostModel()
    hot = 2.99 / 3600
    assert c.wake_usd(Rung.PARKED) == pytest.approx(c.wake_s(Rung.PARKED) * (0.01 + hot))
    assert c.wake_usd(Rung.PARKED, latency_usd_per_s=0.0) == pytest.approx(c.wake_s(Rung.PARKED) * hot)
    be = c.break_even_s(Rung.HOT, Rung.PARKED)
    assert be == pytest.approx(c.wake_usd(Rung.PARKED) / (hot - c.hold_usd_per_s(Rung.PARKED)))
    assert 5 < be < 15  # ~9 s with the defaults
    assert c.break_even_s(Rung.PARKED, Rung.IMAGE) == pytest.approx(
        (c.wake_usd(Rung.IMAGE) - c.wake_usd(Rung.PARKED))
        / (c.hold_usd_per_s(Rung.PARKED) - c.hold_usd_per_s(Rung.IMAGE)))
    # a lower rung that costs as much to hold never pays off
    free_ram = CostModel(host_ram_usd_per_gb_hour=0.0, disk_usd_per_gb_month=0.0)
    assert math.isinf(free_ram.break_even_s(Rung.PARKED, Rung.IMAGE))


@pytest.mark.parametrize("bad, word", [
    ({"device_usd_per_hour": -1}, "device_usd_per_hour"),
    ({"h2d_gbps": 0}, "h2d_gbps"),
    ({"latency_usd_per_s": float("nan")}, "latency_usd_per_s"),
    ({"standby": 1}, "standby"),
])
def test_construction_is_validated(bad, word):
    with pytest.raises(PolicyError, match=word):
        CostModel(**bad)


def test_from_file_yaml_and_json(tmp_path):
    y = tmp_path / "costs.yaml"
    y.write_text("device_usd_per_hour: 4.5\np99_target_s: 2\nstandby: true\nwake_s:\n  parked: 0.3\n  source: 40\n")
    c = CostModel.from_file(y)
    assert c.device_usd_per_hour == 4.5 and c.p99_target_s == 2 and c.standby is True
    assert c.wake_s(Rung.PARKED) == 0.3 and c.wake_s(Rung.ZERO) == 40
    assert c.wake_source(Rung.PARKED) == "measured"
    assert c.wake_s(Rung.IMAGE) == pytest.approx(1 + 16 / 6)  # not pinned: the bandwidth model (standby)
    j = tmp_path / "costs.json"
    j.write_text(json.dumps({"host_ram_usd_per_gb_hour": 0.01}))
    assert CostModel.from_file(j).host_ram_usd_per_gb_hour == 0.01
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert CostModel.from_file(empty) == CostModel()


@pytest.mark.parametrize("text, match", [
    ("gpu_price: 3\n", r"unknown key 'gpu_price'; valid keys: .*device_usd_per_hour"),
    ("device_usd_per_hour: cheap\n", r"'device_usd_per_hour' must be a number"),
    ("disk_gbps: -2\n", r"'disk_gbps' must not be negative"),
    ("wake_s:\n  warm: 1\n", r"unknown rung 'warm'"),
    ("wake_s: 3\n", r"'wake_s' must map rung names"),
    ("- 1\n- 2\n", r"expected a mapping"),
    ("a: [\n", r"not valid YAML"),
])
def test_from_file_errors_name_the_file_and_key(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(PolicyError, match=match) as e:
        CostModel.from_file(p)
    assert str(p) in str(e.value)


def test_from_file_rejects_unknown_suffix_and_bad_json(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("x = 1")
    with pytest.raises(PolicyError, match="unknown format '.toml'"):
        CostModel.from_file(p)
    j = tmp_path / "c.json"
    j.write_text("{")
    with pytest.raises(PolicyError, match="not valid JSON"):
        CostModel.from_file(j)


COLDSTART: dict[str, Any] = {"model": "llama-8b", "bytes": 16_060_000_000, "device": "H100",
             "rungs": {"source": {"median_s": 41.5, "runs": 3}, "image": {"median_s": 5.2},
                       "parked": {"median_s": 0.41}, "standby": {"median_s": 2.1}}}


def test_with_coldstart_uses_measured_medians_for_that_model():
    c = CostModel().with_coldstart(COLDSTART)
    assert c.wake_s(Rung.PARKED, model="llama-8b") == 0.41
    assert c.wake_s(Rung.IMAGE, model="llama-8b") == 5.2  # no standby pool configured
    assert c.wake_s(Rung.ZERO, model="llama-8b") == 41.5  # "source" is the zero rung
    assert c.wake_source(Rung.ZERO, "llama-8b") == "measured"
    # other models keep the bandwidth model, and the default size is untouched
    assert c.wake_s(Rung.PARKED, model="other") == pytest.approx(0.05 + 16 / 25)
    assert c.model_gb == 16.0
    assert CostModel(standby=True).with_coldstart(COLDSTART).wake_s(Rung.IMAGE, model="llama-8b") == 2.1
    # a file from `coldstart` with every rung: the reserve rung is read and not used
    every = {**COLDSTART, "rungs": {**COLDSTART["rungs"], "reserve": {"median_s": 1.0}}}
    assert CostModel(standby=True).with_coldstart(every).wake_s(Rung.IMAGE, model="llama-8b") == 2.1


def test_with_coldstart_for_every_model_takes_the_size_and_a_subset_of_rungs():
    c = CostModel().with_coldstart({"model": "m", "bytes": 2_000_000_000, "rungs": {"parked": {"median_s": 0.1}}},
                                   model="*")
    assert c.model_gb == 2.0
    assert c.wake_s(Rung.PARKED, model="anything") == 0.1
    assert c.wake_s(Rung.IMAGE, model="anything") == pytest.approx(3 + 1 + 2 / 6)  # not measured


@pytest.mark.parametrize("data, match", [
    ({"model": "m"}, "missing 'rungs'"),
    ({"model": "m", "rungs": {"warm": {"median_s": 1}}}, "unknown rung 'warm'"),
    ({"model": "m", "rungs": {"image": {"p50": 1}}}, "'image' has no 'median_s'"),
    ({"model": "m", "rungs": {"image": {"median_s": -1}}}, "non-negative"),
    ({"rungs": {"image": {"median_s": 1}}}, "no 'model' name"),
    ([1, 2], "expected a JSON object"),
])
def test_with_coldstart_errors(data, match):
    with pytest.raises(PolicyError, match=match):
        CostModel().with_coldstart(data)


def test_describe_lists_every_rung():
    text = "\n".join(CostModel().describe())
    for word in ("hot", "parked", "image", "zero", "$2.99/h", "bandwidth model"):
        assert word in text


def test_the_documented_costs_file_is_the_defaults():
    import pathlib
    import re

    import yaml

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "policy.md"
    block = re.search(r"```yaml\n(.*?)```", doc.read_text(), re.S)
    assert block, "docs/policy.md lost its example costs file"
    data = yaml.safe_load(block.group(1))
    assert CostModel.from_mapping(data) == CostModel()
    documented = set(data) | {"wake_s", "measured"}
    assert documented == {f.name for f in __import__("dataclasses").fields(CostModel)} | {"wake_s"}
