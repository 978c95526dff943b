"""The late-growth report's strict reference, reach-ratios and pilot choice, on synthetic result files (no
training)."""

from __future__ import annotations

import json

import pytest

from benchmarks.growth_lm_late_report import choose_f, frontier_rows, grown_rows, load_runs, lr_check_rows


def write(directory, phase, tag, seed, final, flops=100.0, losses=None, steps=750):
    """One result file as ``bench_growth_lm.py`` writes it: one variant, one seed, its validation curve."""
    losses = losses or {50: final + 1.0, 100: final}
    curve = [{"step": s, "val_loss": v, "flops": flops * s / max(losses)} for s, v in losses.items()]
    run = {"seed": seed, "val_loss": final, "flops": flops, "curve": curve}
    variant = tag.split("_at")[0]
    path = directory / f"growth_lm_{steps}_late_{phase}_{tag}_s{seed}.json"
    path.write_text(json.dumps({"setup": {}, "runs": {variant: [run]}}))


def test_the_strict_reference_is_the_lowest_fixed_6_block_run_and_reach_is_read_against_it(tmp_path):
    write(tmp_path, "pilot", "fixed_6", 12, 1.30)
    write(tmp_path, "pilot", "fixed_final_growth_lr_at0.33", 12, 1.20)  # the strictest
    write(tmp_path, "pilot", "fixed_final_growth_lr_at0.50", 12, 1.25)
    # reaches 1.25 at step 60 (0.6 x 70 FLOPs over 100), 1.20 only at step 80
    losses = {20: 2.0, 40: 1.5, 60: 1.24, 80: 1.19, 100: 1.15}
    write(tmp_path, "pilot", "stack_ramp_at0.50", 12, 1.15, flops=70.0, losses=losses)
    write(tmp_path, "pilot", "fixed_4", 12, 1.0)  # not a 6-block run: never the reference
    rows = grown_rows(load_runs(tmp_path))
    assert len(rows) == 1
    row = rows[0]
    assert row["reference"] == "fixed_final_growth_lr_at0.33" and row["reference_loss"] == pytest.approx(1.20)
    assert row["f"] == pytest.approx(0.5) and row["total"] == pytest.approx(0.7)
    assert row["reach"] == pytest.approx(0.8 * 70 / 100) and row["reach_step"] == 80
    assert row["diff"] == pytest.approx(-0.05)
    assert row["reach_by_reference"]["fixed_final_growth_lr_at0.50"] == pytest.approx(0.6 * 70 / 100)
    assert row["reach_by_reference"]["fixed_6"] == pytest.approx(0.6 * 70 / 100)


def test_the_pilot_choice_takes_the_lowest_worst_seed_and_never_counts_as_infinite():
    rows = [
        {"steps": 750, "phase": "pilot", "f": 0.4, "reach": 0.55},
        {"steps": 750, "phase": "pilot", "f": 0.4, "reach": None},  # never: worst = infinite
        {"steps": 750, "phase": "pilot", "f": 0.5, "reach": 0.64},
        {"steps": 750, "phase": "pilot", "f": 0.5, "reach": 0.66},
        {"steps": 750, "phase": "pilot", "f": 0.6, "reach": 0.60},
        {"steps": 750, "phase": "pilot", "f": 0.6, "reach": 0.66},  # ties with 0.5 on the worst seed, lower mean
        {"steps": 750, "phase": "confirm", "f": 0.4, "reach": 0.10},  # confirmation rows never choose
        {"steps": 1500, "phase": "pilot", "f": 0.5, "reach": 0.10},  # nor another horizon's
    ]
    assert choose_f(rows) == pytest.approx(0.6)
    assert choose_f([r for r in rows if r["phase"] == "confirm"]) is None


def test_frontier_rows_pair_the_fixed_models_with_the_grown_run_of_the_same_seed_and_f(tmp_path):
    write(tmp_path, "confirm", "fixed_6", 400, 1.30)
    write(tmp_path, "confirm", "stack_ramp_at0.50", 400, 1.10, flops=68.8)
    write(tmp_path, "confirm", "fixed_4_growth_lr_at0.50", 400, 1.18, flops=68.8)
    write(tmp_path, "confirm", "fixed_4_growth_lr_at0.60", 400, 1.00, flops=68.8)  # no grown run at 0.6: skipped
    write(tmp_path, "confirm", "fixed_4", 400, 1.20, flops=68.8)
    runs = load_runs(tmp_path)
    frontier = frontier_rows(runs, grown_rows(runs))
    assert [(f["fixed"], round(f["grown_minus"], 4)) for f in frontier] == [
        ("fixed_4", -0.10),
        ("fixed_4_growth_lr_at0.50", -0.08),
    ]
    assert frontier[0]["flops"] == pytest.approx(0.688)


def test_reference_runs_with_another_peak_lr_are_information_not_the_strict_reference(tmp_path):
    write(tmp_path, "confirm", "fixed_final_growth_lr_at0.60", 400, 1.20)
    write(tmp_path, "confirm", "fixed_final_growth_lr_lr0.016_at0.60", 400, 1.10)  # lower, but information only
    write(tmp_path, "confirm", "stack_ramp_at0.60", 400, 1.15, flops=62.5, losses={50: 1.5, 80: 1.19, 100: 1.15})
    runs = load_runs(tmp_path)
    rows = grown_rows(runs)
    assert [r["reference"] for r in rows] == ["fixed_final_growth_lr_at0.60"]
    check = lr_check_rows(runs, rows)
    assert [(c["lr"], c["loss"], c["reach"]) for c in check] == [(0.016, 1.10, None)]
