"""``benchmarks/bench_dms_lm.py --grad-clip``: the clip reaches every run's real ``Trainer.fit`` (search, pipelines
a and b, uniform, full, Torch-Pruning), clips the model's weights only, and is recorded in the settings."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from benchmarks import bench_dms_lm as bench
from benchmarks.tasks import ByteLM
from lightning_depthgrow.dms.appliers import ARCH_GROUP_KEY

TINY = [
    "--seeds", "0", "--targets", "0.5", "--dim", "16", "--layers", "2", "--heads", "2", "--context", "16",
    "--batch-size", "4", "--epoch-steps", "2", "--search-epochs", "1", "--val-windows", "4",
]  # fmt: skip
CLIP = 0.05  # well under a random-init GPT-2's gradient norm, so every step is clipped


class RecordingByteLM(ByteLM):
    """ByteLM that records, per optimizer step, its clip setting, the weights' gradient norm before and after
    ``configure_gradient_clipping`` and whether the DMS architecture ratios' gradients were left as they were."""

    steps: list[dict[str, Any]] = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        groups = optimizer.param_groups
        weights = [p for g in groups if not g.get(ARCH_GROUP_KEY) for p in g["params"] if p.grad is not None]
        arch = [p for g in groups if g.get(ARCH_GROUP_KEY) for p in g["params"] if p.grad is not None]
        arch_before = [p.grad.clone() for p in arch]

        def norm() -> float:
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in weights])))

        before = norm()
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.steps.append(
            {
                "module": id(self),
                "grad_clip": self.config.grad_clip,
                "before": before,
                "after": norm(),
                "arch": len(arch),
                "arch_unchanged": all(torch.equal(a, p.grad) for a, p in zip(arch_before, arch)),
            }
        )


@pytest.mark.parametrize(
    ("extra", "fits"),
    [
        (["--steps", "4", "--variants", "full", "dms", "uniform", "torch_pruning"], 5),  # full, b, a, uniform, TP
        (  # the cheap search of pipeline a: search, a, uniform
            "--steps 4 --variants dms uniform --no-pipeline-b --budget-steps 6 --search-batch-size 2 "
            "--search-context 8".split(),
            3,
        ),
    ],
)
def test_grad_clip_reaches_every_run_and_leaves_the_architecture_ratios_alone(
    tmp_path, monkeypatch, extra: list[str], fits: int
) -> None:
    monkeypatch.setattr(bench, "ByteLM", RecordingByteLM)
    monkeypatch.setattr(RecordingByteLM, "steps", [])
    out = tmp_path / "clip.json"
    result = bench.main([*TINY, *extra, "--grad-clip", str(CLIP), "--out", str(out)])
    steps = RecordingByteLM.steps
    # One LightningModule per Trainer.fit (Torch-Pruning's trains its first epoch even where the package is
    # missing and its row holds the error).
    assert len({s["module"] for s in steps}) == fits
    assert len(steps) >= sum(r.get("steps", 0) for r in result["runs"])
    assert all(s["grad_clip"] == CLIP for s in steps)
    assert all(s["before"] > CLIP for s in steps)
    assert all(abs(s["after"] - CLIP) < 1e-4 for s in steps)
    searched = [s for s in steps if s["arch"]]
    assert searched and all(s["arch_unchanged"] for s in searched)  # the DMS search clipped its weights only
    assert json.loads(out.read_text())["config"]["settings"]["lm"]["grad_clip"] == CLIP
    assert f'"grad_clip": {CLIP}' in out.with_suffix(".md").read_text()


def test_runs_without_the_flag_are_unclipped_and_merge_with_older_unclipped_jsons_only(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "ByteLM", RecordingByteLM)
    monkeypatch.setattr(RecordingByteLM, "steps", [])
    out = tmp_path / "plain.json"
    bench.main([*TINY, "--steps", "2", "--variants", "full", "--out", str(out)])
    steps = RecordingByteLM.steps
    assert steps and all(s["grad_clip"] == 0.0 and s["after"] == s["before"] for s in steps)
    result = json.loads(out.read_text())
    assert result["config"]["settings"]["lm"]["grad_clip"] == 0.0
    older = json.loads(out.read_text())  # as written before --grad-clip existed: no grad_clip, ran unclipped
    del older["config"]["settings"]["lm"]["grad_clip"]
    for run in older["runs"]:
        run["seed"] = 9
    (tmp_path / "older.json").write_text(json.dumps(older))
    merged = bench.main(["--part", "report", "--out", str(out), "--merge", str(tmp_path / "older.json")])
    assert sorted(r["seed"] for r in merged["runs"]) == [0, 9]
    clipped = json.loads(out.read_text())
    clipped["config"]["settings"]["lm"]["grad_clip"] = 1.0
    (tmp_path / "clipped.json").write_text(json.dumps(clipped))
    with pytest.raises(ValueError, match="other settings"):
        bench.main(["--part", "report", "--out", str(out), "--merge", str(tmp_path / "clipped.json")])
    compared = bench.main(["--part", "report", "--out", str(out), "--baseline", str(tmp_path / "clipped.json")])
    text = out.with_suffix(".md").read_text()
    assert '{"lm.grad_clip": [1.0, 0.0]}' in compared["baseline"]["differs"] and "lm.grad_clip" in text
    assert "| 1.0 | full | 0 |" in text and "| +0.0000 |" in text  # the run next to itself: no difference
