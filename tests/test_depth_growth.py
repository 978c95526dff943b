"""DepthGrowth inside real ``Trainer.fit`` runs: schedule, budget, placement, function preservation, optimizer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _helpers import Classifier, make_vit, quiet_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import UnsupportedModelError
from lightning_depthgrow.callbacks._common import event_log
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
from lightning_depthgrow.measure import count_flops, count_parameters, first_sample


def tiny_module(depth: int = 2, max_epochs: int = 4, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(make_vit(depth=depth, embed_dim=16, num_heads=2), lr=3e-3, max_epochs=max_epochs)


def loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(max_epochs: int, callbacks: list[Callback], **kwargs) -> pl.Trainer:
    return quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)


def block_params(module: Classifier) -> int:
    return count_parameters(module.model.blocks[0])


class EpochRecorder(Callback):
    """Depth and size at every epoch end."""

    def __init__(self) -> None:
        self.depths: list[int] = []
        self.params: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.depths.append(len(pl_module.model.blocks))
        self.params.append(count_parameters(pl_module))


class LogitProbe(Callback):
    """Logits on a fixed input (eval mode) after the last batch of every epoch, at this callback's position."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.records: list[tuple[int, int, torch.Tensor]] = []  # (epoch, depth, logits)
        self.param_ids: list[set[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 < trainer.num_training_batches:
            return
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(self.x).clone()
        for m, training in modes.items():
            m.training = training
        self.records.append((trainer.current_epoch, len(pl_module.model.blocks), logits))
        self.param_ids.append({id(p) for p in pl_module.parameters()})


@pytest.mark.slow
def test_schedule_depth_and_budget_never_exceeded():
    module = tiny_module(max_epochs=7)
    start, per_block = count_parameters(module), block_params(module)
    # Room for two blocks and a half: the third growth step must be refused.
    budget = (start + 2.5 * per_block) / start
    growth = DepthGrowth.paper(final_budget=budget, warmup_epochs=2, grow_every=2, placement="last")
    recorder = EpochRecorder()
    trainer(7, [growth, recorder]).fit(module, loader())

    # Growth at the end of epochs 1 and 3 (warm-up 2, every 2); epoch 5 had no room left.
    assert recorder.depths == [2, 3, 3, 4, 4, 4, 4]
    assert max(recorder.params) <= budget * start
    assert [e.epoch for e in event_log(module)] == [1, 3]
    assert [e.spec["index"] for e in event_log(module)] == [1, 2]  # "last" appends
    last = event_log(module)[-1]
    assert last.reason["budget_after"] == count_parameters(module)
    assert math.isclose(last.reason["budget_left"], budget * start - count_parameters(module))
    assert last.cost["params"] == per_block and last.cost["seconds"] > 0


@pytest.mark.slow
def test_flop_budget_with_lr_scaled_step_budget():
    module = tiny_module(max_epochs=4)
    example = first_sample(module.example_input_array)  # budgets and event costs count FLOPs per sample
    start = count_flops(module, example).total
    growth = DepthGrowth.paper(
        final_budget=2.5,
        budget_metric="flops",
        warmup_epochs=1,
        blocks_per_step=None,
        step_budget=0.7,  # 0.7 starting models per step, times lr / initial lr
        scale_by_lr=True,
        placement="uniform",
        max_per_stack=None,
    )
    trainer(4, [growth]).fit(module, loader())
    events = event_log(module)
    # A ViT block is ~half the FLOPs here. After epoch 0 (lr scale ~0.85) one block fits the step limit; after
    # epoch 1 (scale 0.5) none does, although the final budget would still allow one.
    assert [e.epoch for e in events] == [0]
    (event,) = events
    assert 0.5 < event.reason["lr_scale"] < 1
    assert event.reason["step_limit"] == pytest.approx(0.7 * start * event.reason["lr_scale"])
    assert event.cost["flops"] <= event.reason["step_limit"]
    assert count_flops(module, example).total == start + event.cost["flops"] <= 2.5 * start
    assert event.cost["flops"] + count_flops(module, example).total <= 2.5 * start


@pytest.mark.slow
def test_placement_modes_differ():
    indices = {}
    for placement in ("last", "uniform", "curvature"):
        module = tiny_module(max_epochs=4)
        # every_n_epochs beyond the run: the monitor's only estimates are the ones DepthGrowth asks for.
        monitor = CurvatureMonitor(every_n_epochs=100, num_batches=2, num_probes=4, log=False)
        growth = DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement=placement, curvature_monitor=monitor)
        trainer(4, [monitor, growth]).fit(module, loader())
        events = event_log(module)
        indices[placement] = [e.spec["index"] for e in events]
        if placement == "curvature":
            for e in events:
                # The chosen block has the highest trace per parameter; runners-up are lower.
                assert all(r["score"] <= e.reason["score"] for r in e.reason["runners_up"])
            # The reason's numbers are the monitor's estimate at that moment.
            assert len(monitor.history) == len(events)
            chosen = events[-1].reason
            assert monitor.latest.trace_per_param[chosen["block"]] == pytest.approx(chosen["score"])
            # Highest among the stack's blocks (the monitor also reports non-block groups such as the stem).
            in_stack = {k: v for k, v in monitor.latest.trace_per_param.items() if k.startswith("model.blocks.")}
            assert chosen["block"] == max(in_stack, key=in_stack.get)
    assert indices["last"] == [1, 2, 3]
    assert indices["uniform"] == [0, 2, 1]  # [b0, n, b1] -> [b0, n, b1, n] -> [b0, n, n, b1, n]
    assert len(indices["curvature"]) == 3


@pytest.mark.slow
def test_no_curvature_estimate_once_the_budget_is_used():
    module = tiny_module(max_epochs=4)
    start, per_block = count_parameters(module), block_params(module)
    monitor = CurvatureMonitor(every_n_epochs=100, num_batches=1, num_probes=2, log=False)
    # Room for one block: growth epochs 0, 1 and 2, but only the first one can add anything.
    growth = DepthGrowth.paper(
        final_budget=(start + 1.5 * per_block) / start,
        warmup_epochs=1,
        curvature_monitor=monitor,
        placement="curvature",
    )
    trainer(4, [monitor, growth]).fit(module, loader())
    assert [e.epoch for e in event_log(module)] == [0]
    # The later growth epochs skip the estimate (several training steps' worth of compute each).
    assert len(monitor.history) == 1


@pytest.mark.slow
def test_growth_preserves_function_inside_trainer():
    x = torch.randn(5, 1, 1, 40)
    before, after = LogitProbe(x), LogitProbe(x)
    module = tiny_module(max_epochs=3)
    growth = DepthGrowth.paper(
        final_budget=3.0, warmup_epochs=1, blocks_per_step=2, max_per_stack=2, placement="uniform"
    )
    trainer(3, [before, growth, after]).fit(module, loader())
    grown = 0
    for (e0, d0, y0), (e1, d1, y1) in zip(before.records, after.records):
        assert e0 == e1
        if d1 > d0:
            grown += 1
            assert d1 == d0 + 2
            assert (y1 - y0).abs().max().item() <= 1e-6
    assert grown == 2


@pytest.mark.slow
def test_new_parameters_join_twin_groups_follow_schedule_and_train():
    x = torch.randn(2, 1, 1, 40)
    before, after = LogitProbe(x), LogitProbe(x)
    module = tiny_module(max_epochs=3)
    growth = DepthGrowth.paper(final_budget=2.0, warmup_epochs=1, placement="last")
    snapshots: dict[int, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx + 1 == trainer.num_training_batches:
                new = [p for p in pl_module.parameters() if id(p) not in before.param_ids[0]]
                snapshots.update({id(p): p.detach().clone() for p in new})

    trainer(3, [before, growth, after, Snapshot()]).fit(module, loader())
    new_block = module.model.blocks[2]
    twin_block = module.model.blocks[1]
    optimizer = module.trainer.optimizers[0]
    scheduler = module.trainer.lr_scheduler_configs[0].scheduler
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    assert len(snapshots) == len(list(new_block.parameters())) > 0
    for (name, p), (_, twin) in zip(new_block.named_parameters(), twin_block.named_parameters()):
        assert group_of[id(p)] == group_of[id(twin)], name
        expected_group = 1 if p.ndim <= 1 else 0  # decay / no-decay split of Classifier.configure_optimizers
        assert group_of[id(p)] == expected_group, name
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"
        assert not torch.equal(p.detach(), snapshots[id(p)]), f"{name} did not change"
        assert optimizer.state[p]["step"].item() == module.trainer.global_step - 4  # grown after 4 of 12 steps
    # The per-step cosine schedule still drives every group (it ran for every step, including after growth).
    assert scheduler.last_epoch == module.trainer.global_step
    lam = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        assert group["lr"] == pytest.approx(base * lam)


@pytest.mark.slow
def test_gradient_accumulation_and_clipping_keep_working():
    module = tiny_module(max_epochs=3)
    growth = DepthGrowth.paper(final_budget=2.0, warmup_epochs=1, placement="uniform")
    t = trainer(3, [growth], accumulate_grad_batches=3, gradient_clip_val=0.5)
    t.fit(module, loader(n=80))  # 5 batches: the epoch's last optimizer step flushes a partial window
    assert len(module.model.blocks) == 4
    assert t.global_step == 3 * 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"placement": "random"}, ValueError, "`placement`"),
        ({"budget_metric": "memory"}, ValueError, "`budget_metric`"),
        ({"budget_mode": "percent"}, ValueError, "`budget_mode`"),
        ({"final_budget": 0.5}, ValueError, "smaller than the starting model"),
        ({"final_budget": "2"}, TypeError, "`final_budget`"),
        ({"final_budget": float("nan")}, ValueError, "`final_budget`"),
        ({"grow_every": 0}, ValueError, "`grow_every`"),
        ({"blocks_per_step": None}, ValueError, "blocks_per_step, step_budget"),
        ({"blocks_per_step": 1.5}, TypeError, "`blocks_per_step`"),
        ({"scale_by_lr": True}, ValueError, "step_budget"),
        ({"scale_by_lr": "yes", "step_budget": 0.1}, TypeError, "`scale_by_lr`"),
        ({"step_budget": float("nan")}, ValueError, "`step_budget`"),
        ({"max_per_stack": 0}, ValueError, "`max_per_stack`"),
        ({"warmup_epochs": -1}, ValueError, "`warmup_epochs`"),
        ({"warmup_epochs": True}, TypeError, "`warmup_epochs`"),
        ({"seed": "0"}, TypeError, "`seed`"),
        ({"curvature_monitor": "val_loss"}, TypeError, "`curvature_monitor`"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    # One style: TypeError for a wrong type, ValueError for a wrong value, the message names the argument.
    with pytest.raises(error, match=match):
        DepthGrowth.paper(**kwargs)


def test_monitor_is_renamed_curvature_monitor_with_a_deprecation_warning():
    monitor = CurvatureMonitor(log=False)
    with pytest.warns(DeprecationWarning, match="curvature_monitor"):
        growth = DepthGrowth(monitor=monitor, operator="zero_init")
    assert growth.curvature_monitor is monitor
    assert DepthGrowth.paper(curvature_monitor=monitor).curvature_monitor is monitor
    with pytest.raises(ValueError, match="once"), pytest.warns(DeprecationWarning):
        DepthGrowth(monitor=monitor, curvature_monitor=CurvatureMonitor(), operator="zero_init")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_untouched(module: nn.Module, state: dict[str, torch.Tensor], t: pl.Trainer) -> None:
    assert list(module.state_dict()) == list(state)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert t.global_step == 0 and not t.optimizers
    assert event_log(module) == []


def test_model_without_growable_stack_fails_before_training():
    torch.manual_seed(0)
    module = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10)))
    state, t = _state(module), trainer(2, [DepthGrowth.paper()])
    with pytest.raises(UnsupportedModelError, match="register_block") as err:
        t.fit(module, loader())
    assert "Containers found" in str(err.value) and "Linear" in str(err.value)
    _assert_untouched(module, state, t)


