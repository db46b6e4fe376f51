"""The socket directories of gateways that are gone (issue 15): a killed gateway's is removed at
the next start, a configured one is taken over once its lock is free, or refused while held."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from zerostart.serve.gateway._sockets import LOCK, SocketDir, SocketDirInUse, sweep

from tests.serve._helpers import child_env


def _claimer(tmp: str, configured: str | None = None) -> subprocess.Popen[str]:
    """A process that claims a socket directory (as a gateway does) and waits."""
    code = (f"import os, sys, tempfile, time; tempfile.tempdir = {tmp!r}\n"
            "from zerostart.serve.gateway._sockets import SocketDir\n"
            f"d = SocketDir.claim({configured!r})\n"
            "for name in ('m-1.sock', 'm-2.key'): open(os.path.join(d.path, name), 'w').close()\n"
            "print(d.path, flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], env=child_env(), stdout=subprocess.PIPE, text=True)
    return p


def _claimed(p: subprocess.Popen[str]) -> str:
    """The directory a claimer printed."""
    assert p.stdout is not None
    return p.stdout.readline().strip()


def test_a_killed_gateway_s_socket_directory_is_removed_at_the_next_start(tmp_path) -> None:
    tmp = str(tmp_path)
    with _claimer(tmp) as dead, _claimer(tmp) as alive:
        dead_dir, alive_dir = _claimed(dead), _claimed(alive)
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        os.makedirs(os.path.join(tmp, "zerostart-unrelated"))  # no lock: not a gateway's; left alone
        assert sorted(sweep(tmp)) == [dead_dir]
        assert not os.path.exists(dead_dir) and os.path.exists(os.path.join(alive_dir, LOCK))
        assert os.path.isdir(os.path.join(tmp, "zerostart-unrelated"))
        alive.kill()


def test_a_configured_socket_directory_is_taken_over_or_refused(tmp_path) -> None:
    configured = str(tmp_path / "sockets")
    with _claimer(str(tmp_path), configured) as first:
        assert _claimed(first) == configured
        with pytest.raises(SocketDirInUse, match="another gateway"):
            SocketDir.claim(configured)  # its workers' socket names would collide
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert os.path.exists(os.path.join(configured, "m-1.sock"))
        open(os.path.join(configured, "notes.txt"), "w").close()  # not a worker's: stays
        d = SocketDir.claim(configured)  # the lock is free: the sockets and worker keys left behind go
        assert sorted(os.listdir(configured)) == [LOCK, "notes.txt"]
        d.close()
        assert os.path.isdir(configured)  # configured: kept
