"""The two DMS pipelines of docs/dms_recipes.md, run as written inside real Lightning fits."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from _helpers import quiet_trainer

from examples.common import Classifier, MNIST1DDataModule, make_vit
from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import build_architecture, export_architecture, find_gates
from lightning_depthgrow.measure import count_flops

SUPERNET = {"depth": 4, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2.0}
EXAMPLE = torch.zeros(2, 1, 1, 40)


class StopAfterExport(pl.Callback):
    """Pipeline (a): end the search run as soon as DMS has exported (list it after the DMS callback)."""

    def __init__(self, search_epochs: int) -> None:
        self.search_epochs = search_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.search_epochs:
            trainer.should_stop = True


@pytest.mark.slow
def test_pipeline_a_search_export_rebuild_and_train_from_scratch(tmp_path):
    search_epochs, target = 2, 0.5
    torch.manual_seed(0)
    searched = Classifier(make_vit(**SUPERNET), max_epochs=search_epochs + 1)
    full = count_flops(searched.model, EXAMPLE).total
    dms = DifferentiableModelScaling(target=target, search_epochs=search_epochs)
    trainer = quiet_trainer(
        max_epochs=search_epochs + 1,
        limit_train_batches=6,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[dms, StopAfterExport(search_epochs)],
    )
    trainer.fit(searched, MNIST1DDataModule(batch_size=64))
    assert trainer.global_step == search_epochs * 6  # no step after the export
    arch = export_architecture(searched, event_log(searched))
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(arch))  # what a user keeps

    torch.manual_seed(1)
    network = make_vit(**SUPERNET)  # a fresh supernet ...
    build_architecture(network, json.loads(path.read_text()))  # ... cut to the found architecture
    assert find_gates(network) is None
    found = count_flops(network, EXAMPLE).total
    assert found == count_flops(searched.model, EXAMPLE).total
    assert abs(found / (target * full) - 1) <= 0.05
    scratch = Classifier(network, max_epochs=1)
    quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0).fit(
        scratch, MNIST1DDataModule(batch_size=64)
    )
    assert count_flops(scratch.model, EXAMPLE).total == found  # trains as an ordinary model


@pytest.mark.slow
def test_pipeline_b_search_while_training_lands_on_target():
    torch.manual_seed(0)
    model = Classifier(make_vit(**SUPERNET), max_epochs=3)
    full = count_flops(model.model, EXAMPLE).total
    dms = DifferentiableModelScaling(target=0.4, search_epochs=2)
    quiet_trainer(
        max_epochs=3, limit_train_batches=6, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[dms]
    ).fit(model, MNIST1DDataModule(batch_size=64))
    assert find_gates(model) is None
    assert abs(count_flops(model.model, EXAMPLE).total / (0.4 * full) - 1) <= 0.05
