"""zerostart's own worker process: one model's engine behind the OpenAI routes, and the control
routes the gateway drives it with (ready, phases, load, park, wake: ``serve/control.py``)::

    python -m zerostart.serve.worker --model SOURCE --port 8001

What it loads is a ``LoadSpec`` (``serve/control.py``), read in ``_loading.py``.

The gateway starts workers through its ``zerostart`` backend (``serve/backends``). Names are
imported on first use, so that ``python -m zerostart.serve.worker`` takes its origin (the
start of its first phase) before anything heavy is imported.
"""

from zerostart.serve._lazy import lazy_face

_EXPORTS = {
    "main": "zerostart.serve.worker._cli",
    "build_app": "zerostart.serve.worker._app",
    "Holder": "zerostart.serve.worker._holder",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
