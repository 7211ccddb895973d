#!/usr/bin/env bash
# Issue 13's experiment (docs/results.md "Stage-1 losses side by side"): one arm, one stage.
#   scripts/arms13.sh ARM STAGE [EXTRA --set ...]
# Every arm: smollm2-135m preset, the same data (var/x13/data, validation_fraction 0.004),
# seed, one thread, no in-loop validation (eval_every=0; checkpoints are scored offline on
# the whole validation split), a CPU-time budget per stage (rank-0 process CPU minutes).
set -euo pipefail
ARM=$1 STAGE=$2; shift 2
ROOT=${X13:-var/x13}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
declare -A ARMS=(
  [a]=""                                                              # the paper's losses
  [b]="stage1.losses.byte_kl=1.0"                                     # + byte-level targets
  [c]="stage1.losses.byte_kl=1.0 stage1.losses.distill=0"             # targets replace binarised KL
  [d]="stage1.losses.byte_kl=1.0 stage1.losses.distill=0 model.boundary_context=4"
  [e]="stage1.losses.byte_kl=1.0 stage1.losses.distill=0 model.boundary_context=4"
)
# Stage boxes (CPU minutes) and step counts sized to them (~2.4 CPU-s per Stage-1 step, ~4.5
# per Stage-2 step on this box), so the LR schedule ends where the box does.
declare -A S1=([a]="1000 250 40" [b]="1000 250 40" [c]="1000 250 40" [d]="1000 250 40" [e]="600 200 25")
declare -A S2=([a]="260 130 20" [b]="260 130 20" [c]="260 130 20" [d]="260 130 20" [e]="460 115 35")
sets=(--set data.validation_fraction=0.004)
for kv in ${ARMS[$ARM]}; do sets+=(--set "$kv"); done
if [ "$STAGE" = 1 ]; then read -r steps every mins <<<"${S1[$ARM]}"; init=()
else read -r steps every mins <<<"${S2[$ARM]}"; init=(--init-from "$ROOT/$ARM/stage1"); fi
s=stage$STAGE
sets+=(--set $s.steps=$steps --set $s.checkpoint_every=$every --set $s.keep_last=20
       --set $s.eval_every=0 --set $s.eval_batches=1)
mkdir -p "$ROOT/$ARM"
exec .venv/bin/python -m bolmo_core.train --preset smollm2-135m --stage "$STAGE" \
  --manifest "$ROOT/data/manifest.json" --out "$ROOT/$ARM/$s" "${init[@]}" "${sets[@]}" "$@" \
  --max-cpu-minutes "$mins" >> "$ROOT/$ARM/log.txt" 2> "$ROOT/$ARM/stage$STAGE.err"
