"""Growth at fractions of training (``DepthGrowth(at=[...])``): after the right optimizer steps, in a real
``Trainer.fit``, with gradient accumulation, stacking ``factor`` times deep, resume and ``load_grown``."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from lightning_depthgrow import load_grown
from lightning_depthgrow.callbacks import DepthGrowth, DifferentiableModelScaling
from lightning_depthgrow.callbacks.base import ArchitectureCallback
from lightning_depthgrow.events import ArchitectureEvent, event_log
from lightning_depthgrow.growth import (
    BlockCost,
    Budget,
    FractionSchedule,
    StackLayout,
    plan_depth,
    stack_layouts,
    starting_blocks,
)
from lightning_depthgrow.growth.depth import inserted_after
from lightning_depthgrow.growth.schedule import GrowthCosineLR
from lightning_depthgrow.measure import count_parameters
from lightning_depthgrow.surgery.ramp import ramped_blocks
from tests._helpers import RankRecord, make_module, quiet_trainer, random_loader, rank_records, tensor_hash

PROBE = torch.randn(8, 1, 1, 40, generator=torch.Generator().manual_seed(5))


def _params(depth: int) -> int:
    return count_parameters(make_module(depth=depth))


class Depths(Callback):
    """At every training batch end: ``(epoch, batch_idx, global_step, depth)``, and the eval logits on PROBE."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int]] = []
        self.logits: dict[int, torch.Tensor] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.rows.append((trainer.current_epoch, batch_idx, trainer.global_step, len(pl_module.model.blocks)))
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.logits[trainer.global_step] = pl_module(PROBE).clone()
        pl_module.train(was)

    def grew_at(self) -> list[tuple[int, int, int, int]]:
        """The rows at which the depth changed since the previous batch end."""
        return [row for prev, row in zip(self.rows, self.rows[1:]) if row[3] != prev[3]]


def test_fraction_schedule_maps_fractions_to_optimizer_steps() -> None:
    s = FractionSchedule(at=[0.1, 0.25, 0.26])
    assert s.steps(40) == (4, 10)  # 0.26 * 40 = 10.4 -> 10: the same step as 0.25, one growth step
    assert s.dropped(40) == [0.26]
    assert [step for step in range(1, 41) if s.is_due(step - 1, step, 40)] == [4, 10]
    assert s.is_due(3, 5, 40)  # two optimizer steps since the last check (manual optimization) still catch step 4
    assert FractionSchedule(at=[0.01]).steps(20) == ()  # round(0.2) = 0: before the first step, dropped
    with pytest.raises(ValueError, match="length in optimizer steps"):
        s.steps(float("inf"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(at=[]), ValueError, "at least one fraction"),
        (dict(at=[0.5, 0.2]), ValueError, "increasing"),
        (dict(at=[0.2, 0.2]), ValueError, "increasing"),
        (dict(at=[1.0]), ValueError, r"at\[0\]"),
        (dict(at=[0.0]), ValueError, r"at\[0\]"),
        (dict(at=[float("nan")]), ValueError, r"at\[0\]"),
        (dict(at=[True]), TypeError, r"at\[0\]"),
        (dict(at="0.5"), TypeError, "sequence of fractions"),
        (dict(at=0.5), TypeError, "sequence of fractions"),
        (dict(at=[0.5], warmup_epochs=2), ValueError, "not both"),
        (dict(at=[0.5], grow_every=1), ValueError, "not both"),
        (dict(operator="zero_init", factor=3), ValueError, "factor"),
        (dict(operator="copy", ramp_steps=2, factor=2), ValueError, "factor"),
        (dict(operator="stack", factor=1), ValueError, "factor"),
        (dict(operator="stack", factor=True), TypeError, "factor"),
        (dict(operator="stack", factor=2.0), TypeError, "factor"),
    ],
)
def test_invalid_schedule_and_factor_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        DepthGrowth(**kwargs)


def test_schedule_views() -> None:
    by_fraction = DepthGrowth(at=(0.1, 0.5))
    assert (by_fraction.at, by_fraction.warmup_epochs, by_fraction.grow_every) == ((0.1, 0.5), None, None)
    by_epoch = DepthGrowth.paper()
    assert (by_epoch.at, by_epoch.warmup_epochs, by_epoch.grow_every, by_epoch.factor) == (None, 1, 1, 2)


