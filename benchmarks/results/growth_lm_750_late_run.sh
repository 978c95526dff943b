#!/usr/bin/env bash
# The runs of growth_lm_750_late_protocol.md, two processes at a time (from the repository root).
# Usage: growth_lm_750_late_run.sh pilot | confirm F | frontier F | h1500 F | h3000 F (the tests at 1,500 and 3,000
# steps) | lrcheck F [LRS] (the reference restarted at F with peak LR 6e-3 and 1.6e-2, or LRS)
set -u
R=benchmarks/results
STEPS=750
[ "$1" = h1500 ] && STEPS=1500
[ "$1" = h3000 ] && STEPS=3000
CFG="--steps $STEPS --ramp-steps $((STEPS * 12 / 100)) --min-lr-ratio 0.1 --warmup-steps 30 --lr-restart-warmup 30 --grad-clip 1.0 --eval-every 10"
joblist() {  # one line per run: phase seed variant grow_at
    local phase=$1 seeds=$2 fs=$3
    for s in $seeds; do
        echo "$phase $s fixed_6 0.3333333333333333"
        for f in 0.3333333333333333 $fs; do echo "$phase $s fixed_final_growth_lr $f"; done
        for f in $fs; do echo "$phase $s stack_ramp $f"; done
    done
}
one() {  # phase seed variant grow_at [peak lr, default 0.01: named in the file only when given]
    if [ "$(date -u +%H:%M)" \> "17:15" ]; then echo "$(date -u +%T) $* not started (after 17:15)"; return; fi
    local tag=$3
    local lr=${5:-0.01}
    [ -n "${5:-}" ] && tag="$3_lr$5"
    case $3 in fixed_[0-9]) ;; *) tag="${tag}_at$(printf '%.2f' "$4")" ;; esac  # plain fixed runs read no f
    local out="$R/growth_lm_${STEPS}_late_$1_${tag}_s$2.json"
    echo "$(date -u +%T) start $out"
    nice -n 5 env PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_growth_lm.py $CFG --lr "$lr" \
        --seeds "$2" --grow-at "$4" --variants "$3" --reference "$3" --out "$out" > "/tmp/late${STEPS}_$1_${tag}_s$2.log" 2>&1
    echo "$(date -u +%T) end $out rc=$?"
}
export -f one
export R CFG STEPS
case $1 in
    pilot) joblist pilot "12 13 14" "0.4 0.5 0.6" ;;
    confirm) joblist confirm "400 401 402" "$2" ;;
    h1500) joblist confirm "403 404 405" "$2" ;;
    h3000) joblist confirm "406 407 408" "$2" ;;
    lrcheck) for s in 400 401 402; do for lr in ${3:-0.006 0.016}; do echo "confirm $s fixed_final_growth_lr $2 $lr"; done; done ;;
    frontier) for s in 400 401 402; do
        echo "confirm $s fixed_2 $2"; echo "confirm $s fixed_4 $2"; echo "confirm $s fixed_4_growth_lr $2"; echo "confirm $s fixed_final_equal $2"
    done ;;
esac | xargs -P 2 -L 1 bash -c 'one "$@"' _
