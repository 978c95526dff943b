"""``bench_growth_lm``'s ``--grad-clip``: one clipping norm for every variant's run (``LMConfig.grad_clip``, applied
before each optimizer step), recorded in ``setup["lm"]`` only when on, so unclipped result files stay comparable and
a clipped run never merges with an unclipped one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import bench_growth_lm as bench
from benchmarks.bench_growth_lm import main
from benchmarks.tasks import CorpusConfig, LMConfig

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TUNED_R30 = RESULTS / "growth_lm_1500_tuned_r30.json"  # unclipped; lr 1e-2, restart 30, ramp 180; seeds 12-14
TUNED = ["--steps", "1500", "--ramp-steps", "180", "--lr", "0.01", "--lr-restart-warmup", "30"]
PAIR = ["--variants", "fixed_final_growth_lr", "stack_ramp", "--reference", "fixed_final_growth_lr"]
VARIANTS = ["fixed_2", "fixed_6", "fixed_final_growth_lr", "stack_ramp", "zero_interleave", "fixed_final_equal"]


@dataclass(frozen=True)
class SmallLM(LMConfig):
    """The benchmark's config on a small corpus (the test trains a few steps of each variant)."""

    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(train_bytes=40_000, val_bytes=8_000))


def test_grad_clip_reaches_every_variants_run_and_clips_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs: dict[int, LMConfig] = {}
    clips: list[tuple[int, float]] = []  # (number of tensors clipped, max norm) per call
    real_train, real_clip = bench.train_lm, torch.nn.utils.clip_grad_norm_

    def train(config: LMConfig, *args: Any, **kwargs: Any) -> dict[str, Any]:
        configs[len(configs)] = config
        start = len(clips)
        result = real_train(config, *args, **kwargs)
        result["clip_calls"] = clips[start:]
        return result

    def clip(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        parameters = list(parameters)
        clips.append((len(parameters), max_norm))
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(bench, "LMConfig", SmallLM)
    monkeypatch.setattr(bench, "train_lm", train)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    argv = ["--steps", "12", "--warmup-steps", "2", "--ramp-steps", "2", "--lr-restart-warmup", "2", "--seeds", "0"]
    argv += ["--variants", *VARIANTS, "--grown-steps", "9"]
    record = main([*argv, "--grad-clip", "0.5", "--out", str(tmp_path / "clip.json")])
    assert record["setup"]["lm"]["grad_clip"] == 0.5
    assert len(configs) == len(VARIANTS) and all(c.grad_clip == 0.5 for c in configs.values())
    for name in VARIANTS:
        (run,) = record["runs"][name]
        calls = run["clip_calls"]
        # Lightning calls the hook before every optimizer step, with the run's norm, on all of the model's weights:
        # the grown runs' last steps clip the grown model's (6 blocks) weights, not only the 2-block start model's.
        assert len(calls) == run["steps"] and {norm for _, norm in calls} == {0.5}, name
        assert calls[-1][0] == len(dict(bench.make_gpt(configs[0], run["depth"]).named_parameters())), name
    grown = record["runs"]["stack_ramp"][0]
    assert grown["depth"] == 6 and grown["steps"] == 9 and grown["clip_calls"][0][0] < grown["clip_calls"][-1][0]

    clips.clear()
    configs.clear()
    off = main([*argv[:-4], "--variants", "fixed_2", "stack_ramp", "--out", str(tmp_path / "off.json")])
    assert "grad_clip" not in off["setup"]["lm"]  # the default leaves the record as files made before the option
    assert all(c.grad_clip == 0.0 for c in configs.values()) and clips == []


def test_clipped_runs_never_merge_with_unclipped_files(tmp_path: Path) -> None:
    seeds = ["--seeds", "12"]
    unclipped = main([*TUNED, *seeds, *PAIR, "--merge", str(TUNED_R30), "--out", str(tmp_path / "a.json")])
    assert unclipped["runs"]["fixed_final_growth_lr"][0]["seed"] == 12  # the default still takes stored files
    with pytest.raises(ValueError, match="another configuration"):
        main(
            [*TUNED, *seeds, *PAIR, "--grad-clip", "1.0", "--merge", str(TUNED_R30), "--out", str(tmp_path / "b.json")]
        )
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_invalid_grad_clip_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(SystemExit):
        main([*TUNED, "--seeds", "0", *PAIR, "--grad-clip", value, "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()
