"""The README's demo command runs: ``examples/grow_vit_mnist1d.py`` (here with ``--quick``) in a fresh process.

It grows with ``DepthGrowth()``'s defaults, trains the two baselines of the final size, and writes the comparison
it prints. The checks are on what the demo claims: the grown run ends at 6 blocks, costs less training FLOPs than
the fixed model of the final size (the 2-block phase is cheaper), and the equal-compute baseline trains for the
steps that cost what the grown run cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from examples.grow_vit_mnist1d import TRAIN_DRAWS
from tests._helpers import ROOT, run_example


def test_demo_quick_runs_and_compares_at_equal_flops(tmp_path: Path) -> None:
    result = run_example("grow_vit_mnist1d.py", tmp_path)
    assert "stacked 'model.blocks' (2 -> 6 blocks" in result.stdout
    assert "folded the finished ramps of blocks" in result.stdout  # DepthGrowth.describe of a fold event
    assert "grown - fixed at equal FLOPs" in result.stdout
    runs = json.loads((tmp_path / "comparison.json").read_text())
    grown, fixed, equal = runs["grown"], runs["fixed"], runs["fixed_equal_flops"]
    assert grown["depth"] == fixed["depth"] == equal["depth"] == 6
    assert runs["fixed_4"]["depth"] == 4 and runs["fixed_4"]["steps"] == fixed["steps"]
    assert runs["fixed_4"]["train_flops"] < grown["train_flops"]
    assert "grown - fixed 4:" in result.stdout
    assert runs["train_draws"] == list(TRAIN_DRAWS)
    assert grown["params"] == fixed["params"]
    assert grown["steps"] == fixed["steps"]
    # Grown at 1/3 of the steps from 2 to 6 blocks: the first third at the 2-block cost.
    ratio = grown["train_flops"] / fixed["train_flops"]
    assert 0.6 < ratio < 0.9, ratio
    assert equal["steps"] == round(fixed["steps"] * ratio)
    assert abs(equal["train_flops"] / grown["train_flops"] - 1) < 1 / equal["steps"] + 1e-9
    assert [e["kind"] for e in grown["events"]] == ["stack_blocks", "fold_ramps"]


def test_demo_refuses_a_validation_draw_before_any_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grow_vit_mnist1d.py"), "--train-draws", "44", "42"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode != 0
    assert "must not include the validation draws 42 and 43" in result.stderr
    assert "== grown ViT" not in result.stdout and not list(tmp_path.iterdir())
