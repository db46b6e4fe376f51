"""The cluster's view of itself: every engine replica reports what it holds, on which node and
rung, and its fleet's metrics; the ingress reads the directory for ``/zerostart/status`` and
``/metrics``. It is a one-replica Serve deployment, so it lives and dies with the application.

A replica that stops reporting (its process died with its node, or Ray stopped it) drops out
after ``3 x status_interval``.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

_STALE_INTERVALS = 3.0


class Directory:
    """The deployment class (``serve.deployment`` is applied by ``_app.build``)."""

    def __init__(self, status_interval: float) -> None:
        self.stale_s = _STALE_INTERVALS * status_interval
        self._reports: dict[str, dict[str, Any]] = {}  # replica id -> its latest report
        self._seen: dict[str, float] = {}  # replica id -> when its report arrived (this clock)

    def report(self, report: dict[str, Any]) -> None:
        self._reports[report["replica"]] = report
        self._seen[report["replica"]] = time.monotonic()

    def forget(self, replica: str) -> None:
        self._reports.pop(replica, None)
        self._seen.pop(replica, None)

    def replicas(self) -> list[dict[str, Any]]:
        """The latest report of every live replica, oldest replica first."""
        now = time.monotonic()
        for rid in [r for r, t in self._seen.items() if now - t > self.stale_s]:
            self.forget(rid)
        return sorted(self._reports.values(), key=lambda r: r["started_at"])

    def status(self) -> dict[str, Any]:
        """Per model: which replica on which node holds it, on which rung; per replica: its fleet."""
        replicas = self.replicas()
        models: dict[str, list[dict[str, Any]]] = {}
        for rep in replicas:
            for m in rep["status"]["models"]:
                models.setdefault(m["name"], []).append({
                    "pool": rep["pool"], "replica": rep["replica"], "node": rep["node"], "node_ip": rep["node_ip"],
                    "state": m["state"], "in_flight": m["in_flight"], "queued": m["queued"],
                    "workers": m["workers"], "last_cold_start": m["last_cold_start"], "last_error": m["last_error"]})
        return {"models": models,
                "replicas": [{k: rep[k] for k in ("replica", "pool", "node", "node_ip", "pid", "started_at", "init_s",
                                                  "cuda_visible_devices")}
                             | {"devices": rep["status"]["devices"], "standby": rep["status"]["standby"]}
                             for rep in replicas]}

    def metrics(self) -> str:
        """Every replica's fleet metrics in one Prometheus exposition, each sample labelled with
        the replica, pool and node it came from."""
        return merge_metrics([(rep["metrics"], {"replica": rep["replica"], "pool": rep["pool"],
                                                "node": rep["node"][:12]}) for rep in self.replicas()])


def merge_metrics(sources: list[tuple[str, dict[str, str]]]) -> str:
    """Merge Prometheus text expositions into one: one HELP/TYPE per family, each source's
    samples with its extra labels."""
    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (type, help, sample lines)
    for text, extra in sources:
        for fam in text_string_to_metric_families(text):
            kind, doc, lines = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue  # when each replica's series began: no meaning once merged
                labels = {**s.labels, **extra}
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{s.name}{{{body}}} {floatToGoString(s.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        shown = name + "_total" if kind == "counter" else name  # as prometheus_client writes it
        out.append(f"# HELP {shown} {_escape_help(doc)}")
        out.append(f"# TYPE {shown} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
