#!/usr/bin/env bash
# Issue 13: score the arms' checkpoints on the whole validation split as they appear, one at a
# time (scripts/arms13.py eval skips those already scored). Finals first (the table's rows),
# then the intermediate checkpoints. Stops when every arm's Stage 2 is final and all are scored.
# Several can run at once: each claims a checkpoint with an atomic mkdir under <root>/eval/.
#   scripts/score13.sh [ROOT]            (FINALS_ONLY=1: only stage finals)
set -uo pipefail
ROOT=${1:-var/x13}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
scored() { local c=$1 arm stage step; arm=$(basename "$(dirname "$(dirname "$c")")")
  stage=$(basename "$(dirname "$c")"); stage=${stage#stage}
  step=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['step'])" "$c/trainer_state.json")
  name=$(printf '%s-s%s-%05d' "$arm" "$stage" "$step")
  [ -e "$ROOT/eval/$name.json" ] || [ -d "$ROOT/eval/.claim-$name" ]; }
claim() { mkdir -p "$ROOT/eval"; mkdir "$ROOT/eval/.claim-$name" 2>/dev/null; }
while :; do
  todo=()
  cands=("$ROOT"/*/stage2/final "$ROOT"/*/stage1/final)
  [ -n "${FINALS_ONLY:-}" ] || cands+=("$ROOT"/e/stage*/step-* "$ROOT"/*/stage*/step-*)
  for c in "${cands[@]}"; do
    [ -e "$c/trainer_state.json" ] && ! scored "$c" && claim && { todo+=("$c"); break; }
  done
  if [ ${#todo[@]} -eq 0 ]; then
    n=$(ls -d "$ROOT"/*/stage2/final 2>/dev/null | wc -l)
    [ "$n" -ge "$(ls -d "$ROOT"/[a-z] | wc -l)" ] && break
    sleep 30; continue
  fi
  .venv/bin/python scripts/arms13.py eval "${todo[0]}" || { echo "failed: ${todo[0]}"; sleep 30; }
  rmdir "$ROOT/eval/.claim-$name" 2>/dev/null
done
