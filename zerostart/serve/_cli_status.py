"""``zerostart status``: a running gateway's fleet at a glance, read from ``GET /zerostart/status``.

    zerostart status                          # the gateway on http://127.0.0.1:8000
    zerostart status --url http://gpu-1:8000  # another one ($ZEROSTART_URL)
    zerostart status --watch                  # redrawn every 2 s until Ctrl-C
    zerostart status --json                   # the route's JSON, as the gateway sent it

One row per model: where it rests on the cold ladder, the memory it holds, its requests in flight
and held, how long its keep-alive keeps it, its last cold start (the rung it climbed from, the
seconds until ready, the slowest phase); then each device's memory budget, and why a model
cannot rest on a rung. The key comes from the environment as the server's do
(``$ZEROSTART_API_KEYS``, the first of them). Torch-free: it only speaks HTTP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import httpx
from pydantic import ValidationError

from zerostart.serve._config import API_KEYS_ENV
from zerostart.serve._status import FleetStatus, ModelStatus, model_rung, parse_status
from zerostart.units import format_size

URL_ENV = "ZEROSTART_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
COLUMNS = ("MODEL", "BACKEND", "RUNG", "MEMORY", "IN FLIGHT", "QUEUED", "KEPT FOR", "LAST COLD START (SLOWEST PHASE)",
           "CANNOT REST ON")


class StatusError(RuntimeError):
    """The status could not be read (nothing listening, a wrong key, not a zerostart gateway)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get(URL_ENV) or DEFAULT_URL,
                        help=f"the gateway (default ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between redraws with --watch (default 2)")
    parser.add_argument("--json", action="store_true", help="print the status route's JSON instead of the table")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the gateway (default 10)")
    parser.epilog = (f"The API key is the first of ${API_KEYS_ENV} (comma-separated), as the server reads its keys. "
                     "Rungs, top first: hot (in device memory), parked (worker alive, weights in host RAM), image "
                     "(a ready image on disk), zero (only the source).")


def main(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise SystemExit("zerostart: error: --interval must be positive")
    url = args.url.rstrip("/") if "://" in args.url else f"http://{args.url.rstrip('/')}"  # host:port is enough
    with httpx.Client(base_url=url, headers=_auth_headers(), timeout=args.timeout) as client:
        if not args.watch:
            print(_render(client, args.json))
            return 0
        try:
            while True:
                try:
                    screen = _render(client, args.json)
                except StatusError as e:  # (a gateway restarting: shown, and asked again)
                    screen = f"zerostart: error: {e}"
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: the table redrawn in place
                stamp = time.strftime("%H:%M:%S")
                print(f"{url} at {stamp}, every {args.interval:g} s (Ctrl-C to stop)\n{screen}", flush=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def _auth_headers() -> dict[str, str]:
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return {"authorization": f"Bearer {keys[0]}"} if keys else {}


def _render(client: httpx.Client, as_json: bool) -> str:
    data = fetch(client)
    if as_json:
        return json.dumps(data, indent=2)
    return table(_parse(data, str(client.base_url)))


def fetch(client: httpx.Client) -> object:
    """The body of ``GET /zerostart/status``; ``StatusError`` saying what went wrong."""
    url = f"{client.base_url}/zerostart/status"
    try:
        r = client.get("/zerostart/status")
    except httpx.TransportError as e:
        raise StatusError(f"no zerostart gateway answers at {client.base_url} ({type(e).__name__}: {e}); start one "
                          f"with `zerostart serve`, or point --url (${URL_ENV}) at it") from None
    if r.status_code == 401:
        if _auth_headers():
            raise StatusError(f"{url} refused the API key in ${API_KEYS_ENV}: it is not one of the server's api_keys")
        raise StatusError(f"{url} asks for an API key: set ${API_KEYS_ENV} to one of the server's api_keys")
    if r.status_code != 200:
        raise StatusError(f"{url} answered HTTP {r.status_code}: {r.text[:200]}")
    try:
        return r.json()
    except ValueError:
        raise StatusError(f"{url} answered something that is not JSON: is this a zerostart gateway?") from None


def _parse(data: object, url: str) -> FleetStatus:
    if isinstance(data, dict) and isinstance(data.get("models"), dict) and "replicas" in data:
        raise StatusError(f"{url} is a Ray Serve cluster's ingress (zerostart serve --cluster ray): its status lists "
                          "models per replica; read it with --json")
    try:
        return parse_status(data)
    except ValidationError as e:
        raise StatusError(f"{url}/zerostart/status has a shape this zerostart does not read ({e.error_count()} "
                          f"problem(s), first: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}); is it a zerostart "
                          "gateway of another version?") from None


# -- the table ----------------------------------------------------------------------------------


def rows(status: FleetStatus) -> list[tuple[str, ...]]:
    """One row per model, in :data:`COLUMNS` order."""
    return [_row(m) for m in status.models]


def _row(m: ModelStatus) -> tuple[str, ...]:
    rung = model_rung(m)
    moving = m.state not in ("hot", "parked", "zero")  # starting, waking, parking, stopping
    cold = m.last_cold_start
    slowest = cold.slowest() if cold is not None else None
    last = "-" if cold is None else f"{cold.rung} {_seconds(cold.ready_s)}" + (
        f" ({slowest.name} {_seconds(slowest.seconds)})" if slowest is not None else "")
    return (m.name, m.backend, f"{rung} ({m.state})" if moving else rung, _size(m.memory_bytes), str(m.in_flight),
            str(m.queued), _kept_for(m), last, ",".join(m.unavailable_rungs) or "-")


def table(status: FleetStatus) -> str:
    """The fleet as a person reads it: the models' table, each device's memory, and the reasons
    behind the rungs models cannot rest on."""
    body = [COLUMNS, *rows(status)]
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in body]
    if not status.models:
        lines.append("(no models)")
    lines.append("")
    for d in status.devices:
        budget = f"budget {_size(d.budget_bytes)}" if d.budget_bytes is not None else "no budget"
        lines.append(f"{d.device} memory: {budget}, held {_size(d.reserved_bytes)} (hot {_size(d.hot_bytes)}, "
                     f"parked {_size(d.parked_bytes)})")
    if status.standby is not None:
        lines.append(f"standby worker: {status.standby.state} on {status.standby.device}")
    reasons = [(m.name, rung, why) for m in status.models for rung, why in m.unavailable_rungs.items()]
    if reasons:
        lines += ["", "cannot rest on:"] + [f"  {name} {rung}: {why}" for name, rung, why in reasons]
    errors = [(m.name, m.last_error) for m in status.models if m.last_error]
    if errors:
        lines += ["", "last errors:"] + [f"  {name}: {err}" for name, err in errors]
    return "\n".join(lines)


def _kept_for(m: ModelStatus) -> str:
    """How long its keep-alive keeps its longest-kept idle worker ("-": no worker, or busy)."""
    kept = [w.kept_for_s for w in m.workers if w.state in ("hot", "parked")]
    if not kept:
        return "-"
    if any(k is None for k in kept):
        return "forever"
    return _duration(max(k for k in kept if k is not None))


def _size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _duration(s: float) -> str:
    if math.isinf(s):
        return "forever"
    s = int(round(s))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"