def test_fractions_grow_after_the_right_optimizer_steps_mid_epoch() -> None:
    # 64 samples / batch 16 = 4 optimizer steps per epoch, 5 epochs: 20 steps. 0.1 -> step 2, 0.45 -> step 9
    # (both mid-epoch: epoch 0 batch 1, epoch 2 batch 0).
    growth = DepthGrowth.paper(final_budget=_params(4), budget_mode="absolute", placement="uniform", at=[0.1, 0.45])
    depths = Depths()
    module = make_module(depth=2, max_epochs=5)
    quiet_trainer(max_epochs=5, callbacks=[growth, depths]).fit(module, random_loader())
    assert [(e.kind, e.step, e.epoch) for e in event_log(module)] == [("insert_block", 2, 0), ("insert_block", 9, 2)]
    assert depths.grew_at() == [(0, 1, 2, 3), (2, 0, 9, 4)]
    assert len(depths.rows) == 20 and growth.last_growth_step == 9 and growth.growth_steps == 2
    assert len(module.model.blocks) == 4


def test_gradient_accumulation_counts_optimizer_steps_not_batches() -> None:
    # 4 batches per epoch, accumulate 2: 2 optimizer steps per epoch, 5 epochs = 10 steps (20 batches).
    # at=0.3 is step 3 (batch 6 of 20 would be the wrong, batch-counting, answer: step 3 is batch index 5).
    growth = DepthGrowth.paper(final_budget=_params(3), budget_mode="absolute", placement="uniform", at=[0.3])
    depths = Depths()
    module = make_module(depth=2, max_epochs=5)
    trainer = quiet_trainer(max_epochs=5, accumulate_grad_batches=2, callbacks=[growth, depths])
    trainer.fit(module, random_loader())
    assert trainer.estimated_stepping_batches == 10
    (grow,) = event_log(module)
    assert grow.step == 3
    # Growth at the end of the batch that made optimizer step 3 (epoch 1, batch 1), not at a gradient-only batch.
    assert depths.grew_at() == [(1, 1, 3, 3)]


def test_stack_factor_three_grows_two_blocks_to_six_in_one_step_preserving_the_function() -> None:
    growth = DepthGrowth(
        final_budget=_params(6), budget_mode="absolute", operator="stack", factor=3, ramp_steps=3, at=[0.25]
    )
    before, after = Depths(), Depths()
    module = make_module(depth=2, max_epochs=3)
    quiet_trainer(max_epochs=3, callbacks=[before, growth, after]).fit(module, random_loader())
    grow, fold = event_log(module)
    assert grow.kind == "stack_blocks" and grow.step == 3  # round(0.25 * 12)
    assert grow.spec == {"stack": "model.blocks", "factor": 3, "order": "stack", "ramp_steps": 3}
    assert grow.cost["params"] == _params(6) - _params(2)
    assert after.grew_at() == [(0, 2, 3, 6)]
    torch.testing.assert_close(after.logits[3], before.logits[3], atol=1e-5, rtol=0)  # ramped: identity at birth
    assert fold.kind == "fold_ramps" and fold.step == 6 and ramped_blocks(module) == {}
    assert count_parameters(module) == _params(6)


def test_stack_factor_that_does_not_fit_the_budget_is_refused_before_training() -> None:
    growth = DepthGrowth(final_budget=_params(5), budget_mode="absolute", operator="stack", factor=3, at=[0.5])
    module = make_module(depth=2)
    start = tensor_hash(module)
    with pytest.raises(ValueError, match=r"duplicating the smallest stack.*factor=3.*final_budget"):
        quiet_trainer(max_epochs=2, callbacks=[growth]).fit(module, random_loader())
    assert tensor_hash(module) == start


def test_blocks_per_step_above_the_insertion_positions_is_refused_before_training() -> None:
    # Two blocks, so two insertion positions: 4 blocks in one step cannot be planned (it used to add 2 silently).
    growth = DepthGrowth.paper(final_budget=3.0, blocks_per_step=4, max_per_stack=None, placement="uniform")
    module = make_module(depth=2)
    start = tensor_hash(module)
    with pytest.raises(ValueError, match=r"blocks_per_step=4.*at most one block per insertion position.*factor"):
        quiet_trainer(max_epochs=2, callbacks=[growth]).fit(module, random_loader())
    assert tensor_hash(module) == start
    # max_per_stack caps it too: 2 positions, max_per_stack=1 -> 1 block per step.
    with pytest.raises(ValueError, match=r"blocks_per_step=2.*max_per_stack=1"):
        quiet_trainer(max_epochs=2, callbacks=[DepthGrowth.paper(blocks_per_step=2)]).fit(module, random_loader())


