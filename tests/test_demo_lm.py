"""The README's demo command runs: ``examples/grow_gpt_stdlib.py`` (here with ``--quick``) in a fresh process.

It grows a byte-level GPT with ``DepthGrowth()``'s defaults and trains three fixed models on the same data. The
checks are on what the demo claims: the grown run ends at 6 blocks with the fixed 6-block model's parameters, costs
less training FLOPs (its first third at the 2-block cost), the equal-FLOPs baseline costs what the grown run cost,
and every printed difference is the one its comparison file holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests._helpers import run_example


def test_lm_demo_quick_runs_and_compares_at_equal_flops(tmp_path: Path) -> None:
    result = run_example("grow_gpt_stdlib.py", tmp_path)
    assert "stacked 'model.blocks' (2 -> 6 blocks" in result.stdout + result.stderr  # a log line (stderr)
    runs = json.loads((tmp_path / "comparison.json").read_text())
    grown, fixed, equal, small = runs["grown"], runs["fixed 6"], runs["fixed 6, equal FLOPs"], runs["fixed 4"]
    assert grown["depth"] == fixed["depth"] == equal["depth"] == 6 and small["depth"] == 4
    assert grown["params"] == fixed["params"] > small["params"]
    assert grown["steps"] == fixed["steps"] == small["steps"] > equal["steps"]
    ratio = grown["flops"] / fixed["flops"]
    assert 0.7 < ratio < 0.9, ratio  # a third of the steps at the 2-block cost
    assert abs(equal["flops"] / grown["flops"] - 1) < 1 / equal["steps"]
    # the grown run's depth per validation: 2 blocks before the growth step, 6 after
    depths = [row["depth"] for row in grown["curve"]]
    assert depths[0] == 2 and depths[-1] == 6
    for name, r in runs.items():
        if name != "grown":
            assert f"grown - {name}: {grown['val_loss'] - r['val_loss']:+.4f} nats/byte" in result.stdout


def test_lm_demo_grows_at_the_fraction_given_and_matches_equal_flops_to_it(tmp_path: Path) -> None:
    result = run_example("grow_gpt_stdlib.py", tmp_path, "--grow-at", "0.6")
    runs = json.loads((tmp_path / "comparison.json").read_text())
    grown, fixed, equal = runs["grown"], runs["fixed 6"], runs["fixed 6, equal FLOPs"]
    # 60 quick steps: growth after step 36, so 36 steps at the 2-block cost (the default grows after step 20)
    assert [row["depth"] for row in grown["curve"] if row["step"] <= 30] == [2, 2, 2]
    assert [row["depth"] for row in grown["curve"] if row["step"] >= 40] == [6, 6, 6]
    ratio = grown["flops"] / fixed["flops"]
    assert 0.55 < ratio < 0.7, ratio  # 0.6 of the steps at the 2-block cost: 0.6 * 0.375 + 0.4 = 0.625
    assert abs(equal["flops"] / grown["flops"] - 1) < 1 / equal["steps"]
    assert "stacked 'model.blocks' (2 -> 6 blocks" in result.stdout + result.stderr
