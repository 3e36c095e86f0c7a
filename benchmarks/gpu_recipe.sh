#!/usr/bin/env bash
# The auto recipe on a GPU with a small corpus: `slm train --time ${GC_TIME:-30}s` on tiny Shakespeare's first 90%,
# scored on the last 10% (`slm eval`), for the defaults and the variants that isolate the recipe's choices (batch
# size, context, where the schedule ends). Prints one line per run; nothing is asserted. Results go to
# docs/benchmarks.md by hand.
#
#   bash benchmarks/gpu_recipe.sh TRAIN.txt VAL.txt [OLD_SLMKIT_PARENT]
#
# OLD_SLMKIT_PARENT: a folder holding another slmkit package (e.g. `git archive REV slmkit | tar -x -C DIR`), run
# with the same defaults for a before/after comparison in the same lease. GR_QUICK=1: the defaults (two seeds) and
# that comparison only.
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
TRAIN=$(realpath "$1"); VAL=$(realpath "$2"); OLD=$3; T=${GC_TIME:-30}
run() {  # label, folder holding the slmkit package to run (python -m puts the working folder first), flags...
  local label=$1 pp=$2; shift 2
  local log; log=$(cd "$pp" && timeout 200 python3 -m slmkit train --data "$TRAIN" \
    --time "${T}s" --out /tmp/gr_m --overwrite --no-progress "$@" 2>&1 | tr '\r' '\n')
  local bpb; bpb=$(cd "$pp" && timeout 60 python3 -m slmkit eval /tmp/gr_m \
    --data "$VAL" --json 2>/dev/null | tail -1 | python3 -c "import json,sys; print('%.4f' % json.load(sys.stdin)['bits_per_byte'])")
  echo "=== $label: external held-out $bpb bits/byte"
  echo "$log" | grep -E "^model:|schedule|stopped|best|held-out|rror|Traceback" | sed 's/^/    /'
}
nvidia-smi --query-gpu=name --format=csv,noheader || echo "(no nvidia-smi)"
run "defaults" "$PWD"
[ -n "$OLD" ] && run "defaults, before (batch 32k, schedule over the whole --time)" "$OLD"
run "defaults, seed 2" "$PWD" --seed 2
[ -n "$GR_QUICK" ] && exit
run "--block-size 256 --batch-size 16 (the CPU's shape, same tokens per step)" "$PWD" --block-size 256 --batch-size 16
TOK=$(python3 -c "import sys; print(int(open(sys.argv[1], 'rb').read().__len__() / 3 * 20))" "$TRAIN")
run "--tokens $TOK (~20 passes: a later end to the schedule)" "$PWD" --tokens "$TOK"
run "--batch-size 32 (the old batch with the pass cap)" "$PWD" --batch-size 32
