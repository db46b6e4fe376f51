"""A ``zerostart serve`` started for one replay: a subprocess on a free loopback port, from the
user's config file with every model's ``keep_alive_policy`` set to the policy under test, and
its own cache directory (so that every run starts with no ready images: the same cold start
for each policy), removed when the server stops. Talked to over HTTP like any other server; nothing of it is imported.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from zerostart.sim._traces import TraceError

_START_TIMEOUT_S = 120.0  # the gateway checks every checkpoint before it listens
_STOP_TIMEOUT_S = 60.0


class LocalServer:
    """``with LocalServer(config, policy="ttl:30", workdir=d) as server: server.url``"""

    def __init__(self, config_path: str | os.PathLike[str], *, policy: str | None, workdir: str | os.PathLike[str],
                 fresh_cache: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yaml"
        self.config = _rewrite(Path(config_path), policy)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = self.workdir / "server.log"
        self.fresh_cache = fresh_cache
        self._cache: str | None = None  # the private cache directory, removed with the server
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._log: Any = None

    def __enter__(self) -> "LocalServer":
        env = dict(os.environ)
        if self.fresh_cache:
            self._cache = env["ZEROSTART_CACHE_DIR"] = tempfile.mkdtemp(prefix="cache-", dir=self.workdir)
        cmd = [sys.executable, "-m", "zerostart", "serve", "--config", str(self.config_path), "--port", "0",
               "--host", "127.0.0.1"]
        self._log = self.log_path.open("w")
        self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            self.url = self._wait_for_url()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _wait_for_url(self) -> str:
        assert self._proc is not None and self._proc.stderr is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self._proc.stderr.readline()
            if not line:
                break
            self._log.write(line)
            if "serving on " in line:
                return line.split("serving on ", 1)[1].split("/v1", 1)[0]
        self._log.flush()
        raise TraceError(f"the server for the replay did not start (config {self.config_path}); its log: "
                         f"{self.log_path}:\n" + self.log_path.read_text()[-2000:])

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._log.write(line)

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        if self._log is not None:
            self._log.close()
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)  # its ready images: gigabytes for large models


def _rewrite(path: Path, policy: str | None) -> dict[str, Any]:
    """The config at ``path`` with relative model paths made absolute (the copy lives elsewhere)
    and, when ``policy`` is given, every model's ``keep_alive_policy`` set to it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TraceError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise TraceError(f"--config {path}: not valid YAML ({e})") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise TraceError(f"--config {path}: needs a list of models to replay the trace against")
    base = path.resolve().parent
    for m in models:
        if not isinstance(m, dict) or "path" not in m:
            raise TraceError(f"--config {path}: every model needs a path")
        p = str(m["path"])
        if "://" not in p:
            m["path"] = str(base / os.path.expanduser(p))
        if policy is not None:
            m["keep_alive_policy"] = policy
    return data
