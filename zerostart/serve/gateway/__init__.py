"""The gateway process: the OpenAI routes in front, auth, status and metrics, and the fleet that
holds requests and moves replicas along the cold ladder (docs/design.md §3). Never imports torch.

    from zerostart.serve.gateway import create_app
    app = create_app(config)          # an ASGI app (zerostart serve runs it with uvicorn)

The request path reads top-down: ``_app.py`` / ``_proxy.py`` (HTTP, over ``serve.edge``) -> ``_fleet.py``
(``Fleet.lease``) -> ``_queue.py`` (held requests, leases) and ``_lifecycle.py`` (climb, park,
stop) -> ``_memory.py`` (admission and victims) -> ``serve/backends`` (the worker processes);
``_idle.py`` (the ticker) moves idle replicas down through ``_lifecycle.py``.
"""

from zerostart.serve.gateway._app import create_app
from zerostart.serve.gateway._fleet import Fleet
from zerostart.serve.gateway._queue import Lease
from zerostart.serve.gateway._state import TRANSITIONS, State

__all__ = ["TRANSITIONS", "Fleet", "Lease", "State", "create_app"]
