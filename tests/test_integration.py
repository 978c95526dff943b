"""Integration tests: combinations a demanding user would run, each through a real ``Trainer.fit``.

timm ResNet / ConvNeXt growth with function preservation, bitwise resume and ``load_grown``; a user-registered
GPT block under ``bf16-mixed``; DMS export under ``bf16-mixed`` then ``load_grown``; every callback together with
resume; unusual optimizer configurations; and ``validate`` / ``test`` / ``predict`` from a grown checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from _helpers import Classifier, TinyGPT, make_vit, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow.adapters.registry import find_block_stacks
from lightning_depthgrow.callbacks._common import event_log, load_checkpoint_events
from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.callbacks.neuron_growth import NeuronGrowth
from lightning_depthgrow.loading import load_grown

pytestmark = pytest.mark.slow  # multi-epoch Trainer runs

EPOCHS = 3  # growth at the end of epochs 0 and 1 (warmup 1); epoch 2 trains the grown model


def total_depth(module: nn.Module) -> int:
    return sum(len(s) for s in find_block_stacks(module))


class ImageModule(pl.LightningModule):
    """A classifier around a timm CNN; ``optim`` picks what ``configure_optimizers`` returns."""

    def __init__(self, model: nn.Module, size: int, optim: str = "scheduled", lr: float = 1e-2) -> None:
        super().__init__()
        self.model, self.optim, self.lr = model, optim, lr
        self.example_input_array = torch.zeros(2, 3, size, size)
        if optim == "two":
            self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            return self.loss(batch)
        # Manual optimization: a body optimizer and a head optimizer, both stepped each batch.
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(self.loss(batch))
        for opt in optimizers:
            opt.step()
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        if self.optim == "bare":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.optim == "two":
            head = [p for n, p in self.named_parameters() if n.startswith("model.fc.")]
            body = [p for n, p in self.named_parameters() if not n.startswith("model.fc.")]
            return torch.optim.SGD(body, lr=self.lr, momentum=0.9), torch.optim.Adam(head, lr=self.lr)
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_resnet(seed: int = 0, optim: str = "scheduled") -> ImageModule:
    torch.manual_seed(seed)
    return ImageModule(timm.create_model("resnet10t", pretrained=False, num_classes=10), 16, optim)


def make_convnext(seed: int = 0, optim: str = "scheduled") -> ImageModule:
    torch.manual_seed(seed)
    # 32 px: the stem (stride 4) and three stride-2 downsamplings leave 1x1 in the last stage.
    return ImageModule(timm.create_model("convnext_atto", pretrained=False, num_classes=10), 32, optim)


MAKERS = {"resnet10t": make_resnet, "convnext_atto": make_convnext}


def image_loader(size: int, n: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)  # fixed order: resume sees the same batches


class LogitProbe(Callback):
    """Eval-mode logits on a fixed input after every training batch; put one before and one after the grower."""

    def __init__(self, probe: torch.Tensor) -> None:
        self.probe = probe
        self.records: list[tuple[int, int, torch.Tensor]] = []  # (global_step, depth, logits)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            logits = pl_module(self.probe).float()
        pl_module.train(was_training)
        self.records.append((trainer.global_step, total_depth(pl_module), logits))


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def growth() -> DepthGrowth:
    return DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement="curvature", seed=3)


def monitor() -> CurvatureMonitor:
    return CurvatureMonitor(num_probes=2, log=False, seed=5)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


# --------------------------------------------------------------------------- 1. timm ResNet / ConvNeXt


@pytest.mark.parametrize("arch", list(MAKERS))
def test_timm_cnn_growth_preserves_function_resumes_and_loads(arch: str, tmp_path: Path) -> None:
    make = MAKERS[arch]
    module = make()
    size = module.example_input_array.shape[-1]
    loader = image_loader(size)
    probe_input = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    before, after = LogitProbe(probe_input), LogitProbe(probe_input)
    start_depth = total_depth(module)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        callbacks=[monitor(), before, growth(), after, ckpt],
        enable_checkpointing=True,
        deterministic=True,
    )
    trainer.fit(module, loader)

    assert total_depth(module) == start_depth + 2
    grown_steps = [i for i, (b, a) in enumerate(zip(before.records, after.records)) if a[1] > b[1]]
    assert len(grown_steps) == 2
    for i in grown_steps:
        # The same weights before and after the insertion: the logits must not move (eval mode, fixed input).
        torch.testing.assert_close(after.records[i][2], before.records[i][2], rtol=0, atol=1e-6)
    # The grown model keeps training: the last epoch changed its logits.
    assert not torch.equal(after.records[-1][2], after.records[grown_steps[-1]][2])

    resumed = make(seed=123)  # fresh weights: everything must come from the checkpoint
    trainer2 = quiet_trainer(
        max_epochs=EPOCHS,
        callbacks=[monitor(), growth(), ModelCheckpoint(tmp_path / "r")],
        enable_checkpointing=True,
        deterministic=True,
    )
    trainer2.fit(resumed, loader, ckpt_path=str(tmp_path / "full" / "epoch=0.ckpt"))
    assert [e.spec for e in event_log(resumed)] == [e.spec for e in event_log(module)]
    assert_same_state(module, resumed)

    loaded = load_grown(make(seed=321).model, tmp_path / "full" / f"epoch={EPOCHS - 1}.ckpt").eval()
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(probe_input), module(probe_input))


# --------------------------------------------------------------------------- 2. GPT block under bf16-mixed


class GPTModule(pl.LightningModule):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.model = TinyGPT(vocab_size=16, context=8, dim=16, depth=depth, num_heads=2)
        self.example_input_array = torch.zeros(2, 7, dtype=torch.long)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def gpt_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 16, (16, 4), generator=g)
    return DataLoader(TensorDataset(torch.cat([half, half], dim=1)), batch_size=4)


def test_gpt_block_grows_under_bf16_mixed() -> None:
    torch.manual_seed(0)
    module = GPTModule()
    losses = LossRecorder()
    trainer = quiet_trainer(max_epochs=EPOCHS, precision="bf16-mixed", callbacks=[monitor(), growth(), losses])
    trainer.fit(module, gpt_loader())

    assert len(module.model.blocks) == 4
    assert len(losses.losses) == EPOCHS * 4 and all(math.isfinite(v) for v in losses.losses)
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in held for p in module.parameters())
    assert len(held) == len(list(module.parameters()))
    # Every parameter, the grown blocks' included, has been stepped by the optimizer after growth.
    state = trainer.optimizers[0].state
    # Original parameters took all 12 steps, those of the blocks grown after epochs 0 and 1 took 8 and 4.
    assert sorted({int(state[p]["step"]) for p in module.parameters()}) == [4, 8, 12]


# --------------------------------------------------------------------------- 3. DMS export under bf16-mixed


def test_dms_export_bf16_then_load_grown(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Classifier(make_vit(depth=2, embed_dim=16, num_heads=2), max_epochs=EPOCHS)
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(
        TensorDataset(torch.randn(32, 1, 1, 40, generator=g), torch.randint(0, 10, (32,), generator=g)), batch_size=8
    )
    dms = DifferentiableModelScaling(target=0.6, search_epochs=2, arch_lr=0.05)
    trainer = quiet_trainer(max_epochs=EPOCHS, precision="bf16-mixed", callbacks=[dms])
    trainer.fit(module, loader)
    assert [e.kind for e in event_log(module)][-1] == "dms_export"
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)

    x = torch.randn(5, 1, 1, 40, generator=g)
    module.eval()
    with torch.no_grad():
        expected = module(x)
    torch.manual_seed(99)
    fresh = Classifier(make_vit(depth=2, embed_dim=16, num_heads=2), max_epochs=EPOCHS)
    load_grown(fresh, path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    assert sum(p.numel() for p in fresh.parameters()) < sum(
        p.numel() for p in make_vit(depth=2, embed_dim=16, num_heads=2).parameters()
    )


# --------------------------------------------------------------------------- 4. every callback together, resume


def fit_all_callbacks(module: ImageModule, root: Path, ckpt_path: str | None = None) -> pl.Trainer:
    trainer = quiet_trainer(
        max_epochs=EPOCHS,
        callbacks=[monitor(), growth(), ArchitectureLogger(), ModelCheckpoint(root / "ckpt", "{epoch}", save_top_k=-1)],
        logger=CSVLogger(root / "logs", name="run", version=0),
        enable_checkpointing=True,
        deterministic=True,
    )
    trainer.fit(module, image_loader(16), ckpt_path=ckpt_path)
    return trainer


def history_events(trainer: pl.Trainer) -> list[dict[str, Any]]:
    data = json.loads((Path(trainer.log_dir) / "architecture_history.json").read_text())
    for event in data["events"]:
        event.get("cost", {}).pop("seconds", None)  # wall-clock time of the surgery: differs between runs
    return data["events"]


def test_all_callbacks_resume_bitwise_with_identical_history(tmp_path: Path) -> None:
    full = make_resnet()
    full_trainer = fit_all_callbacks(full, tmp_path / "full")
    assert len(event_log(full)) == 2

    resumed = make_resnet(seed=123)
    resumed_trainer = fit_all_callbacks(resumed, tmp_path / "resumed", str(tmp_path / "full" / "ckpt" / "epoch=0.ckpt"))
    assert_same_state(full, resumed)
    full_events, resumed_events = history_events(full_trainer), history_events(resumed_trainer)
    assert len(full_events) == 2
    assert resumed_events == full_events


# --------------------------------------------------------------------------- 5. optimizer configurations


@pytest.mark.parametrize("optim", ["bare", "two"])
def test_growth_with_bare_or_two_optimizers(optim: str) -> None:
    module = make_resnet(optim=optim)
    start = {id(p) for p in module.parameters()}
    # Manual optimization: the monitor cannot use training_step (it steps the optimizers), so give the loss.
    mon = CurvatureMonitor(num_probes=2, log=False, loss_fn=lambda m, batch: m.loss(batch))
    options = {"accumulate_grad_batches": 2, "gradient_clip_val": 1.0} if optim == "bare" else {}
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[mon, growth()], **options)
    trainer.fit(module, image_loader(16, n=16))  # 4 batches per epoch: 2 optimizer steps with accumulation

    assert len(event_log(module)) == 2
    new = [p for p in module.parameters() if id(p) not in start]
    assert new
    held = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers]
    # Each new parameter sits in exactly one optimizer: the one that holds its template (the body optimizer).
    assert all(sum(id(p) in h for h in held) == 1 and id(p) in held[0] for p in new)
    assert all(p in trainer.optimizers[0].state for p in new)  # trained after growth
    assert trainer.global_step == (EPOCHS * 2 if optim == "bare" else EPOCHS * 4 * 2)


# --------------------------------------------------------------------------- 6. evaluate a grown checkpoint


@pytest.fixture(scope="module")
def grown_checkpoint(tmp_path_factory) -> tuple[ImageModule, str]:
    root = tmp_path_factory.mktemp("grown")
    module = make_resnet()
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[monitor(), growth()])
    trainer.fit(module, image_loader(16))
    path = str(root / "grown.ckpt")
    trainer.save_checkpoint(path)
    assert len(load_checkpoint_events(path)) == 2
    return module.eval(), path


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
@pytest.mark.parametrize("callbacks", ["growth", "growth+monitor", "dms"])
def test_evaluate_fresh_module_from_grown_checkpoint(grown_checkpoint, stage: str, callbacks: str) -> None:
    grown, path = grown_checkpoint
    fresh = make_resnet(seed=55)
    if callbacks == "dms":
        # Any of the library's callbacks replays the log (its own events are none of DMS's business).
        cbs: list[Callback] = [DifferentiableModelScaling(target=0.5, search_epochs=1)]
    else:
        cbs = [growth()] + ([monitor()] if callbacks == "growth+monitor" else [])
    trainer = quiet_trainer(callbacks=cbs)
    loader = image_loader(16)
    result = getattr(trainer, stage)(fresh, loader, ckpt_path=path)

    assert total_depth(fresh) == total_depth(grown)
    assert_same_state(grown, fresh)
    x = next(iter(loader))[0]
    with torch.no_grad():
        expected = grown(x)
    if stage == "predict":
        assert torch.equal(result[0], expected)
    else:
        key = f"{'val' if stage == 'validate' else 'test'}_loss"
        assert result[0][key] == pytest.approx(
            float(sum(F.cross_entropy(grown(b[0]), b[1]) for b in loader) / len(loader)), rel=1e-6
        )


def test_evaluate_grown_module_on_an_earlier_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    # trainer.test(ckpt_path="best") after fit, where the best checkpoint predates the last growth.
    module = make_resnet()
    ckpt = ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1)
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[monitor(), growth(), ckpt], enable_checkpointing=True)
    trainer.fit(module, image_loader(16))
    earlier = str(tmp_path / "epoch=0.ckpt")
    depth = total_depth(module)
    with pytest.raises(RuntimeError, match=r"carries 2 architecture event\(s\).*\(1 event\(s\)\).*fresh_model"):
        trainer.test(dataloaders=image_loader(16), ckpt_path=earlier)
    assert total_depth(module) == depth and len(event_log(module)) == 2  # left as it was

    fresh = make_resnet(seed=9)
    trainer.test(fresh, image_loader(16), ckpt_path=earlier)  # what the message advises
    assert [e.spec for e in event_log(fresh)] == [e.spec for e in event_log(module)[:1]]
    state = torch.load(earlier, weights_only=False)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_validate_fresh_module_from_neuron_grown_checkpoint(tmp_path: Path) -> None:
    def make(seed: int) -> Classifier:
        torch.manual_seed(seed)
        return Classifier(make_vit(depth=1, embed_dim=8, num_heads=2), max_epochs=EPOCHS)

    def neuron_growth() -> NeuronGrowth:
        return NeuronGrowth(step_budget=30, budget_mode="absolute", scale_by_lr=False, warmup_epochs=1)

    g = torch.Generator().manual_seed(1)
    loader = DataLoader(
        TensorDataset(torch.randn(32, 1, 1, 40, generator=g), torch.randint(0, 10, (32,), generator=g)), batch_size=16
    )
    grown = make(0)
    trainer = quiet_trainer(max_epochs=EPOCHS, callbacks=[neuron_growth()])
    trainer.fit(grown, loader)
    path = str(tmp_path / "neurons.ckpt")
    trainer.save_checkpoint(path)
    assert event_log(grown)

    fresh = make(77)
    quiet_trainer(callbacks=[neuron_growth()]).validate(fresh, loader, ckpt_path=path)
    assert_same_state(grown, fresh)