def test_budget_below_current_size_fails_before_training():
    module = tiny_module()
    state, t = _state(module), trainer(2, [DepthGrowth.paper(final_budget=1000, budget_mode="absolute")])
    with pytest.raises(ValueError, match="below the model's current"):
        t.fit(module, loader())
    _assert_untouched(module, state, t)


def test_compiled_model_is_rejected_before_training():
    module = tiny_module()
    module.model = torch.compile(module.model)
    state, t = _state(module), trainer(2, [DepthGrowth.paper()])
    with pytest.raises(RuntimeError, match=r"torch\.compile"):
        t.fit(module, loader())
    _assert_untouched(module, state, t)


def test_sharded_strategy_is_rejected():
    # FSDP needs a GPU to be constructed; ModelParallelStrategy (FSDP2/TP) builds on CPU and is just as sharded.
    module = tiny_module()
    t = pl.Trainer(strategy=ModelParallelStrategy(), accelerator="cpu", devices=1, logger=False)
    state = _state(module)
    with pytest.raises(RuntimeError, match="ModelParallelStrategy"):
        DepthGrowth.paper().setup(t, module, "fit")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


class RandomSignals(pl.LightningDataModule):
    """Random ``[1, 1, 40]`` signals under the example datamodule's arguments (so its YAML config applies)."""

    def __init__(self, batch_size: int = 16, seed: int = 0, limit_train: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.seed, self.limit_train = batch_size, seed, limit_train

    def train_dataloader(self) -> DataLoader:
        return loader(n=self.limit_train or 64, batch_size=self.batch_size, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return loader(n=16, batch_size=16, seed=self.seed + 1)


@pytest.mark.slow
def test_lightning_cli_yaml_config_grows(tmp_path):
    # The example's YAML config drives DepthGrowth through LightningCLI (a smaller ViT and random data here).
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "grow_vit.yaml"
    cli = LightningCLI(
        Classifier,
        RandomSignals,
        args=[
            "fit",
            f"--config={config}",
            "--model.model.init_args.embed_dim=16",
            "--model.model.init_args.num_heads=2",
            "--trainer.max_epochs=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.batch_size=16",
        ],
        save_config_kwargs={"overwrite": True},
    )
    growth = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DepthGrowth))
    assert (growth.final_budget, growth.warmup_epochs, growth.placement) == (3.0, 2, "curvature")
    # Warm-up of 2 epochs, then one growth step at the end of epoch 1 (none after the last epoch).
    assert len(cli.model.model.blocks) == 3
    assert [e.epoch for e in event_log(cli.model)] == [1]


