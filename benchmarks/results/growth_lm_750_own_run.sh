#!/usr/bin/env bash
# The runs of growth_lm_750_own_protocol.md: queue A (pilot, then seed 38) or B (seeds 36, 37), from the repository root.
set -u
R=benchmarks/results
PY="nice -n 5 env PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_growth_lm.py"
CFG="--steps 750 --ramp-steps 90 --lr 0.01 --min-lr-ratio 0.1 --warmup-steps 30 --lr-restart-warmup 30 --grad-clip 1.0"
GROWN="--grown-steps 600 --variants fixed_final_growth_lr stack_ramp --reference fixed_final_growth_lr"
late() { [ "$(date -u +%H:%M)" \> "14:55" ]; }
run() {
    if late; then echo "$(date -u +%T) $1 not started (after 14:55)"; return; fi
    echo "$(date -u +%T) start $1"
    local out=$1
    shift
    $PY $CFG "$@" --out "$R/growth_lm_750_$out.json" > "/tmp/g750own_$out.log" 2>&1
    echo "$(date -u +%T) end $out rc=$?"
}
confirm() {
    run "own_confirm_ref_s$1" --seeds "$1" --variants fixed_final_growth_lr --reference fixed_final_growth_lr
    run "own_confirm_s$1" --seeds "$1" $GROWN --reuse "$R/growth_lm_750_own_confirm_ref_s$1.json"
}
if [ "$1" = A ]; then
    for s in 12 13 14; do run "own_pilot_s$s" --seeds "$s" $GROWN --reuse "$R/growth_lm_750_pilot_ref_s$s.json"; done
    confirm 38
else
    confirm 36
    confirm 37
fi
