"""``python -m zerostart.serve.worker``: a worker process (see ``_cli.py``)."""

import time

ORIGIN = (time.perf_counter(), time.time())  # everything before this line is the gateway's "spawn" phase

if __name__ == "__main__":
    from zerostart.serve.worker._cli import main

    raise SystemExit(main(origin=ORIGIN))
