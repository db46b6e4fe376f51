#!/usr/bin/env bash
# Every GPU test and benchmark, in one command, for a machine with CUDA:
#   bench/gpu.sh [weights|engine|serve|snapshot|all] ...
# Results (logs and JSON) go to $OUT (default ./gpu-out). Wheels in .whl/ (if present) are
# installed first into /tmp/site for machines without a package index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WORK=${WORK:-/tmp/zerostart-gpu}
mkdir -p "$WORK"
sections=${*:-all}

{ nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

want() { [[ " $sections " == *" all "* || " $sections " == *" $1 "* ]]; }

if want weights; then
  $PY -m pytest -m gpu tests/weights -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-weights.txt" | tail -15
fi
if want weights-sweep; then
  $PY -m zerostart bench load --size 8GB --device cuda --sweep --repeat 1 --work-dir "$WORK" --json "$OUT/load-sweep-cuda.json" 2>&1 | tee "$OUT/load-sweep-cuda.txt" | tail -30
fi
if want weights-bench; then
  $PY -m zerostart bench load --size 8GB --device cuda --cold --repeat ${REPEAT:-3} --work-dir "$WORK" --json "$OUT/load-cuda.json" 2>&1 | tee "$OUT/load-cuda.txt" | tail -30
fi