def test_planned_budgets_rise_in_apply_order() -> None:
    stack = StackLayout("blocks", growable=(0, 1, 2), templates=(0, 1, 2), original=(True, True, True))
    costs = {f"blocks.{i}": BlockCost(params=10, flops=0) for i in range(3)}
    plan = plan_depth(
        [stack],
        costs,
        Budget(final=2.0),
        start=100,
        current=100,
        placement="uniform",
        blocks_per_step=3,
        max_per_stack=None,
    )
    assert [p.after for p in plan] == [2, 1, 0]  # deepest first: no insertion shifts a later one's index
    assert [p.reason["budget_after"] for p in plan] == [110, 120, 130]


class _Unsized(IterableDataset):
    def __iter__(self):
        yield from random_loader().dataset


def test_a_run_without_a_known_length_is_refused_before_the_first_step() -> None:
    growth = DepthGrowth(at=[0.5], placement="uniform")
    module = make_module(depth=2)
    start = tensor_hash(module)
    with pytest.raises(ValueError, match=r"length in optimizer steps.*max_steps"):
        quiet_trainer(max_epochs=1, callbacks=[growth]).fit(module, DataLoader(_Unsized(), batch_size=16))
    assert tensor_hash(module) == start


@pytest.mark.slow
def test_resume_after_a_step_triggered_growth_is_bitwise_and_load_grown_matches(tmp_path: Path) -> None:
    # 4 epochs of 4 steps; at=0.3 -> growth after step 5 (epoch 1, batch 0), ramp 6 steps (fold at step 11).
    def run(ckpt_path: str | None, dirpath: Path) -> tuple[pl.LightningModule, Depths]:
        growth = DepthGrowth(
            final_budget=_params(4), budget_mode="absolute", operator="stack", factor=2, ramp_steps=6, at=[0.3]
        )
        per_epoch = ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        at_growth = ModelCheckpoint(dirpath=dirpath, filename="{step}", save_top_k=-1, every_n_train_steps=5)
        depths = Depths()
        trainer = quiet_trainer(
            max_epochs=4,
            callbacks=[growth, depths, per_epoch, at_growth],
            enable_checkpointing=True,
            deterministic=True,
        )
        module = make_module(depth=2, max_epochs=4)
        trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
        return module, depths

    full, depths = run(None, tmp_path / "full")
    assert [(e.kind, e.step) for e in event_log(full)] == [("stack_blocks", 5), ("fold_ramps", 11)]
    # The checkpoint saved at the growth step already holds the grown architecture (growth runs first).
    at_growth = tmp_path / "full" / "step=5.ckpt"
    state = torch.load(at_growth, weights_only=False)
    assert state["state_dict"]["model.blocks.2.depthgrow_ramp"].tolist() == [0, 6]
    callback_state = next(v for k, v in state["callbacks"].items() if k.startswith("DepthGrowth"))
    assert callback_state["last_growth_step"] == 5
    fresh = load_grown(make_module(depth=2), at_growth).eval()
    with torch.no_grad():
        assert torch.equal(fresh(PROBE), depths.logits[5])

    # Resume from the end of epoch 1 (step 8: after the step-triggered growth, mid-ramp at 3 / 6).
    mid = tmp_path / "full" / "epoch=1.ckpt"
    assert torch.load(mid, weights_only=False)["state_dict"]["model.blocks.2.depthgrow_ramp"].tolist() == [3, 6]
    resumed, _ = run(str(mid), tmp_path / "resumed")
    assert [(e.kind, e.step) for e in event_log(resumed)] == [("stack_blocks", 5), ("fold_ramps", 11)]
    assert tensor_hash(resumed) == tensor_hash(full)

    final = load_grown(make_module(depth=2), tmp_path / "full" / "epoch=3.ckpt").eval()
    full.eval()
    with torch.no_grad():
        assert torch.equal(final(PROBE), full(PROBE))
    assert ramped_blocks(final) == {}


