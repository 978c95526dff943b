"""The horizon report's per-seed figures, on synthetic curves (no training)."""

from __future__ import annotations

import pytest

from benchmarks.growth_lm_horizon_report import on_grid, seed_figures


def curve(losses: dict[int, float], flops_per_step: float = 1.0) -> list[dict[str, float]]:
    return [{"step": s, "val_loss": v, "flops": s * flops_per_step} for s, v in losses.items()]


def test_reach_ratio_on_the_runs_grid_and_on_the_50_step_grid():
    ref = {"seed": 7, "val_loss": 1.0, "flops": 100.0}
    # validated every 10 steps: first at or below 1.0 at step 60; on the 50-step grid only at 100 (the end)
    losses = {10: 2.0, 20: 1.8, 30: 1.5, 40: 1.2, 50: 1.1, 60: 1.0, 70: 0.95, 100: 0.9}
    grown = {"val_loss": 0.9, "flops": 100.0, "curve": curve(losses)}
    figures = seed_figures(ref, grown)
    assert figures["grid"] == 10
    assert figures["reach"] == pytest.approx(0.60)
    assert figures["reach50"] == pytest.approx(1.00)
    assert figures["diff"] == pytest.approx(-0.1) and figures["total"] == pytest.approx(1.0)
    assert [row["step"] for row in on_grid(grown["curve"], 50)] == [50, 100]


def test_a_grown_run_that_never_reaches_the_reference_has_no_ratio():
    ref = {"seed": 1, "val_loss": 1.0, "flops": 100.0}
    grown = {"val_loss": 1.05, "flops": 80.0, "curve": curve({50: 2.0, 100: 1.05})}
    figures = seed_figures(ref, grown)
    assert figures["reach"] is None and figures["reach50"] is None and figures["interpolated"] is None
    assert figures["total"] == pytest.approx(0.8)
