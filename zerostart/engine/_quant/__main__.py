"""``python -m zerostart.engine._quant``: build the quantized CPU kernels now (``make setup``)."""

import sys

from zerostart.engine._quant import _build

if not _build.load(build=True):
    print(f"zerostart: {_build.why_not()}; quantized models run the portable torch path", file=sys.stderr)
else:
    print(f"zerostart: quantized CPU kernels ready ({_build.library_path()})")
