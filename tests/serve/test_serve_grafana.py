"""The Grafana dashboard (``deploy/grafana/zerostart.json``) asks only for what a gateway exports:
every query parses as PromQL, and every metric it selects, every label it matches, groups or
joins on, is in ``GET /metrics`` of a real gateway whose models rest on four rungs."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve._helpers import ROOT, Gateway

DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "zerostart.json")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
# Grafana's own variables, as a range Prometheus reads
_RANGES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _queries(node: Any) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, rows' panels included."""
    out = []
    for p in node.get("panels", []):
        out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
        out += _queries(p)
    return out


def _exported(gw: Gateway) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Every sample name the gateway can export -> its family; each family's labels (those
    seen in samples: a labelled counter nothing has counted yet shows none)."""
    names, labels = {}, {}
    text = gw.http.get("/metrics").text
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created"):
            continue  # (the parser's reading of counters' creation times)
        for suffix in _SUFFIXES.get(fam.type, ("",)):
            names[fam.name + suffix] = fam.name
        for s in fam.samples:
            names[s.name] = fam.name
        labels[fam.name] = {k for s in fam.samples for k in s.labels}
    return names, labels


def _selectors(expr: Any) -> list[Any]:
    found: list[Any] = []
    promql_parser.walk(expr, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
    return found


def _problems(expr: Any, names: dict[str, str], labels: dict[str, set[str]]) -> list[str]:
    out = []

    def labels_of(node: Any) -> set[str] | None:
        """The labels a subexpression's series may carry (None: a family with no samples yet)."""
        known: set[str] = set()
        for sel in _selectors(node):
            family = names.get(sel.name or "")
            if family is None or not labels.get(family):
                return None
            known |= labels[family]
        return known

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            family = names.get(node.name or "")
            if family is None:
                out.append(f"{node.name}: not a metric the gateway exports")
            elif labels.get(family):
                out.extend(f"{node.name}: no label {m.name!r}" for m in node.matchers.matchers
                           if m.name not in labels[family] | {"__name__"})
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            known = labels_of(node.expr)
            if known is not None:
                out.extend(f"{node.op} by/without {label!r}: not a label of {node.expr}" for label in node.modifier.labels
                           if label not in known)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            for side in (node.lhs, node.rhs):
                known = labels_of(side)
                if known is not None and matching is not None:
                    out.extend(f"on/ignoring {label!r}: not a label of {side}" for label in matching.labels
                               if label not in known)
            known = labels_of(node.rhs)  # group_left copies labels from the right side
            copied = node.modifier.group_labels or ()
            if known is not None:
                out.extend(f"group_left {label!r}: not a label of {node.rhs}" for label in copied if label not in known)

    promql_parser.walk(expr, visit)
    return out


def test_grafana_queries_ask_for_what_the_gateway_exports(ladder_fleet: Gateway) -> None:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    names, labels = _exported(ladder_fleet)
    queries = _queries(dashboard)
    assert len(queries) >= 15
    problems = []
    selected = set()
    for title, query in queries:
        for var, value in _RANGES.items():
            query = query.replace(var, value)
        try:
            expr = promql_parser.parse(query)
        except Exception as e:  # the parser's own error type (a ValueError subclass or a Rust panic)
            problems.append(f"{title}: does not parse ({e}): {query}")
            continue
        selected |= {names.get(s.name, s.name) for s in _selectors(expr)}
        problems += [f"{title}: {p}" for p in _problems(expr, names, labels)]
    assert problems == []
    # the panels cover the ladder, memory, traffic and cold starts
    assert {"zerostart_model_rung", "zerostart_model_memory_bytes", "zerostart_requests",
            "zerostart_cold_starts", "zerostart_cold_start_phase_seconds", "zerostart_queue_length"} <= selected


def test_grafana_variables_and_datasource(ladder_fleet: Gateway) -> None:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    names, labels = _exported(ladder_fleet)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    found = re.fullmatch(r"label_values\((\S+), (\w+)\)", variables["model"]["definition"])
    assert found is not None, variables["model"]["definition"]
    metric, label = found.groups()
    assert label in labels[names[metric]]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize("query, problem", [
    ('sum(rate(zerostart_request_total[5m]))', "zerostart_request_total: not a metric the gateway exports"),
    ('sum by (modle) (zerostart_in_flight)', "by/without 'modle'"),
    ('zerostart_in_flight{model_name="x"}', "no label 'model_name'"),
    ('zerostart_model_memory_bytes * on (model) group_left (rnug) zerostart_model_rung', "group_left 'rnug'"),
    ('zerostart_model_memory_bytes * on (modl) zerostart_model_rung', "on/ignoring 'modl'"),
])
def test_the_check_finds_a_wrong_query(ladder_fleet: Gateway, query: str, problem: str) -> None:
    names, labels = _exported(ladder_fleet)
    found = _problems(promql_parser.parse(query), names, labels)
    assert any(problem in p for p in found), found
