"""The ``command`` backend: any OpenAI-compatible server from a command template
(``command.run``, with ``{model}``, ``{name}``, ``{host}``, ``{port}``, ``{device}`` and
``{memory_bytes}`` filled in): llama.cpp's ``llama-server``, TGI, another zerostart ...

    backend: command
    command:
      run: llama-server -m {model} --host {host} --port {port}
      ready_path: /health

Ready when ``ready_path`` answers 200. Its start has one phase (spawn to ready) and its first
token. On CUDA it parks through the CUDA driver's checkpoint API (``command.checkpoint``); on
CPU it stops instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zerostart.serve.backends._foreign import ForeignWorker
from zerostart.serve.control import Refusal

if TYPE_CHECKING:
    from zerostart.serve._config import ModelConfig


class CommandWorker(ForeignWorker):
    name = "command"
    engine = "the server"

    def __init__(self, model, server, socket_dir) -> None:
        super().__init__(model, server, socket_dir)
        assert self.model is not None and self.model.command is not None
        self.options = self.model.command
        self.health_path = self.options.ready_path
        self.engine = f"the server {self.options.run[0]!r}"

    @classmethod
    def parking(cls, model: ModelConfig) -> Refusal | None:
        if model.command is not None and not model.command.checkpoint and model.device.startswith("cuda"):
            return Refusal(code="not_parkable", message="command.checkpoint is off: this server is not parked with "
                           "the CUDA checkpoint API; it stops instead")
        return super().parking(model)

    def argv(self, host: str, port: int) -> list[str]:
        m = self.model
        assert m is not None
        fill = {"model": m.path, "name": m.served_name, "host": host, "port": port, "device": m.device,
                "memory_bytes": self.memory_share or 0}
        return [a.format(**fill) for a in self.options.run]
