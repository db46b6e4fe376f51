"""zerostart inside other engines.

- :mod:`zerostart.plugins.vllm`: vLLM's ``--load-format zerostart``, reading weights through
  :mod:`zerostart.weights` (registered by the ``vllm.general_plugins`` entry point).

Nothing here is imported by zerostart itself: each plugin is loaded by its host engine, in the
host's environment, and imports that engine.
"""

__all__: list[str] = []