@pytest.mark.slow
def test_a_monitor_in_the_trainer_estimates_once_per_growth_epoch():
    # Issue 9.20: the monitor's epoch-end estimate (on the architecture the model still has) is what placement
    # uses in the next epoch; no second estimate in a growth epoch.
    module = tiny_module(max_epochs=4)
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False)  # estimates at every epoch end
    trainer(4, [monitor, DepthGrowth.paper(final_budget=3.0, warmup_epochs=2, placement="curvature")]).fit(
        module, loader()
    )
    events = event_log(module)
    assert [e.epoch for e in events] == [1, 2]
    assert [h["epoch"] for h in monitor.history] == [0, 1, 2, 3]
    for event in events:
        used = monitor.history[event.epoch - 1]["trace_per_param"]
        assert used[event.reason["block"]] == pytest.approx(event.reason["score"])


@pytest.mark.slow
def test_a_growth_at_the_first_epoch_end_shares_the_monitors_estimate():
    # Issue 9.20, the case with no earlier estimate to reuse: placement estimates on the epoch's last weights and
    # the monitor's epoch-end hook, at the same step, takes that estimate instead of computing a second one.
    module = tiny_module(max_epochs=2)
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False)
    trainer(2, [monitor, DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement="curvature")]).fit(
        module, loader()
    )
    (event,) = event_log(module)
    assert event.epoch == 0
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    assert monitor.history[0]["trace_per_param"][event.reason["block"]] == pytest.approx(event.reason["score"])


def test_placement_defaults_to_uniform_and_a_monitor_without_curvature_placement_is_named():
    assert DepthGrowth().placement == DepthGrowth.paper().placement == "uniform"
    with pytest.warns(UserWarning, match="only used by placement='curvature'"):
        DepthGrowth.paper(curvature_monitor=CurvatureMonitor(log=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DepthGrowth.paper(curvature_monitor=CurvatureMonitor(log=False), placement="curvature")
