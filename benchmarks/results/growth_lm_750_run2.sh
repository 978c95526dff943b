#!/usr/bin/env bash
# The runs of the amendment in growth_lm_750_protocol.md: queue A or B (from the repository root).
set -u
R=benchmarks/results
PY="nice -n 5 env PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_growth_lm.py"
CFG="--steps 750 --ramp-steps 90 --lr 0.01 --min-lr-ratio 0.1 --warmup-steps 30 --lr-restart-warmup 30 --grad-clip 1.0"
REF="--variants fixed_final_growth_lr --reference fixed_final_growth_lr"
GROWN="--variants fixed_final_growth_lr stack_ramp --reference fixed_final_growth_lr"
late() { [ "$(date -u +%H:%M)" \> "14:40" ]; }
run() {
    if late; then echo "$(date -u +%T) $1 not started (after 14:40)"; return; fi
    echo "$(date -u +%T) start $1"
    local out=$1
    shift
    $PY $CFG "$@" --out "$R/growth_lm_750_$out.json" > "/tmp/g750_$out.log" 2>&1
    echo "$(date -u +%T) end $out rc=$?"
}
pair() {  # pair PHASE SEED EXTRA...: the seed's reference, then its grown run against it
    local phase=$1 s=$2
    shift 2
    run "${phase}_ref_s$s" --seeds "$s" $REF "$@"
    run "${phase}_s$s" --seeds "$s" $GROWN --reuse "$R/growth_lm_750_${phase}_ref_s$s.json" "$@"
}
if [ "$1" = A ]; then
    pair confirm 31
    pair confirm 32
    for s in 30 31 32; do
        run "confirm_frontier_s$s" --seeds "$s" --variants fixed_final_growth_lr fixed_4_growth_lr fixed_final_equal \
            --reference fixed_final_growth_lr --reuse "$R/growth_lm_750_confirm_ref_s$s.json"
    done
else
    for s in 33 34 35; do pair grid10 "$s" --eval-every 10; done
    run grid10_check_ref_s12 --seeds 12 $REF --eval-every 10
fi
