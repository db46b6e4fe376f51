"""Where zerostart keeps what it downloads and derives: one per-user cache directory."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """``$ZEROSTART_CACHE_DIR``, else ``$XDG_CACHE_HOME/zerostart``, else ``~/.cache/zerostart``."""
    explicit = os.environ.get("ZEROSTART_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "zerostart")
