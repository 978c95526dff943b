"""CurvatureMonitor inside real ``Trainer.fit`` runs: schedule, logging, exactness, no side effects, bf16, DDP."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import quiet_trainer, tensor_hash
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.common import Classifier, make_vit
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.curvature import CurvatureEstimationError, LossFunctionError, estimate_curvature

BATCH = 16
NUM_SAMPLES = 64  # 4 training steps per epoch on one process, 2 per rank on two


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(NUM_SAMPLES, 1, 1, 40, generator=generator)
    y = torch.randint(0, 10, (NUM_SAMPLES,), generator=generator)
    return TensorDataset(x, y)


def _loader(shuffle: bool = False) -> DataLoader:
    # Without a generator, shuffling draws from the global torch RNG: any RNG use by the monitor would show.
    return DataLoader(_dataset(), batch_size=BATCH, shuffle=shuffle)


def _vit(drop_path_rate: float = 0.0) -> nn.Module:
    return make_vit(depth=2, embed_dim=16, num_heads=2, mlp_ratio=2.0, drop_path_rate=drop_path_rate)


def _classifier(max_epochs: int, **vit_kwargs) -> Classifier:
    torch.manual_seed(0)
    return Classifier(_vit(**vit_kwargs), max_epochs=max_epochs)


def _trainer(max_epochs: int, callbacks: list[Callback], **kwargs) -> pl.Trainer:
    defaults = dict(limit_val_batches=0, num_sanity_val_steps=0)
    return quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, **{**defaults, **kwargs})


def _ce_loss(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def _state_hash(module: nn.Module) -> str:
    return tensor_hash(module)


def test_estimates_on_schedule_are_logged_and_equal_a_direct_call(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(every_n_epochs=2, num_batches=2, num_probes=3, top_eigen=True, seed=7)
    doubled = CurvatureMonitor(
        every_n_epochs=2,
        num_batches=2,
        num_probes=3,
        seed=7,
        log=False,
        loss_fn=lambda module, batch: 2.0 * _ce_loss(module, batch),
    )
    module = _classifier(max_epochs=4)
    trainer = _trainer(4, [monitor, doubled], logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(module, _loader())

    assert [(h["epoch"], h["step"]) for h in monitor.history] == [(1, 8), (3, 16)]
    assert monitor.latest is not None and monitor.latest.valid
    blocks = list(monitor.latest.traces)
    assert {"model.blocks.0", "model.blocks.1"} <= set(blocks)

    # The last estimate ran on the final parameters and the last two batches of the last epoch, with the
    # probe seed `seed + len(history) * world_size + rank` = 7 + 1. A direct call with the plain
    # cross-entropy of the same batches must give the very same numbers: the monitor used training_step's loss.
    batches = list(_loader())[-2:]
    direct = estimate_curvature(module, _ce_loss, batches, num_probes=3, top_eigen=True, seed=8)
    for block in blocks:
        assert monitor.latest.traces[block].values == direct.traces[block].values
        # Same probes, loss doubled: the Hessian doubles.
        assert doubled.latest.traces[block].mean == pytest.approx(2 * direct.traces[block].mean, rel=1e-5)
    assert monitor.latest.top_eigenvalues == direct.top_eigenvalues
    assert doubled.latest.top_eigenvalues == {}

    # Logged through pl_module.log: in callback_metrics and, once per estimate, in the CSV logger's file.
    for block in blocks:
        logged = trainer.callback_metrics[f"curvature/trace/{block}"].item()
        assert logged == pytest.approx(monitor.latest.traces[block].mean, rel=1e-6)
        per_param = trainer.callback_metrics[f"curvature/trace_per_param/{block}"].item()
        assert per_param == pytest.approx(monitor.latest.trace_per_param[block], rel=1e-6)
        assert f"curvature/trace_stderr/{block}" in trainer.callback_metrics
    assert "curvature/top_eigenvalue/model" in trainer.callback_metrics
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("curvature/trace/model.blocks.0")]
    assert [int(r["epoch"]) for r in rows] == [1, 3]
    assert float(rows[-1]["curvature/trace/model.blocks.0"]) == pytest.approx(
        monitor.latest.traces["model.blocks.0"].mean, rel=1e-6
    )
    # The history is plain data, ready for JSON (the architecture logger reads it).
    json.dumps(monitor.history)


class _BatchNormClassifier(Classifier):
    """A ViT with drop-path (uses the RNG) followed by a BatchNorm (running-stat buffers)."""

    def __init__(self, max_epochs: int) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Sequential(_vit(drop_path_rate=0.2), nn.BatchNorm1d(10)), max_epochs=max_epochs)


def _snapshot(module: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()},
        "grad_ids": {n: id(p.grad) for n, p in module.named_parameters()},
        "modes": {n: m.training for n, m in module.named_modules()},
        "rng": torch.get_rng_state(),
    }


def _assert_same_snapshot(a: dict, b: dict, same_module: bool = True) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    for name, grad in a["grads"].items():
        other = b["grads"][name]
        assert (grad is None and other is None) or torch.equal(grad, other), name
    if same_module:  # the very same .grad tensors, not copies
        assert a["grad_ids"] == b["grad_ids"]
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])


class _EstimateMidEpoch(Callback):
    """Calls ``monitor.estimate_now`` after a training step and checks the module is untouched by it."""

    def __init__(self, monitor: CurvatureMonitor) -> None:
        self.monitor = monitor
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != 1:
            return
        before = _snapshot(pl_module)
        assert any(g is not None for g in before["grads"].values())  # grads of the step just taken are there
        estimate = self.monitor.estimate_now(trainer, pl_module)
        assert estimate.valid and self.monitor.latest is estimate
        _assert_same_snapshot(before, _snapshot(pl_module))
        self.calls += 1


def test_training_is_bitwise_unaffected_by_the_monitor() -> None:
    def run(with_monitor: bool) -> tuple[Classifier, list]:
        pl.seed_everything(0)
        module = _BatchNormClassifier(max_epochs=2)
        callbacks: list[Callback] = []
        if with_monitor:
            monitor = CurvatureMonitor(num_batches=2, num_probes=2)
            callbacks = [monitor, _EstimateMidEpoch(monitor)]
        _trainer(2, callbacks).fit(module, _loader(shuffle=True))
        return module, callbacks

    with_monitor, callbacks = run(True)
    without, _ = run(False)
    monitor, mid_epoch = callbacks
    assert mid_epoch.calls == 2
    # One estimate mid-epoch and one at the end of each epoch, in order.
    assert [(h["epoch"], h["step"]) for h in monitor.history] == [(0, 2), (0, 4), (1, 6), (1, 8)]
    # Parameters, BatchNorm buffers, gradients and the data order (global RNG) are all bitwise the same.
    _assert_same_snapshot(_snapshot(without), _snapshot(with_monitor), same_module=False)


class _RecordingClassifier(Classifier):
    """Records, for every training_step call, the hook it ran in, whether autocast was on, the logits dtype and
    whether ``self.log`` was the real (bound) method."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(_vit(), max_epochs=1)
        self.calls: list[tuple[str, bool, torch.dtype, bool]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        real_log = getattr(self.log, "__self__", None) is self
        self.calls.append((self._current_fx_name, torch.is_autocast_enabled("cpu"), logits.dtype, real_log))
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss


def test_bf16_mixed_training_estimates_in_fp32() -> None:
    module = _RecordingClassifier()
    monitor = CurvatureMonitor(num_batches=1, num_probes=2)
    trainer = _trainer(1, [monitor], precision="bf16-mixed")
    trainer.fit(module, _loader())

    training = [c for c in module.calls if c[0] == "training_step"]
    estimating = [c for c in module.calls if c[0] == "on_train_epoch_end"]
    assert training and all(c[1:] == (True, torch.bfloat16, True) for c in training)  # autocast really was on
    # fp32 without autocast, and self.log muted while the monitor ran training_step ...
    assert estimating and all(c[1:] == (False, torch.float32, False) for c in estimating)
    assert len(training) + len(estimating) == len(module.calls)
    assert "log" not in vars(module) and "log_dict" not in vars(module)  # ... and restored afterwards
    assert monitor.latest.valid
    assert all(math.isfinite(t.mean) and math.isfinite(t.stderr) for t in monitor.latest.traces.values())
    assert torch.isfinite(trainer.callback_metrics["curvature/trace/model.blocks.0"])


class _DumpPerRank(Callback):
    """Writes, on every rank, the monitor's record, this rank's own estimate and a hash of the final weights."""

    def __init__(self, directory: str, monitor: CurvatureMonitor) -> None:
        self.directory, self.monitor = directory, monitor
        self.last_batch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_batch = batch

    def on_fit_end(self, trainer, pl_module) -> None:
        # What this rank alone estimates on its last batch with the probe seed the monitor used for its last
        # estimate (seed + len(history before it) * world_size + rank).
        seed = self.monitor.seed + (len(self.monitor.history) - 1) * trainer.world_size + trainer.global_rank
        local = estimate_curvature(
            pl_module, _ce_loss, [self.last_batch], num_probes=self.monitor.num_probes, seed=seed
        )
        record = {
            "history": self.monitor.history,
            "latest": self.monitor.latest.to_dict(),
            "local": local.to_dict(),
            "global_step": trainer.global_step,
            "hash": _state_hash(pl_module),
        }
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_ranks_combine_their_estimates_and_stay_in_sync(tmp_path: Path) -> None:
    monitor = CurvatureMonitor(num_batches=1, num_probes=2)
    module = _classifier(max_epochs=2)
    trainer = _trainer(2, [monitor, _DumpPerRank(str(tmp_path), monitor)], devices=2, strategy="ddp_spawn")
    trainer.fit(module, _loader())

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Training went on after each estimate: 2 epochs of NUM_SAMPLES / (2 * BATCH) steps, one estimate each.
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert [(h["epoch"], h["step"]) for h in ranks[0]["history"]] == [(0, 2), (1, 4)]
    # Identical numbers on both ranks, and identical weights.
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    # Each rank estimated on its own data with its own probes; the result pools both ranks' probes.
    local0, local1, combined = ranks[0]["local"]["traces"], ranks[1]["local"]["traces"], ranks[0]["latest"]["traces"]
    assert local0 != local1
    for block, trace in combined.items():
        assert trace["num_probes"] == 4
        assert trace["mean"] == pytest.approx((local0[block]["mean"] + local1[block]["mean"]) / 2, rel=1e-9)


class _SkippingClassifier(Classifier):
    """training_step returns None (Lightning skips the step): not a loss the monitor can use."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(_vit(), max_epochs=1)

    def training_step(self, batch, batch_idx):
        return None


def test_training_step_without_a_loss_is_a_clear_error() -> None:
    trainer = _trainer(1, [CurvatureMonitor(num_probes=2)], limit_train_batches=1)
    with pytest.raises(LossFunctionError, match=r"training_step returned None.*loss_fn="):
        trainer.fit(_SkippingClassifier(), _loader())


def test_estimate_now_before_any_batch_is_a_clear_error() -> None:
    monitor = CurvatureMonitor(num_probes=2)
    with pytest.raises(RuntimeError, match="at least one captured training batch"):
        monitor.estimate_now(_trainer(1, [monitor]), _classifier(max_epochs=1))


def test_unknown_block_name_fails_at_setup() -> None:
    module = _classifier(max_epochs=1)
    trainer = _trainer(1, [CurvatureMonitor(num_probes=2, blocks=["model.blocks.7"])])
    with pytest.raises(ValueError, match=r"model\.blocks\.7"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"num_batches": 1.5}, "num_batches"),
        ({"num_probes": 1}, "num_probes"),
        ({"rtol": 0.0}, "rtol"),
        ({"rtol": "1e-2"}, "rtol"),
        ({"top_eigen": 1}, "top_eigen"),
        ({"blocks": "model.blocks.0"}, "blocks"),
        ({"backend": "func"}, "backend"),
        ({"strict": None}, "strict"),
        ({"log": "yes"}, "log"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CurvatureMonitor(**kwargs)


def test_loss_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="loss_fn"):
        CurvatureMonitor(loss_fn="cross_entropy")


def _nan_loss(module: nn.Module, batch) -> torch.Tensor:
    return _ce_loss(module, batch) * float("nan")


def test_non_finite_estimate_warns_and_training_continues() -> None:
    monitor = CurvatureMonitor(num_probes=2, loss_fn=_nan_loss)
    trainer = _trainer(2, [monitor], limit_train_batches=1)
    with pytest.warns(UserWarning, match="not finite"):
        trainer.fit(_classifier(max_epochs=2), _loader())
    assert trainer.global_step == 2
    assert [h["valid"] for h in monitor.history] == [False, False]
    assert not monitor.latest.valid and monitor.latest.invalid_reason
    assert "curvature/trace/model.blocks.0" in trainer.callback_metrics  # logged as NaN, not dropped


def test_non_finite_estimate_raises_when_strict() -> None:
    trainer = _trainer(2, [CurvatureMonitor(num_probes=2, loss_fn=_nan_loss, strict=True)], limit_train_batches=1)
    with pytest.raises(CurvatureEstimationError, match=r"not finite.*strict=False"):
        trainer.fit(_classifier(max_epochs=2), _loader())
    assert trainer.global_step == 1


def test_resumed_run_keeps_the_history_and_continues_like_an_uninterrupted_one(tmp_path: Path) -> None:
    def fit(callbacks: list[Callback], ckpt_path: str | None = None) -> CurvatureMonitor:
        monitor = CurvatureMonitor(num_probes=2)
        trainer = _trainer(3, [monitor, *callbacks], enable_checkpointing=bool(callbacks))
        trainer.fit(_classifier(max_epochs=3), _loader(), ckpt_path=ckpt_path)
        return monitor

    # ModelCheckpoint runs after the monitor in on_train_epoch_end, so a checkpoint holds that epoch's estimate.
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    uninterrupted = fit([checkpoints])
    resumed = fit([], ckpt_path=str(tmp_path / "epoch=1.ckpt"))

    assert resumed.history[:2] == uninterrupted.history[:2]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    # Same parameters, same batch and same probe seed (it counts the restored history): same numbers.
    assert resumed.history[2]["traces"] == uninterrupted.history[2]["traces"]
    # A restored monitor exposes the checkpoint's last estimate as ``latest`` for DepthGrowth to read.
    restored = CurvatureMonitor(num_probes=2)
    assert restored.latest is None
    restored.load_state_dict(uninterrupted.state_dict())
    assert restored.latest is not None and restored.latest.to_dict() == uninterrupted.latest.to_dict()
