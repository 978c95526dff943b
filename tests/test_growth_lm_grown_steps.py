"""``bench_growth_lm``'s ``--grown-steps`` / ``--grown-lr``: the grown variants' own schedule length and peak LR,
while the reference keeps ``--steps``; FLOPs ratios count the grown run's own FLOPs against the reference's full run.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_growth_lm as bench
from benchmarks.bench_growth_lm import GrowthAwareLR, equal_compute_steps, grown_config, main
from benchmarks.tasks import LMConfig, train_step_flops

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TUNED_R30 = RESULTS / "growth_lm_1500_tuned_r30.json"  # lr 1e-2, restart 30, ramp 180; seeds 12-14
TUNED = ["--steps", "1500", "--ramp-steps", "180", "--lr", "0.01", "--lr-restart-warmup", "30"]
PAIR = ["--variants", "fixed_final_growth_lr", "stack_ramp", "--reference", "fixed_final_growth_lr"]


def _args(**kw: object) -> argparse.Namespace:
    base = {"start_depth": 2, "factor": 3, "grow_at": 1 / 3, "grown_steps": None, "grown_lr": None}
    return argparse.Namespace(**{**base, **kw})


def test_grown_config_defaults_to_the_run_config_and_takes_its_own_steps_and_lr() -> None:
    config = LMConfig(steps=1500, lr=0.01)
    assert grown_config(config, _args()) == replace(config, depth=2)
    own = grown_config(config, _args(grown_steps=1200, grown_lr=0.013))
    assert (own.depth, own.steps, own.lr) == (2, 1200, 0.013)
    assert replace(own, steps=1500, lr=0.01) == replace(config, depth=2)  # nothing else changes


def test_equal_compute_steps_matches_the_grown_runs_own_length() -> None:
    config = LMConfig(steps=1500, lr=0.01)
    small, large = train_step_flops(config, 2), train_step_flops(config, 6)
    assert equal_compute_steps(config, _args()) == round((500 * small + 1000 * large) / large)
    assert equal_compute_steps(config, _args(grown_steps=1200)) == round((400 * small + 800 * large) / large)


def test_merge_takes_the_reference_but_not_grown_runs_made_with_another_length(tmp_path: Path) -> None:
    seeds = ["--seeds", "12", "13", "14"]
    same = main([*TUNED, *seeds, *PAIR, "--merge", str(TUNED_R30), "--out", str(tmp_path / "a.json")])
    assert "grown_steps" not in same["setup"] and sorted(same["runs"]) == [
        "fixed_6",
        "fixed_final_growth_lr",
        "stack_ramp",
    ]
    short = main(
        [*TUNED, *seeds, *PAIR, "--grown-steps", "1200", "--merge", str(TUNED_R30), "--out", str(tmp_path / "b.json")]
    )
    assert short["setup"]["grown_steps"] == 1200
    assert sorted(short["runs"]) == ["fixed_6", "fixed_final_growth_lr"]  # the 1,500-step stack_ramp is not taken
    assert short["runs"]["fixed_final_growth_lr"] == same["runs"]["fixed_final_growth_lr"]
    with pytest.raises(ValueError, match="another configuration"):  # another base schedule is still refused
        main(
            [
                *TUNED[:-4],
                "--lr",
                "0.006",
                "--lr-restart-warmup",
                "30",
                *seeds,
                *PAIR,
                "--grown-steps",
                "1200",
                "--merge",
                str(TUNED_R30),
                "--out",
                str(tmp_path / "c.json"),
            ]
        )


@pytest.mark.parametrize("option", [["--grown-steps", "0"], ["--grown-lr", "0"]])
def test_invalid_values_are_refused(tmp_path: Path, option: list[str]) -> None:
    with pytest.raises(SystemExit):
        main([*TUNED, "--seeds", "0", *PAIR, *option, "--out", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()


def test_short_grown_run_trains_its_own_schedule_and_is_counted_against_the_full_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schedules: list[GrowthAwareLR] = []

    class Recorded(GrowthAwareLR):  # the benchmark's own schedule, kept to check the span it was built for
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            schedules.append(self)

    monkeypatch.setattr(bench, "GrowthAwareLR", Recorded)
    argv = ["--steps", "60", "--ramp-steps", "5", "--lr", "0.01", "--lr-restart-warmup", "5", "--seeds", "3", *PAIR]
    record = main([*argv, "--grown-steps", "40", "--out", str(tmp_path / "e.json")])
    # The reference's schedule spans 60 steps with its restart at 20; the grown run's spans 40 with its restart at 13.
    reference_lr, grown_lr = schedules
    assert (reference_lr.config.steps, reference_lr.at_step, reference_lr.config.depth) == (60, 20, 6)
    assert (grown_lr.config.steps, grown_lr.at_step, grown_lr.config.depth) == (40, 13, 2)
    assert grown_lr.factor(13 + 5) == pytest.approx(1.0) and grown_lr.factor(40) == pytest.approx(0.1)
    grown, reference = record["runs"]["stack_ramp"][0], record["runs"]["fixed_final_growth_lr"][0]
    assert (grown["steps"], reference["steps"]) == (40, 60)
    assert grown["curve"][-1]["step"] == 40 and grown["depth"] == 6
    assert [e["step"] for e in grown["events"] if e["kind"] == "stack_blocks"] == [13]  # round(40 / 3)
    step_flops = {int(depth): flops for depth, flops in record["setup"]["train_step_flops"].items()}
    small, large = step_flops[2], step_flops[6]
    assert grown["flops"] == 13 * small + 27 * large and reference["flops"] == 60 * large
    entry = record["summary"]["stack_ramp"]
    assert entry["flops_ratio_vs_final"] == pytest.approx(grown["flops"] / reference["flops"])
    target = reference["val_loss"]
    first = next((row for row in grown["curve"] if row["val_loss"] <= target), None)
    expected = None if first is None else first["flops"] / reference["flops"]
    assert entry["reaches_final_loss_at_flops_ratio"] == [expected]
    assert entry["paired_loss_minus_final_mean"] == pytest.approx(grown["val_loss"] - target)
