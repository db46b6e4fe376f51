#!/usr/bin/env bash
# Every GPU test and benchmark, in one command, for a machine with CUDA:
#   bench/gpu.sh [tests] [load] [park] [generate] [coldstart] [serve] [sweep]   (default: all)
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
export ZEROSTART_CACHE_DIR=${ZEROSTART_CACHE_DIR:-/tmp/zerostart-cache}
WORK=${WORK:-/tmp/zerostart-gpu}
mkdir -p "$WORK"
sections=${*:-tests load park generate coldstart serve}
want() { [[ " $sections " == *" $1 "* ]]; }
step() { echo "== $1 ($(date +%T))"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nproc; free -g | head -2; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if want tests; then
  step tests
  timeout 300 $PY -m pytest -m gpu tests/weights tests/snapshot tests/engine tests/serve -q -p no:cacheprovider -o timeout=240 -W ignore::DeprecationWarning 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25
fi
if want park; then
  step "park/wake"
  timeout 240 $PY bench/park_wake.py --size 1b --repeat 5 --json "$OUT/park-cuda.json" 2>&1 | tail -5
fi
if want load; then
  step "bench load"
  timeout 400 $PY -m zerostart bench load --size ${LOAD_SIZE:-4GB} --device cuda ${LOAD_COLD---cold} --repeat ${REPEAT:-2} --work-dir "$WORK" --json "$OUT/load-cuda.json" 2>"$OUT/load-cuda.log" | tee "$OUT/load-cuda.txt"
fi
if want generate; then
  step "bench generate"
  timeout 300 $PY -m zerostart bench generate --size 1b --device cuda --json "$OUT/generate-cuda.json" 2>"$OUT/generate-cuda.log" | tee "$OUT/generate-cuda.txt"
fi
if want coldstart; then
  step coldstart
  timeout 400 $PY -m zerostart coldstart --model "$ZEROSTART_CACHE_DIR/demo/1b" --device cuda --repeat ${REPEAT:-2} --json "$OUT/coldstart-cuda.json" --chart "$OUT/coldstart-cuda.png" 2>"$OUT/coldstart-cuda.log" | tee "$OUT/coldstart-cuda.txt"
fi
if want serve; then
  step "bench serve"
  timeout 300 $PY -m zerostart bench serve --device cuda --json "$OUT/serve-cuda.json" 2>"$OUT/serve-cuda.log" | tee "$OUT/serve-cuda.txt"
fi
if want sweep; then
  step "load sweep"
  timeout 400 $PY -m zerostart bench load --size 8GB --device cuda --sweep --repeat 1 --work-dir "$WORK" --json "$OUT/load-sweep-cuda.json" 2>&1 | tail -20
fi
step done
