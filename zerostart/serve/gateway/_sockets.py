"""Where unix workers' sockets live, and what a killed gateway left there.

A gateway holds an exclusive lock (``flock``) on ``.gateway.lock`` in its socket directory
while it runs; the kernel drops the lock when the process ends, however it ends. So at start a
gateway can tell what was left behind by one that is gone:

- without ``server.socket_dir``: it removes every ``zerostart-*`` directory of this user in the
  temporary directory whose lock is free, then makes its own;
- with ``server.socket_dir``: it takes the directory's lock (another live gateway there is a
  startup error: their workers' socket names would collide) and removes the sockets and the
  worker key files (``*.key``: llama-server reads its API key from one) left in it.

A lock file is put in place already locked (written under another name, locked, renamed), so
no other gateway can take a live one's lock in between.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import stat
import tempfile

log = logging.getLogger("zerostart.serve")

LOCK = ".gateway.lock"
_PREFIX = "zerostart-"
LEFT_BEHIND = ("*.sock", "*.key")  # what a gateway's workers put in its socket directory


class SocketDirInUse(RuntimeError):
    """Another running gateway holds the configured socket directory."""


class SocketDir:
    """The socket directory of one running gateway (``path``); :meth:`close` at shutdown."""

    def __init__(self, path: str, fd: int, owned: bool) -> None:
        self.path = path
        self._fd = fd
        self._owned = owned  # made by this gateway: removed at close

    @classmethod
    def claim(cls, configured: str | None) -> SocketDir:
        if configured:
            os.makedirs(configured, exist_ok=True)
            fd = _lock_in_place(configured)
            stale = [p for pattern in LEFT_BEHIND for p in glob.glob(os.path.join(configured, pattern))]
            for path in stale:
                _unlink(path)
            if stale:
                log.info("removed %d socket(s) and key file(s) a gateway that is gone left in %s", len(stale),
                         configured)
            return cls(configured, fd, owned=False)
        removed = sweep(tempfile.gettempdir())
        if removed:
            log.info("removed %d socket director%s that gateways that are gone left: %s", len(removed),
                     "y" if len(removed) == 1 else "ies", ", ".join(removed))
        path = tempfile.mkdtemp(prefix=_PREFIX)
        return cls(path, _lock_in_place(path), owned=True)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._fd)


def sweep(tmp: str) -> list[str]:
    """Remove the ``zerostart-*`` directories under ``tmp`` of this user whose gateway is gone."""
    removed = []
    for path in glob.glob(os.path.join(tmp, _PREFIX + "*")):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        try:
            fd = os.open(os.path.join(path, LOCK), os.O_RDWR)
        except OSError:  # no lock: not a gateway's (or one from before locks); left alone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its gateway runs
            os.close(fd)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        removed.append(path)
    return removed


def _lock_in_place(directory: str) -> int:
    """Lock ``directory/.gateway.lock`` for this process, and return its descriptor."""
    final = os.path.join(directory, LOCK)
    tmp = f"{final}.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else holds it
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        held = os.open(final, os.O_RDWR)
    except FileNotFoundError:
        held = None
    if held is not None:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(held)
            os.close(fd)
            _unlink(tmp)
            raise SocketDirInUse(f"another gateway is running with socket directory {directory} (its pid is in "
                                 f"{final}); give this one another server.socket_dir") from None
    os.rename(tmp, final)  # the old holder is gone: its lock file is replaced by ours
    if held is not None:
        os.close(held)  # held until now, so nobody could take the old lock in between
    return fd


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
