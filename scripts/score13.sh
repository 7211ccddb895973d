#!/usr/bin/env bash
# Issue 13: score the arms' checkpoints on the whole validation split as they appear, one at a
# time (scripts/arms13.py eval skips those already scored). Finals first (the table's rows),
# then the intermediate checkpoints. Stops when every arm's Stage 2 is final and all are scored.
#   scripts/score13.sh [ROOT]
set -uo pipefail
ROOT=${1:-var/x13}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
scored() { local c=$1 arm stage step; arm=$(basename "$(dirname "$(dirname "$c")")")
  stage=$(basename "$(dirname "$c")"); stage=${stage#stage}
  step=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['step'])" "$c/trainer_state.json")
  [ -e "$ROOT/eval/$(printf '%s-s%s-%05d.json' "$arm" "$stage" "$step")" ]; }
while :; do
  todo=()
  for c in "$ROOT"/*/stage2/final "$ROOT"/*/stage1/final "$ROOT"/e/stage*/step-* "$ROOT"/*/stage*/step-*; do
    [ -e "$c/trainer_state.json" ] && ! scored "$c" && todo+=("$c")
  done
  if [ ${#todo[@]} -eq 0 ]; then
    n=$(ls -d "$ROOT"/*/stage2/final 2>/dev/null | wc -l)
    [ "$n" -ge "$(ls -d "$ROOT"/[a-z] | wc -l)" ] && break
    sleep 30; continue
  fi
  .venv/bin/python scripts/arms13.py eval "${todo[0]}" || { echo "failed: ${todo[0]}"; sleep 30; }
done
