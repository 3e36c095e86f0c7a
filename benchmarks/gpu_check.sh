#!/usr/bin/env bash
# GPU checks for a machine with CUDA: the core verbs on the GPU, early stopping on a small corpus, and the recipe
# variants a GPU's budget could use better (larger models with dropout). Prints a log; nothing is asserted here —
# the test files run at the end with the GPU visible. Results go to docs/benchmarks.md by hand.
#
#   bash benchmarks/gpu_check.sh [TRAIN.txt VAL.txt]     (default: tiny Shakespeare's first 90% / last 10%)
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if [ $# -ge 2 ]; then TRAIN=$1; VAL=$2; else
  TRAIN=/tmp/gpu_check_train.txt; VAL=/tmp/gpu_check_val.txt
  python3 - "$TRAIN" "$VAL" <<'PY'
import sys
t = open("../shared/data/tinyshakespeare.txt", encoding="utf-8").read()
n = int(len(t) * 0.9)
open(sys.argv[1], "w").write(t[:n]); open(sys.argv[2], "w").write(t[n:])
PY
fi
S="python3 -m slmkit"
show() { tr '\r' '\n' | grep -E "^model:|held-out|stopped|error|Error|model folder" ; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "=== defaults, --time 30s (early stopping expected: 30 s of a GPU is hundreds of passes over 1 MB)"
timeout 120 $S train --data "$TRAIN" --time 30s --out /tmp/gc_auto --overwrite 2>&1 | show
timeout 60 $S eval /tmp/gc_auto --data "$VAL" --json 2>&1 | tail -1
timeout 60 $S generate /tmp/gc_auto --prompt "ROMEO:" --max-new-tokens 60 --seed 1 2>&1 | tail -3
for v in "--dropout 0.2" "--preset slm-7m --dropout 0.2" "--preset slm-15m --dropout 0.2"; do
  echo "=== variant: $v"
  timeout 120 $S train --data "$TRAIN" --time 25s --out /tmp/gc_v --overwrite $v 2>&1 | show
  timeout 60 $S eval /tmp/gc_v --data "$VAL" --json 2>&1 | tail -1
done
echo "=== slm serve on the GPU (--device auto): startup line, one completion"
$S serve /tmp/gc_auto --port 8123 > /tmp/gc_serve.log 2>&1 &
python3 - <<'PY'
import json, time, urllib.request
for _ in range(60):
    try:
        urllib.request.urlopen("http://127.0.0.1:8123/health", timeout=1); break
    except OSError:
        time.sleep(1)
body = json.dumps({"model": "gc_auto", "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}).encode()
req = urllib.request.Request("http://127.0.0.1:8123/v1/completions", body, {"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=60).read().decode()[:400])
PY
kill %1; wait; head -3 /tmp/gc_serve.log
echo "=== torchrun, 1 process per GPU (nccl)"
timeout 120 torchrun --standalone --nproc_per_node="$(nvidia-smi -L | wc -l)" -m slmkit train --data "$TRAIN" \
  --steps 40 --out /tmp/gc_ddp --overwrite 2>&1 | show
echo "=== tests with a GPU visible"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_generate.py tests/test_evaluate.py \
  tests/test_loop.py tests/test_models.py tests/test_serve.py 2>&1 | tail -15
