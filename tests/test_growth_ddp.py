"""DepthGrowth under real 2-process DDP (gloo, ddp_spawn): every rank grows identically and stays in sync."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _helpers import Classifier, make_vit, tensor_hash
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow.callbacks._common import event_log
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth

pytestmark = pytest.mark.slow  # 2-process DDP Trainer runs


def param_hash(module: torch.nn.Module) -> str:
    return tensor_hash(module, parameters_only=True)


class HashRecorder(Callback):
    """Writes, per rank, parameter hashes right after growth and at the end of training to ``out/rank{r}.json``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.records: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == trainer.num_training_batches:
            ddp = trainer.strategy.model
            self.records.append(
                {
                    "epoch": trainer.current_epoch,
                    "depth": len(pl_module.model.blocks),
                    "hash": param_hash(pl_module),
                    # DDP must hold every parameter of the grown module, else new ones are never synchronised.
                    "ddp_params": sum(1 for _ in ddp.parameters()) if isinstance(ddp, DistributedDataParallel) else -1,
                    "module_params": sum(1 for _ in pl_module.parameters()),
                    "optimizer_params": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups),
                }
            )

    def on_train_end(self, trainer, pl_module):
        final = {"hash": param_hash(pl_module), "events": [e.to_dict() for e in event_log(pl_module)]}
        for e in final["events"]:
            e["cost"].pop("seconds")  # wall time differs between ranks; everything else must not
        path = Path(self.out) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"records": self.records, "final": final}))


def test_growth_under_ddp_keeps_ranks_identical(tmp_path):
    torch.manual_seed(0)
    module = Classifier(make_vit(depth=2, embed_dim=16, num_heads=2), max_epochs=3)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g))
    growth = DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement="curvature")
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[growth, HashRecorder(str(tmp_path))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    # Each rank sees its own half of the data (distributed sampler), so ranks' curvature and gradients differ.
    trainer.fit(module, DataLoader(data, batch_size=8))

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["records"] == ranks[1]["records"]  # same depth, hashes and parameter counts after growth
    assert ranks[0]["final"] == ranks[1]["final"]  # same weights after further steps, same event log
    depths = [r["depth"] for r in ranks[0]["records"]]
    assert depths == [3, 4, 4]  # grew at the end of epochs 0 and 1 (not after the last epoch)
    for record in ranks[0]["records"]:
        assert record["ddp_params"] == record["module_params"] == record["optimizer_params"]
    assert len(ranks[0]["final"]["events"]) == 2
    # The parent process's module never saw the workers' growth: it must stay whole (not half-loaded).
    after = module.state_dict()
    assert after.keys() == initial.keys() and all(torch.equal(after[k], initial[k]) for k in initial)
