"""``benchmarks/bench_growth.py --recipe default``: the frontier summary, verdict and table from the runs' JSON, and
its refusals before any training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_growth
from benchmarks.bench_growth import FRONTIER, summarize, table


def _runs(accs: dict[str, list[float]]) -> dict[str, list[dict]]:
    flops = {"grown": 78, "fixed_6": 100, "fixed_6_equal_flops": 78, "fixed_4": 67, "fixed_2": 33}
    return {
        name: [{"val_acc": a, "train_flops": flops[name], "steps": 444, "cpu_s": 1.0} for a in accs[name]]
        for name in FRONTIER
    }


def _record(accs: dict[str, list[float]]) -> dict:
    runs = _runs(accs)
    config = {"epochs": 3, "seeds": [300, 301, 302], "train_draws": [44, 45, 46], "train_signals": 19000}
    return {"config": config, "summary": summarize(runs), "runs": runs}


ACCS = {
    "grown": [0.80, 0.82, 0.81],
    "fixed_6": [0.81, 0.83, 0.80],
    "fixed_6_equal_flops": [0.78, 0.79, 0.79],
    "fixed_4": [0.77, 0.78, 0.79],
    "fixed_2": [0.70, 0.71, 0.72],
}


def test_paired_differences_and_the_verdict() -> None:
    s = summarize(_runs(ACCS))
    equal = s["fixed_6_equal_flops"]
    assert equal["grown_minus_this_mean"] == pytest.approx(0.0233333, abs=1e-6)
    assert equal["grown_minus_this_std"] == pytest.approx(0.0057735, abs=1e-6)
    assert equal["grown_better_in"] == 3
    assert s["fixed_2"]["fixed_6_minus_this_mean"] == pytest.approx(0.1033333, abs=1e-6)
    assert s["fixed_6"]["grown_better_in"] == 1
    assert s["fixed_4"]["flops_vs_fixed_6"] == pytest.approx(0.67)
    assert s["above_frontier"] is True
    # Grown ahead of fixed 4 on the mean but not by more than the paired std: not above the frontier.
    noisy = {**ACCS, "fixed_4": [0.70, 0.84, 0.79]}
    s = summarize(_runs(noisy))
    assert s["fixed_4"]["grown_minus_this_mean"] > 0
    assert s["above_frontier"] is False


def test_table_has_every_variant_the_data_and_the_verdict() -> None:
    lines = table(_record(ACCS))
    text = "\n".join(lines)
    assert "draws 44, 45, 46 (19,000 signals)" in text
    for name in FRONTIER:
        assert f"| {name} |" in text
    assert "| fixed_6_equal_flops | 444 | 0.78 | 0.787 ± 0.006 | +2.3 ± 0.6 | 3 of 3 |" in text
    assert "| 301 | 0.820 | 0.830 | 0.790 | 0.780 | 0.710 |" in text
    assert text.endswith("paired std): **yes**.")
    record = _record({**ACCS, "grown": [0.76, 0.77, 0.78]})
    assert table(record)[-1].endswith("**no**.")
    # The table comes from the JSON: a record that went through json reads the same.
    assert table(json.loads(json.dumps(record))) == table(record)


def test_refusals_before_any_run(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="validation draws 42 and 43"):
        bench_growth.main(["--recipe", "default", "--train-draws", "44", "42", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench_growth.main(["--recipe", "paper", "--train-draws", "44", "--out", str(tmp_path / "x.json")])
    assert "--recipe default only" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
