"""The leaf's names of the cold ladder: one ``Rung`` for where a model rests, one ``Climb`` for
where a cold start came from, each with one spelling on the wire."""

from __future__ import annotations

import json

import pytest

from zerostart.names import LADDER, Climb, Rung


def test_rungs_are_ordered_top_down() -> None:
    assert [r.value for r in LADDER] == ["hot", "parked", "image", "zero"]
    assert [r.level for r in LADDER] == [0, 1, 2, 3]
    assert Rung.parse(" Parked ") is Rung.PARKED and Rung.parse("ZERO") is Rung.ZERO
    assert Rung.parse("source") is Rung.ZERO  # a climb's word for it (coldstart telemetry, climb labels)
    with pytest.raises(ValueError, match="unknown rung 'warm'; valid: hot, parked, image, zero"):
        Rung.parse("warm")


def test_a_climb_is_a_rung_below_hot_and_whether_the_standby_took_it() -> None:
    assert [c.value for c in Climb] == ["source", "image", "standby+source", "standby+image", "parked"]
    for climb in Climb:
        assert climb.rung is not Rung.HOT
        assert Climb.of(climb.rung, standby=climb.standby) is climb  # one encoder, one decoder
        assert Climb(climb.value) is climb
    assert Climb.STANDBY_IMAGE.rung is Rung.IMAGE and Climb.STANDBY_IMAGE.standby
    assert not Climb.PARKED.standby and Climb.PARKED.rung is Rung.PARKED
    assert Climb.SOURCE.rung is Rung.ZERO and Climb.of(Rung.ZERO) is Climb.SOURCE  # it loads the source
    with pytest.raises(ValueError):
        Climb.of(Rung.PARKED, standby=True)  # a standby worker holds no parked model


def test_the_wire_spelling_is_the_value() -> None:
    # headers, metric labels and JSON bodies carry the value, whatever formats it
    assert f"{Climb.STANDBY_SOURCE}" == str(Climb.STANDBY_SOURCE) == "standby+source"
    assert json.dumps({"rung": Climb.PARKED, Rung.IMAGE: 1}) == '{"rung": "parked", "image": 1}'


def test_a_name_finds_its_rung_in_a_dict() -> None:
    # a rung or a climb hashes as its value: tables keyed by them answer the wire's strings
    why: dict[str, str] = {Rung.PARKED: "it cannot"}
    counts: dict[str, float] = {Climb.SOURCE: 1.0}
    assert why["parked"] == "it cannot" and counts["source"] == 1.0 and "image" not in why
