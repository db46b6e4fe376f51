"""A gateway whose models rest on every rung of the cold ladder at once, for the tests of what
shows the fleet (``zerostart status``, the dashboard): real workers of the tiny model.

    assistant   hot      kept 10 minutes after its request
    coder       parked   parks 1 s after each request (woken once, so a parked cold start is listed)
    summarizer  image    writes a ready image on its start, stops 1 s after its request
    translator  zero     never asked (until a test asks it)
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from tests.serve._helpers import Gateway

API_KEY = "fleet-key"
RUNGS = {"assistant": "hot", "coder": "parked", "summarizer": "image", "translator": "zero"}


def config(tiny_model: str) -> dict[str, Any]:
    return {"server": {"api_keys": [API_KEY]}, "devices": {"cpu": {"memory_budget": "2MB"}},
            "models": [{"name": "assistant", "path": tiny_model, "idle_timeout": "10m", "images": "off"},
                       {"name": "coder", "path": tiny_model, "idle_timeout": "10m", "park_after": "1s", "images": "off"},
                       {"name": "summarizer", "path": tiny_model, "idle_timeout": "1s", "images": "write"},
                       {"name": "translator", "path": tiny_model, "idle_timeout": "30s", "images": "off"}]}


def start(tiny_model: str, tmp_dir: str) -> Gateway:
    """The gateway, once every model rests on its rung (:data:`RUNGS`) and none is moving."""
    gw = Gateway(config(tiny_model), tmp_dir, api_key=API_KEY)
    try:
        client = gw.openai()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three cold starts at once
            list(pool.map(lambda m: client.completions.create(model=m, prompt="hi", max_tokens=2),
                          ["assistant", "coder", "summarizer"]))
        gw.wait_for("coder to park", lambda: gw.model("coder")["state"] == "parked", timeout=30)
        client.completions.create(model="coder", prompt="hi", max_tokens=2)  # a wake: a cold start from parked
        settled(gw)
    except BaseException:
        gw.stop()
        raise
    return gw


def settled(gw: Gateway, timeout: float = 60) -> dict[str, Any]:
    """The status once every model rests on its rung of :data:`RUNGS` with no replica moving."""
    def ready() -> bool:
        s = gw.status()
        return all(m["rung"] == RUNGS[m["name"]] and m["state"] in ("hot", "parked", "zero") for m in s["models"])

    gw.wait_for("the fleet to settle on its rungs", ready, timeout=timeout)
    return gw.status()
