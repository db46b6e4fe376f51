"""Tables, JSON and the cost-vs-latency plot of a simulation run."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def table(results: list[dict]) -> str:
    """A fixed-width table, one row per policy."""
    head = ("policy", "cold P/I/Z", "pre-warms", "p50 s", "p95 s", "p99 s", "GPU-h", "RAM GB-h",
            "total $", "$/1k req", "vs always")
    rows = [head]
    for r in results:
        c = r["cold_starts_by_rung"]
        rows.append((
            r["policy"],
            f"{c['parked']}/{c['image']}/{c['zero']}",
            f"{r['prewarms']}",
            f"{r['p50_added_latency_s']:.2f}",
            f"{r['p95_added_latency_s']:.2f}",
            f"{r['p99_added_latency_s']:.2f}",
            f"{r['gpu_hours']:.1f}",
            f"{r['host_ram_gb_hours']:.0f}",
            f"{r['total_cost_usd']:.2f}",
            f"{r['usd_per_1k_requests']:.3f}",
            f"{r['cost_vs_always_warm']:.1%}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    """The same table in Markdown, for docs."""
    out = ["| policy | cold starts parked/image/zero | pre-warms | p50 / p95 / p99 added s | GPU-h | "
           "RAM GB-h | total $ | $ per 1k req | vs always-warm |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        c = r["cold_starts_by_rung"]
        out.append(
            f"| `{r['policy']}` | {c['parked']}/{c['image']}/{c['zero']} | {r['prewarms']} | "
            f"{r['p50_added_latency_s']:.2f} / {r['p95_added_latency_s']:.2f} / {r['p99_added_latency_s']:.2f} | "
            f"{r['gpu_hours']:.1f} | {r['host_ram_gb_hours']:.0f} | {r['total_cost_usd']:.2f} | "
            f"{r['usd_per_1k_requests']:.3f} | {r['cost_vs_always_warm']:.1%} |")
    return "\n".join(out)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, results: list[dict]) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    _atomic_write(Path(path), (json.dumps(clean(results), indent=2) + "\n").encode())


def plot(path: str | Path, results: list[dict], title: str) -> None:
    """Total cost against p99 added latency, one labeled point per policy (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r["p99_added_latency_s"] for r in results]
    ys = [r["total_cost_usd"] for r in results]
    ax.scatter(xs, ys, s=36, color="#1f77b4", zorder=3)
    for r, x, y in zip(results, xs, ys):
        ax.annotate(r["policy"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    always = results[0]["always_warm_cost_usd"] if results else 0.0
    if always > 0:
        ax.axhline(always, color="#999999", linestyle="--", linewidth=0.8, zorder=1)
        ax.annotate("always warm", (0, always), textcoords="offset points", xytext=(2, -10), fontsize=7,
                    color="#666666")
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("p99 added latency (s)")
    ax.set_ylabel("total cost (USD)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, p)
