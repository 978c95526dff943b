"""``bench_growth_lm``'s ``--lr`` / ``--min-lr-ratio`` / ``--warmup-steps``: every variant's base schedule, recorded
in ``setup["lm"]``, so ``--merge`` refuses result files made with another schedule (uses stored result files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_growth_lm import main

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DEFAULT = RESULTS / "growth_lm_1500_fixed6.json"  # lr 6e-3, floor 0.1, warm-up 30 (the defaults)
TUNED = RESULTS / "growth_lm_1500_tuned_grid_lr0.01_mr0.1_s0_1.json"  # lr 1e-2
COMMON = ["--steps", "1500", "--ramp-steps", "180", "--seeds", "0", "1", "--variants", "fixed_6"]


def test_defaults_unchanged_and_merge_takes_the_same_schedule(tmp_path: Path) -> None:
    record = main([*COMMON, "--merge", str(DEFAULT), "--out", str(tmp_path / "a.json")])
    lm = record["setup"]["lm"]
    assert (lm["lr"], lm["min_lr_ratio"], lm["warmup_steps"]) == (6e-3, 0.1, 30)
    assert [r["seed"] for r in record["runs"]["fixed_6"]] == [0, 1]
    tuned = main([*COMMON, "--lr", "0.01", "--merge", str(TUNED), "--out", str(tmp_path / "b.json")])
    assert tuned["setup"]["lm"]["lr"] == 0.01
    assert json.loads((tmp_path / "b.json").read_text())["setup"]["lm"]["lr"] == 0.01


@pytest.mark.parametrize(
    ("options", "source"),
    [
        (["--lr", "0.01"], DEFAULT),
        (["--min-lr-ratio", "0.3"], DEFAULT),
        (["--warmup-steps", "60"], DEFAULT),
        ([], TUNED),
        (["--lr", "0.01", "--min-lr-ratio", "0.3"], TUNED),
    ],
)
def test_merge_refuses_another_schedule(tmp_path: Path, options: list[str], source: Path) -> None:
    with pytest.raises(ValueError, match="another configuration"):
        main([*COMMON, *options, "--merge", str(source), "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()
