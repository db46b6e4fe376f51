"""The engine's errors, in one place."""


class EngineError(ValueError):
    """A model, request or engine setting the engine cannot work with; the message says which."""
