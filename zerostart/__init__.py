"""zerostart: serve LLMs that scale to zero and come back fast.

The packages follow the cold-start pipeline (see docs/design.md):

- ``zerostart.weights``  bytes -> tensors (safetensors at the storage limit)
- ``zerostart.engine``   tensors -> tokens (Llama-family models)
- ``zerostart.snapshot`` ready images, parking and waking
- ``zerostart.serve``    the OpenAI-compatible gateway and its workers
- ``zerostart.policy``   when to move a model along the cold ladder
- ``zerostart.sim``      replay real traces against policies
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
