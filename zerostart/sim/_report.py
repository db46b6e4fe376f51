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


def write_json(path: str | Path, results: object, *, indent: int | None = 2) -> None:
    """``results`` as JSON, written atomically; non-finite floats become null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    _atomic_write(Path(path), (json.dumps(clean(results), indent=indent) + "\n").encode())


_FAMILY_COLORS = {"always": "#7f7f7f", "ttl": "#1f77b4", "hybrid": "#ff7f0e", "ladder": "#2ca02c"}


def plot(path: str | Path, results: list[dict], title: str) -> None:
    """Total cost against p99 added latency, one point per policy (PNG, Agg). Policies that
    land on (nearly) the same point share one label listing each with its cost."""
    # matplotlib (optional): only for the plot
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r["p99_added_latency_s"] for r in results]
    ys = [max(r["total_cost_usd"], 1e-9) for r in results]
    span_x = (max(xs) - min(xs)) or 1.0
    log_scale = min(ys) > 0 and max(ys) / min(ys) > 20
    seen: set[str] = set()
    for r, x, y in zip(results, xs, ys):
        family = r["policy"].split(":")[0]
        color = _FAMILY_COLORS.get(family, "#d62728")
        ax.scatter([x], [y], s=40, color=color, zorder=3, label=None if family in seen else family)
        seen.add(family)
    # clusters of points within 3% of the x span and 4% of y (relative) share one label
    clusters: list[list[int]] = []
    for i in sorted(range(len(results)), key=lambda i: ys[i]):
        for c in clusters:
            j = c[0]
            if abs(xs[i] - xs[j]) <= 0.03 * span_x and abs(ys[i] - ys[j]) <= 0.04 * max(ys[i], ys[j]):
                c.append(i)
                break
        else:
            clusters.append([i])
    placed: list[tuple[float, float, int]] = []  # (x, y, lines) of labels already drawn
    for c in sorted(clusters, key=lambda c: (xs[c[0]], -ys[c[0]])):
        text = "\n".join(f"{results[i]['policy']}  ${ys[i]:,.0f}" for i in c)
        x, y = xs[c[0]], ys[c[0]]
        right = x < min(xs) + 0.6 * span_x
        # a label near an earlier one moves below it by that label's height
        dy = 0.0
        for px, py, lines in placed:
            near_y = (abs(math.log10(py) - math.log10(y)) <= 0.06 if log_scale
                      else abs(py - y) <= 0.1 * max(ys))
            if abs(px - x) <= 0.2 * span_x and near_y:
                dy -= 9.0 * (lines + len(c)) / 2 + 4
        placed.append((x, y, len(c)))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(7 if right else -7, dy), fontsize=7,
                    ha="left" if right else "right", va="center",
                    arrowprops={"arrowstyle": "-", "color": "#bbbbbb", "lw": 0.5} if dy else None)
    always = results[0]["always_warm_cost_usd"] if results else 0.0
    if always > 0:
        ax.axhline(always, color="#999999", linestyle="--", linewidth=0.8, zorder=1)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlim(min(xs) - 0.08 * span_x, max(xs) + 0.08 * span_x)
    ax.set_xlabel("p99 added latency (s)")
    ax.set_ylabel("total cost (USD; dashed: always warm)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=7, loc="center")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, p)
