#!/usr/bin/env bash
# Issue 13's experiment (docs/results.md "Stage-1 losses side by side"): one arm, one stage.
#   scripts/arms13.sh ARM STAGE [EXTRA --set ...]
# Every arm: smollm2-135m preset, the same data (var/x13/data, validation_fraction 0.002: 23 KB,
# small enough to score every checkpoint causally on the whole split),
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
  [e]="stage1.losses.byte_kl=1.0 stage1.losses.distill=0 model.boundary_context=4"  # d, 60 min
)
# Stage boxes ("steps checkpoint_every CPU-minutes") and step counts sized to them (measured
# ~3.0 CPU-s per Stage-1 step, ~4.5 per Stage-2 step on this box), so the LR schedule ends about
# where the box does. a-d: the same short box (5 + 2.5 min); e: the 60-minute budget (40 + 20).
declare -A S1=([a]="100 50 5" [b]="100 50 5" [c]="100 50 5" [d]="100 50 5" [e]="800 200 40")
declare -A S2=([a]="32 16 2.5" [b]="32 16 2.5" [c]="32 16 2.5" [d]="32 16 2.5" [e]="260 65 20")
# Every arm starts from the paper's recipe (bolmo_core.config.PAPER_RECIPE), whatever the preset
# ships now, and sets its own changes on top.
sets=(--set data.validation_fraction=0.002 --set stage1.losses.byte_kl=0 --set stage1.losses.distill=1
      --set model.boundary_context=0)
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
