"""Tensors -> tokens: a Llama-family inference engine fed by ``zerostart.weights``.

    from zerostart.engine import Engine, SamplingParams
    engine = Engine.from_pretrained("path/to/model", device="cuda")
    for ev in engine.generate("Hello", SamplingParams(max_tokens=32, temperature=0)):
        print(ev.text, end="", flush=True)

Llama 2/3, Mistral, Qwen2 and Qwen3 checkpoints in the Hugging Face layout. ``SamplingParams``,
``PoolingParams``, ``Constraint``, ``TokenEvent``, ``TokenLogprob``, ``EngineConfig``,
``EngineError`` and the chat/tool-call helpers (``render_chat``, ``tool_parser``, ``ToolCall``)
need no torch; the names that do are imported on first use.
"""

import importlib
from typing import Any

from zerostart.engine._chat import render_chat
from zerostart.engine._config import EngineConfig, available_cpus
from zerostart.engine._errors import EngineError
from zerostart.engine._params import Constraint, PoolingParams, SamplingParams, TokenEvent, TokenLogprob
from zerostart.engine._token_text import TokenText
from zerostart.engine._toolcalls import PARSERS as TOOL_PARSERS, ToolCall, ToolParser, tool_parser

_TORCH_NAMES = {"Engine": "_engine", "RequestHandle": "_sequence", "Tokenizer": "_tokenizer", "device_for": "_load",
                "cpu_kernels": "_kernels", "quant_kernels": "_kernels", "weights_dtype": "_load"}

__all__ = ["Constraint", "Engine", "EngineConfig", "EngineError", "PoolingParams", "RequestHandle", "SamplingParams",
           "TOOL_PARSERS", "TokenEvent", "TokenLogprob", "TokenText", "Tokenizer", "ToolCall", "ToolParser",
           "available_cpus", "cpu_kernels", "device_for", "quant_kernels", "render_chat", "tool_parser", "weights_dtype"]


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(f"zerostart.engine.{_TORCH_NAMES[name]}"), name)
    raise AttributeError(f"module 'zerostart.engine' has no attribute {name!r}")