def test_fractions_next_to_a_dms_search_are_refused_at_setup() -> None:
    # Where a fraction falls is only known once the data is, so it could land inside the search: refused.
    dms = DifferentiableModelScaling(target=0.6, search_epochs=2)
    module = make_module(depth=2)
    start = tensor_hash(module)
    with pytest.raises(RuntimeError, match=r"fractions of training.*DifferentiableModelScaling.*warmup_epochs >= 3"):
        quiet_trainer(max_epochs=3, callbacks=[dms, DepthGrowth(at=[0.5])]).fit(module, random_loader())
    assert tensor_hash(module) == start


@pytest.mark.slow
def test_a_step_triggered_stacking_under_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    # Per rank 32 samples / batch 8 = 4 steps per epoch, 3 epochs = 12 steps: at=0.45 -> after step 5 (mid-epoch).
    growth = DepthGrowth(
        final_budget=_params(6), budget_mode="absolute", operator="stack", factor=3, ramp_steps=2, at=[0.45]
    )
    trainer = quiet_trainer(max_epochs=3, devices=2, strategy="ddp_spawn", callbacks=[growth, RankRecord(tmp_path)])
    trainer.fit(make_module(depth=2, max_epochs=3), random_loader(n=64, batch_size=8))
    ranks = rank_records(tmp_path)
    assert ranks[0] == ranks[1]
    assert [(e["kind"], e["step"]) for e in ranks[0]["events"]] == [("stack_blocks", 5), ("fold_ramps", 7)]
    assert ranks[0]["events"][0]["spec"]["factor"] == 3 and ranks[0]["ramped"] == {}


class _AppendAfterStep(ArchitectureCallback):
    """A custom callback on the optimizer-step trigger: one identity block after optimizer step 3."""

    change_at = "optimizer_step"

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def is_due(self, trainer: pl.Trainer) -> bool:
        self.asked.append(trainer.global_step)
        return trainer.global_step == 3

    def propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        layout = stack_layouts(pl_module)[0]
        spec = {"stack": layout.path, "index": layout.depth - 1, "template": layout.templates[-1], "seed": 0}
        return [ArchitectureEvent("insert_block", spec, step=trainer.global_step)]


def test_a_custom_callback_on_the_optimizer_step_trigger_is_asked_once_per_optimizer_step() -> None:
    custom, depths = _AppendAfterStep(), Depths()
    module = make_module(depth=2, max_epochs=2)
    quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[custom, depths]).fit(module, random_loader())
    assert custom.asked == [1, 2, 3, 4]  # 8 batches, 4 optimizer steps: never asked on a gradient-only batch
    assert depths.grew_at() == [(1, 1, 3, 3)] and [e.step for e in event_log(module)] == [3]


def test_uniform_placement_counts_copies_and_stacked_blocks_as_inserted() -> None:
    # Only insert_block events used to mark inserted blocks: after a copy every block counted as a starting block
    # and uniform placement put every copy after block 0.
    copy = ArchitectureEvent("copy_block", {"stack": "blocks", "source": 0, "index": 0, "ramp_steps": 4})
    original = starting_blocks(3, inserted_after([copy], "blocks", 3))
    assert original == (True, False, True)
    stack = StackLayout("blocks", growable=(0, 1, 2), templates=(0, 1, 2), original=original)
    costs = {f"blocks.{i}": BlockCost(params=10, flops=0) for i in range(3)}
    (plan,) = plan_depth([stack], costs, Budget(final=2.0), start=100, current=100, placement="uniform")
    assert plan.after == 2  # after the starting block that has no copy yet
    stacked = ArchitectureEvent("stack_blocks", {"stack": "blocks", "factor": 3, "order": "stack", "ramp_steps": 0})
    assert starting_blocks(6, inserted_after([stacked], "blocks", 6)) == (True, True, False, False, False, False)
    assert inserted_after([stacked], "blocks", 5) == [-1]  # does not add up: starting_blocks then counts all


# ---------------------------------------------------------------- GrowthCosineLR: the cosine restarted at growth


