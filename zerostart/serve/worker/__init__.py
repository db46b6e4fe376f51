"""zerostart's own worker process: one model's engine behind the OpenAI routes, and the control
routes the gateway drives it with (ready, phases, load, park, wake: ``serve/control.py``)::

    python -m zerostart.serve.worker --model SOURCE --port 8001

The gateway starts workers through its ``zerostart`` backend (``serve/backends``). Names are
imported on first use, so that ``python -m zerostart.serve.worker`` takes its origin (the
start of its first phase) before anything heavy is imported.
"""

from typing import Any

_EXPORTS = {
    "main": "zerostart.serve.worker._cli",
    "build_app": "zerostart.serve.worker._app",
    "Holder": "zerostart.serve.worker._holder",
    "LoadSpec": "zerostart.serve.worker._loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zerostart.serve.worker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
