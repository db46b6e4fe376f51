"""vLLM reads its weights through zerostart: ``--load-format zerostart``.

Installed next to vLLM (``pip install zerostart`` in vLLM's environment), this package is found
through the ``vllm.general_plugins`` entry point, which vLLM calls in each of its processes::

    python -m vllm.entrypoints.openai.api_server --model /models/llama --load-format zerostart
    # weights from S3 (or https://, hf://), config and tokenizer from a local directory:
    python -m vllm.entrypoints.openai.api_server --model /cache/llama-config --load-format zerostart \\
        --model-loader-extra-config '{"source": "s3://bucket/llama"}'

The loader reads the checkpoint with ``zerostart.weights.load_arena`` (page-cache mapping or
O_DIRECT chosen per file, S3/HTTP streaming into the local cache, ``zerostart-checksums.json``
verified where present) and feeds vLLM's ``model.load_weights`` tensor by tensor as the bytes
arrive. Its options (``--model-loader-extra-config``) are :class:`LoaderOptions`.
"""

from __future__ import annotations

from zerostart.plugins.vllm._options import LOAD_FORMAT, LoaderOptions

__all__ = ["LOAD_FORMAT", "LoaderOptions", "register"]

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``--load-format zerostart`` known to vLLM.
    vLLM calls it once per process (API server, engine core, workers); calling it again does
    nothing."""
    global _registered
    if _registered:
        return
    # vLLM's own (optional): only when vLLM loads this plugin
    from vllm.model_executor.model_loader import register_model_loader

    # vLLM's own (optional): only when vLLM loads this plugin
    from zerostart.plugins.vllm._loader import ZerostartModelLoader

    register_model_loader(LOAD_FORMAT)(ZerostartModelLoader)
    _registered = True