def _cosine(step: int, start: int, end: int, floor: float) -> float:
    progress = min(1.0, (step - start) / max(1, end - start))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_growth_cosine_lr_restarts_at_the_growth_steps_depth_growth_uses() -> None:
    lr = GrowthCosineLR(total_steps=100, at=[0.3], warmup_steps=10, restart_warmup=5, min_lr_ratio=0.1)
    assert lr.growth_steps == FractionSchedule([0.3]).steps(100) == (30,)
    assert [lr(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warm-up
    assert [lr(s) for s in range(10, 30)] == pytest.approx([_cosine(s, 10, 100, 0.1) for s in range(10, 30)])
    before = _cosine(30, 10, 100, 0.1)  # the schedule's value at the growth step, the re-warm's start
    assert [lr(s) for s in range(30, 35)] == pytest.approx(
        [before + (1 - before) * (s - 29) / 5 for s in range(30, 35)]
    )
    assert lr(34) == pytest.approx(1.0) and lr(35) == pytest.approx(1.0)
    assert [lr(s) for s in range(35, 101)] == pytest.approx([_cosine(s, 35, 100, 0.1) for s in range(35, 101)])
    assert lr(100) == pytest.approx(0.1) and lr(200) == pytest.approx(0.1)
    assert all(lr(s) > _cosine(s, 10, 100, 0.1) for s in range(31, 100))  # more LR than the plain cosine after growth


def test_growth_cosine_lr_two_growth_steps_and_no_warmups() -> None:
    lr = GrowthCosineLR(total_steps=40, at=[0.25, 0.5], restart_warmup=0, min_lr_ratio=0.0)
    assert lr.growth_steps == (10, 20)
    assert lr(0) == 1.0 and lr(9) == pytest.approx(_cosine(9, 0, 40, 0.0))
    assert lr(10) == 1.0 and lr(19) == pytest.approx(_cosine(19, 10, 40, 0.0))
    assert lr(20) == 1.0 and lr(30) == pytest.approx(0.5) and lr(40) == 0.0
    rewarm = GrowthCosineLR(total_steps=40, at=[0.25, 0.5], restart_warmup=4, min_lr_ratio=0.0)
    # The second re-warm starts from the first restart's value at step 20 (its cosine from step 14), not from 1.
    assert rewarm(20) == pytest.approx(_cosine(20, 14, 40, 0.0) + (1 - _cosine(20, 14, 40, 0.0)) / 4)
    assert rewarm(20) > _cosine(20, 14, 40, 0.0) and rewarm(23) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(total_steps=True), TypeError, "total_steps"),
        (dict(total_steps=100.0), TypeError, "total_steps"),
        (dict(total_steps=1), ValueError, "total_steps"),
        (dict(at=[]), ValueError, "at least one fraction"),
        (dict(at=[0.6, 0.3]), ValueError, "increasing"),
        (dict(at=0.3), TypeError, "sequence of fractions"),
        (dict(at=[0.001]), ValueError, "grows at no step"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(warmup_steps=100), ValueError, "warmup_steps"),
        (dict(restart_warmup=1.5), TypeError, "restart_warmup"),
        (dict(restart_warmup=-1), ValueError, "restart_warmup"),
        (dict(min_lr_ratio=float("nan")), ValueError, "min_lr_ratio"),
        (dict(min_lr_ratio=1.5), ValueError, "min_lr_ratio"),
        (dict(min_lr_ratio="0.1"), TypeError, "min_lr_ratio"),
    ],
)
def test_growth_cosine_lr_invalid_arguments_name_the_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    arguments: dict[str, Any] = dict(total_steps=100, at=[0.3])
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        GrowthCosineLR(**arguments)


def test_growth_cosine_lr_is_stateless_so_a_resumed_lambda_lr_continues_identically() -> None:
    lr = GrowthCosineLR(total_steps=50, at=[1 / 3], warmup_steps=5, restart_warmup=5)
    assert pickle.loads(pickle.dumps(lr)) == lr

    def scheduler() -> torch.optim.lr_scheduler.LambdaLR:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, GrowthCosineLR(50, [1 / 3], 5, 5))

    full, interrupted = scheduler(), scheduler()
    lrs = []
    for step in range(50):
        lrs.append(full.get_last_lr()[0])
        full.optimizer.step()
        full.step()
        if step < 20:  # step 20 is past the restart (after step 17)
            interrupted.optimizer.step()
            interrupted.step()
    state = interrupted.state_dict()
    resumed = scheduler()
    resumed.load_state_dict(state)
    resumed.optimizer.param_groups[0]["lr"] = state["_last_lr"][0]  # what the checkpointed optimizer holds
    tail = []
    for _ in range(20, 50):
        tail.append(resumed.get_last_lr()[0])
        resumed.optimizer.step()
        resumed.step()
    assert tail == lrs[20:]
    assert lrs == [0.5 * lr(s) for s in range(50)]
