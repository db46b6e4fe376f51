"""``python -m zerostart.engine._quant``: build the quantized CPU kernels now (``make setup``)."""

import sys

from zerostart.engine import EngineError, quant_kernels

try:
    print(f"zerostart: quantized CPU kernels ready ({quant_kernels(build=True)})")
except EngineError as e:
    print(f"zerostart: {e}; quantized models run the portable torch path", file=sys.stderr)
