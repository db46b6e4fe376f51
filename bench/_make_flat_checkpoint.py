import json
import struct
import sys

path, gb = sys.argv[1], int(sys.argv[2])
n = gb << 30
h = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
h += b" " * (-len(h) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    blk = bytes(range(256)) * (1 << 18)  # 64 MiB, not zeros
    for _ in range(n // len(blk)):
        f.write(blk)
