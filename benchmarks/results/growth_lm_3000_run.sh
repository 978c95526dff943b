#!/usr/bin/env bash
# The runs of growth_lm_3000_protocol.md: two queues (slot A, slot B), at most two processes at once.
# Usage (from the repository root): bash benchmarks/results/growth_lm_3000_run.sh A   (and, in parallel, ... B)
set -u
slot=$1
R=benchmarks/results
MARK=/tmp/g14long
mkdir -p "$MARK"
PY="nice -n 5 env PYTHONPATH=$PWD OMP_NUM_THREADS=1 /work/main/.venv/bin/python benchmarks/bench_growth_lm.py"
CFG="--steps 3000 --ramp-steps 360 --lr 0.01 --min-lr-ratio 0.1 --warmup-steps 30 --lr-restart-warmup 30 --grad-clip 1.0"
REF="--variants fixed_final_growth_lr --reference fixed_final_growth_lr"
GROWN="--variants fixed_final_growth_lr stack_ramp --reference fixed_final_growth_lr"
FRONTIER="--variants fixed_final_growth_lr fixed_4_growth_lr --reference fixed_final_growth_lr"
LAST_START="14:25"  # no run starts after this time (UTC)

wait_for() { while [ ! -e "$MARK/$1" ]; do sleep 20; done; }
late() { [ "$(date -u +%H:%M)" \> "$LAST_START" ]; }
run() {  # run NAME ARGS...: one benchmark process, its log in /tmp, a marker when it finished cleanly
    local name=$1
    shift
    if late; then echo "$(date -u +%T) $name not started (after $LAST_START)"; return; fi
    echo "$(date -u +%T) start $name"
    $PY $CFG "$@" > "/tmp/g14long_$name.log" 2>&1 && touch "$MARK/$name"
    echo "$(date -u +%T) end $name rc=$?"
}
ref() { run "$1_ref_s$2" --seeds "$2" $REF --out "$R/growth_lm_3000_$1_ref_s$2.json"; }
grown() {
    wait_for "$1_ref_s$2"
    run "$1_s$2" --seeds "$2" $GROWN --reuse "$R/growth_lm_3000_$1_ref_s$2.json" --out "$R/growth_lm_3000_$1_s$2.json"
}
frontier() {
    wait_for "confirm_ref_s$1"
    run "confirm_fixed4_s$1" --seeds "$1" $FRONTIER --reuse "$R/growth_lm_3000_confirm_ref_s$1.json" \
        --out "$R/growth_lm_3000_confirm_fixed4_s$1.json"
}
decide() {  # the protocol's stop rule, once the three pilot grown runs have finished
    wait_for pilot_s12; wait_for pilot_s13; wait_for pilot_s14
    if [ ! -e "$MARK/decision" ]; then
        /work/main/.venv/bin/python - "$R" > "$MARK/decision.tmp" <<'PY'
import json, sys
above = 0
for seed in (12, 13, 14):
    runs = json.load(open(f"{sys.argv[1]}/growth_lm_3000_pilot_s{seed}.json"))["runs"]
    diff = runs["stack_ramp"][0]["val_loss"] - runs["fixed_final_growth_lr"][0]["val_loss"]
    above += diff > 0
print("stop" if above >= 2 else "go")
PY
        mv "$MARK/decision.tmp" "$MARK/decision"
    fi
    cat "$MARK/decision"
}
confirm_grown() { [ "$(decide)" = go ] && grown confirm "$1" || echo "$(date -u +%T) confirm_s$1 not run (stop rule)"; }

if [ "$slot" = A ]; then
    ref pilot 12; grown pilot 12
    ref pilot 14; grown pilot 14
    ref confirm 29
    confirm_grown 28
    frontier 27; frontier 29
else
    ref pilot 13; grown pilot 13
    ref confirm 27; ref confirm 28
    confirm_grown 27; confirm_grown 29
    frontier 28
fi
echo "$(date -u +%T) queue $slot done"
