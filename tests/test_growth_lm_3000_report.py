"""The 3,000-step LM report's figures from synthetic result rows: the interpolated reach, the stop rule, the
success test (a missing or failing seed never reads as met)."""

from __future__ import annotations

import pytest

from benchmarks.growth_lm_3000_report import interpolated_reach, seed_row, stop_rule, success

CURVE = [{"flops": 10, "val_loss": 3.0}, {"flops": 20, "val_loss": 2.0}, {"flops": 30, "val_loss": 1.0}]


def test_interpolated_reach_is_linear_between_the_points_around_the_crossing():
    assert interpolated_reach(CURVE, 1.5) == pytest.approx(25.0)
    assert interpolated_reach(CURVE, 2.0) == pytest.approx(20.0)
    assert interpolated_reach(CURVE, 3.5) == pytest.approx(10.0)
    assert interpolated_reach(CURVE, 0.5) is None


def _row(seed: int, diff: float, reach_flops: float | None) -> dict:
    ref = {
        "seed": seed,
        "val_loss": 1.5,
        "flops": 40,
        "train_loss_end": 1.4,
        "curve": [{"step": 1500, "val_loss": 2.0}],
    }
    curve = [{"step": 1500, "flops": 10, "val_loss": 3.0}]
    curve += [] if reach_flops is None else [{"step": 3000, "flops": reach_flops, "val_loss": 1.5}]
    return seed_row(ref, {"val_loss": 1.5 + diff, "flops": 30, "curve": curve})


def test_seed_row_figures():
    row = _row(27, -0.01, 24)
    assert row["reach"] == pytest.approx(0.6)
    assert row["total"] == pytest.approx(0.75)
    assert row["ref_gap"] == pytest.approx(0.1)
    assert row["grown_gap"] is None  # the grown run has no train_loss_end here
    assert row["trajectory"] == {1500: pytest.approx(1.0)}
    assert _row(27, 0.01, None)["reach"] is None


def test_success_needs_every_seed_at_or_below_the_target():
    seeds = (27, 28, 29)
    assert success([_row(s, -0.01, 24) for s in seeds], seeds).startswith("**met**")
    assert success([_row(27, -0.01, 24), _row(28, -0.01, 28), _row(29, -0.01, 24)], seeds).startswith("**not met**")
    assert success([_row(27, -0.01, 24), _row(28, 0.01, None)], seeds).startswith("**not met**")
    assert success([_row(27, -0.01, 24)], seeds).startswith("undecided")


def test_stop_rule_counts_the_pilot_seeds_that_end_above_the_reference():
    assert "not applied" in stop_rule([_row(12, 0.01, None)])
    assert stop_rule([_row(12, 0.01, None), _row(13, 0.02, None), _row(14, -0.01, 24)]).endswith("(negative)")
    assert stop_rule([_row(12, 0.01, None), _row(13, -0.02, 24), _row(14, -0.01, 24)]).endswith("runs")
