"""The CPU kernels' shared library: built once per machine from ``qmm.cpp``, ``step.cpp`` and ``layers.cpp``
(against this torch), kept in ``$ZEROSTART_KERNELS_DIR/<key>/`` (default ``~/.cache/zerostart/kernels``,
shared by every ``ZEROSTART_CACHE_DIR``: it is a build of this code, not a model's data), and
imported as a Python extension module (:func:`module`).

Building takes ~30 s (a C++ compiler and torch's headers); loading a built one takes
milliseconds, so a server's cold start never builds: ``make setup`` (or ``python -m
zerostart.engine._kernels``) builds ahead, and a process that finds no library and no compiler
runs the portable torch path instead (``_kernels.kernel``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
from types import ModuleType

import torch

log = logging.getLogger("zerostart.engine")
NAME = "zerostart_kernels"
FLAGS = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for in the kernels runs on torch's threads
_HERE = os.path.dirname(__file__)
SOURCES = [os.path.join(_HERE, name) for name in ("qmm.cpp", "step.cpp", "layers.cpp")]
HEADERS = [os.path.join(_HERE, "ops.h")]
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_module: ModuleType | None = None
_why_not = ""


def key() -> str:
    """What the library depends on: its sources and flags, torch's version, the interpreter."""
    src = " ".join(FLAGS).encode()
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            src += f.read()
    return hashlib.sha256(src + f"\n{torch.__version__}\n{sys.version_info[:2]}".encode()).hexdigest()[:20]


def library_path() -> str:
    root = os.environ.get("ZEROSTART_KERNELS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "zerostart", "kernels")
    return os.path.join(os.path.abspath(root), key(), f"{NAME}.so")


def load(build: bool = False) -> bool:
    """Load the library (building it first if ``build`` and it is missing). True if its
    functions are in :func:`module`; else :func:`why_not` says why."""
    global _loaded, _why_not, _module
    if _loaded:  # every matmul asks: no lock once loaded
        return True
    with _lock:
        if _loaded:
            return True
        if _loaded is False and not build:
            return False
        path = library_path()
        if not os.path.isfile(path):
            if not build:
                _loaded, _why_not = False, f"the CPU kernels are not built ({path} is missing; run `make setup`)"
                return False
            try:
                built = _build(path)
                if built is not None:  # built and imported by this process
                    _loaded, _module = True, built
                    return True
            except (OSError, RuntimeError, ImportError, SystemExit) as e:  # no compiler, no headers, a failed build
                _loaded, _why_not = False, f"building the CPU kernels failed ({type(e).__name__}: {str(e)[-400:]})"
                log.warning("%s; the portable torch path runs instead", _why_not)
                return False
        try:
            spec = importlib.util.spec_from_file_location(NAME, path)
            assert spec is not None and spec.loader is not None  # a file path with an extension's suffix
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except (OSError, ImportError) as e:
            _loaded, _why_not = False, f"loading {path} failed ({e})"
            return False
        _loaded, _module = True, mod
        return True


def module() -> ModuleType:
    """The loaded library (after a :func:`load` that returned True)."""
    assert _module is not None, "the CPU kernels are not loaded"
    return _module


def why_not() -> str:
    return _why_not


def _build(path: str) -> ModuleType | None:
    """Compile into a temporary directory beside ``path`` and rename the library into place;
    concurrent builders wait on a lock file and the later ones find it built. The module if
    this process built (and so already imported) it."""
    from torch.utils import cpp_extension  # the compiler driver (setuptools): only when a build runs

    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(path):
            return None
        log.warning("building the CPU kernels once for this machine (~30 s) into %s", d)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=d)
        try:
            mod = cpp_extension.load(name=NAME, sources=SOURCES, extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                     build_directory=tmp,
                                     is_python_module=True, verbose=False)
            os.replace(os.path.join(tmp, f"{NAME}.so"), path)
            return mod
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
