"""``python -m zerostart.engine._kernels``: build the engine's CPU kernels now (``make setup``)."""

import sys

from zerostart.engine import EngineError, quant_kernels

try:
    print(f"zerostart: CPU kernels ready ({quant_kernels(build=True)})")
except EngineError as e:
    print(f"zerostart: {e}; the engine runs the torch path", file=sys.stderr)
