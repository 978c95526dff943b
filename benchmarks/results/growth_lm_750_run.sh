#!/usr/bin/env bash
# The runs of growth_lm_750_protocol.md, one process at a time (from the repository root).
set -u
R=benchmarks/results
PY="nice -n 5 env PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_growth_lm.py"
CFG="--steps 750 --ramp-steps 90 --lr 0.01 --min-lr-ratio 0.1 --warmup-steps 30 --lr-restart-warmup 30 --grad-clip 1.0"
REF="--variants fixed_final_growth_lr --reference fixed_final_growth_lr"
late() { [ "$(date -u +%H:%M)" \> "14:40" ]; }
run() {
    if late; then echo "$(date -u +%T) $1 not started (after 14:40)"; return; fi
    echo "$(date -u +%T) start $1"
    local out=$1
    shift
    $PY $CFG "$@" --out "$R/growth_lm_750_$out.json" > "/tmp/g750_$out.log" 2>&1
    echo "$(date -u +%T) end $out rc=$?"
}
for phase_seeds in "pilot 12 13 14" "confirm 30 31 32"; do
    set -- $phase_seeds
    phase=$1
    shift
    for s in "$@"; do
        run "${phase}_ref_s$s" --seeds "$s" $REF
        run "${phase}_s$s" --seeds "$s" --variants fixed_final_growth_lr stack_ramp --reference fixed_final_growth_lr \
            --reuse "$R/growth_lm_750_${phase}_ref_s$s.json"
    done
done
for s in 30 31 32; do
    run "confirm_frontier_s$s" --seeds "$s" --variants fixed_final_growth_lr fixed_4_growth_lr fixed_final_equal \
        --reference fixed_final_growth_lr --reuse "$R/growth_lm_750_confirm_ref_s$s.json"
done
