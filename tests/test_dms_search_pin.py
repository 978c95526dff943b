"""A DMS search inside ``Trainer.fit`` computes what it computed before the per-step work was made cheaper.

Each case runs a short seeded search (real Trainer, real timm models, the callback's own hooks) and records,
after every training batch, the loss, every gate's ratio and importances, and at the end the export's kept
elements and the exported model's logits on a fixed input. ``tests/data/dms_search_pin.json`` holds the same
records from the search as it was before (commit 426d760's tree); the two must agree to float tolerance, so a
faster hot path (batched masks, cached ranks, the fused architecture step) cannot change what the search finds.

Regenerate the records only for a change that is *meant* to alter the search:
``PYTHONPATH=$PWD python tests/test_dms_search_pin.py --write``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _helpers import Classifier, ImageClassifier, make_vit, quiet_trainer
from timm.models.resnet import BasicBlock, ResNet
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import find_gates

PIN = Path(__file__).resolve().parent / "data" / "dms_search_pin.json"
CASES = ("vit", "vit_accumulate_2", "resnet")


class Recorder(pl.Callback):
    """Loss, ratios and importances of every gate after every training batch (while the gates are on)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        gates = find_gates(pl_module)
        if gates is None:
            return
        self.steps.append(
            {
                "loss": float(outputs["loss"]),
                "ratios": [float(g.ratio) for g in gates.gate_list()],
                "importance": torch.cat([g.importance for g in gates.gate_list()]).tolist(),
            }
        )


def _data(shape: tuple[int, ...], n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def run_case(case: str) -> dict[str, Any]:
    """One seeded search (two epochs, export at the start of the third) and what it recorded."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    accumulate = 2 if case == "vit_accumulate_2" else 1
    if case.startswith("vit"):
        module: pl.LightningModule = Classifier(make_vit(depth=3, embed_dim=16, num_heads=2), max_epochs=3)
        shape: tuple[int, ...] = (1, 1, 40)
    else:
        net = ResNet(BasicBlock, [1, 2, 1, 1], channels=(8, 16, 16, 16), stem_width=8, num_classes=10)
        module, shape = ImageClassifier(net), (3, 16, 16)  # its stem and head: at least 0.85 of the FLOPs stay
    recorder = Recorder()
    target = 0.5 if case.startswith("vit") else 0.9
    dms = DifferentiableModelScaling(target=target, search_epochs=2, arch_lr=0.05, schedule_fraction=0.5)
    trainer = quiet_trainer(max_epochs=3, callbacks=[dms, recorder], accumulate_grad_batches=accumulate)
    trainer.fit(module, _data(shape, 96, seed=1))
    export = next(e for e in event_log(module) if e.kind == "dms_export")
    probe = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    module.eval()
    with torch.no_grad():
        logits = module(probe)
    return {"steps": recorder.steps, "keep": export.spec["keep"], "logits": logits.flatten().tolist()}


@pytest.mark.parametrize("case", CASES)
def test_search_records_match_the_pinned_search(case):
    expected = json.loads(PIN.read_text())[case]
    got = run_case(case)
    assert len(got["steps"]) == len(expected["steps"])
    for i, (g, e) in enumerate(zip(got["steps"], expected["steps"])):
        for key in ("loss", "ratios", "importance"):
            torch.testing.assert_close(
                torch.tensor(g[key], dtype=torch.float64),
                torch.tensor(e[key], dtype=torch.float64),
                rtol=1e-4,
                atol=1e-7,
                msg=lambda m, i=i, key=key: f"{case}, batch {i}, {key}: {m}",
            )
    assert got["keep"] == expected["keep"]
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected["logits"]), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: PYTHONPATH=$PWD python tests/test_dms_search_pin.py --write  (rewrites the pinned records)")
    PIN.parent.mkdir(exist_ok=True)
    PIN.write_text(json.dumps({case: run_case(case) for case in CASES}))
    print(f"wrote {PIN}")
