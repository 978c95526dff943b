"""Ramped G_stack growth under real 2-process DDP (gloo, ddp_spawn): ranks stay identical, DDP holds the copies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _helpers import tensor_hash
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from benchmarks.tasks import ByteLM, LMConfig, make_gpt
from lightning_depthgrow.callbacks import apply_and_sync, event_log
from lightning_depthgrow.callbacks._common import rewrap_ddp
from lightning_depthgrow.events import ArchitectureEvent
from lightning_depthgrow.surgery import operators  # noqa: F401  (registers stack_blocks, fold_ramps)
from lightning_depthgrow.surgery.ramp import advance_ramps, ramped_blocks


class RampedStacking(Callback):
    """Duplicates the block stack (ramped) after step 2, advances ramps every step, records per-rank state."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.records: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        finished = advance_ramps(pl_module)
        if finished:
            apply_and_sync(trainer, pl_module, ArchitectureEvent("fold_ramps", {"blocks": finished}))
            # A fold changes no parameter but removes buffers; DDP keeps a stale buffer list and, once the model
            # has no buffers left, its next forward fails inside torch (broadcast of an empty list): re-wrap.
            rewrap_ddp(trainer, pl_module)
        if trainer.global_step == 2:
            spec = {"stack": "model.blocks", "factor": 2, "order": "stack", "ramp_steps": 3}
            apply_and_sync(trainer, pl_module, ArchitectureEvent("stack_blocks", spec))
        ddp = trainer.strategy.model
        self.records.append(
            {
                "step": trainer.global_step,
                "hash": tensor_hash(pl_module),  # parameters and buffers, ramp states included
                "ramps": {k: list(v) for k, v in ramped_blocks(pl_module).items()},
                "ddp_params": sum(1 for _ in ddp.parameters()) if isinstance(ddp, DistributedDataParallel) else -1,
                "module_params": sum(1 for _ in pl_module.parameters()),
                "optimizer_params": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups),
            }
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        events = [e.to_dict() for e in event_log(pl_module)]
        path = Path(self.out) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"records": self.records, "events": events}))


@pytest.mark.slow
def test_ramped_stacking_under_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    config = LMConfig(dim=16, heads=2, context=16, batch_size=4, steps=8)
    torch.manual_seed(0)
    module = ByteLM(make_gpt(config), config)
    tokens = torch.randint(0, 256, (64, config.context + 1), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        max_steps=config.steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[RampedStacking(str(tmp_path))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(tokens, batch_size=config.batch_size))  # each rank: its own half of the data

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    records = ranks[0]["records"]
    assert [len(r["ramps"]) for r in records] == [0, 2, 2, 2, 0, 0, 0, 0]
    assert records[1]["ramps"] == {"model.blocks.2": [0, 3], "model.blocks.3": [0, 3]}
    assert [e["kind"] for e in ranks[0]["events"]] == ["stack_blocks", "fold_ramps"]
    for r in records[1:]:
        assert r["ddp_params"] == r["module_params"] == r["optimizer_params"]
    assert records[0]["module_params"] < records[-1]["module_params"]
