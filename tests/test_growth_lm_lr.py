"""The LM growth benchmark's growth-aware LR schedule (``GrowthAwareLR``) inside a real ``Trainer.fit``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.bench_growth_lm import GrowthAwareLR
from benchmarks.tasks import ByteLM, CorpusConfig, LMConfig, make_gpt, train_lm, warmup_cosine
from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.measure import count_parameters

SMALL = CorpusConfig(train_bytes=40_000, val_bytes=8_000)
CONFIG = LMConfig(
    dim=16, heads=2, context=16, batch_size=4, steps=12, warmup_steps=2, eval_every=6, val_windows=8, corpus=SMALL
)


class RecordLR(Callback):
    """Every optimizer step's learning rate per param group, and the depth it ran with."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, list[float]]] = []
        self.in_groups: set[int] = set()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        groups = trainer.optimizers[0].param_groups
        self.rows.append((trainer.global_step, len(pl_module.model.blocks), [g["lr"] for g in groups]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.in_groups = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}


def grow_with(schedule: GrowthAwareLR | None) -> tuple[RecordLR, torch.nn.Module]:
    final = count_parameters(ByteLM(make_gpt(CONFIG, 6), CONFIG))
    growth = DepthGrowth(
        final_budget=final, budget_mode="absolute", operator="stack", factor=3, ramp_steps=2, at=[1 / 3]
    )
    record = RecordLR()
    torch.manual_seed(0)
    model = make_gpt(CONFIG)
    callbacks = [growth, record] + ([schedule] if schedule is not None else [])
    train_lm(replace(CONFIG, depth=2), seed=0, callbacks=callbacks, model=model)
    return record, model


def test_factor_small_phase_restart_and_floor() -> None:
    schedule = GrowthAwareLR(CONFIG, at_step=4, small_mult=2.0, restart_warmup=2)
    base = warmup_cosine(CONFIG)
    assert [schedule.factor(s) for s in range(4)] == [2.0 * base(s) for s in range(4)]
    # Re-warm from the base multiplier at the growth step to the peak over 2 steps, then a cosine to the floor.
    assert schedule.factor(4) == pytest.approx(base(4) + (1 - base(4)) / 2)
    assert schedule.factor(5) == pytest.approx(1.0)
    assert schedule.factor(CONFIG.steps) == pytest.approx(CONFIG.min_lr_ratio)
    middle = 6 + (CONFIG.steps - 6) / 2
    assert schedule.factor(middle) == pytest.approx(CONFIG.min_lr_ratio + (1 - CONFIG.min_lr_ratio) / 2)
    plain = GrowthAwareLR(CONFIG, at_step=4, small_mult=1.0, restart_warmup=None)
    assert [plain.factor(s) for s in range(CONFIG.steps)] == [base(s) for s in range(CONFIG.steps)]


def test_trainer_follows_the_growth_aware_schedule_in_every_group_across_growth() -> None:
    schedule = GrowthAwareLR(CONFIG, at_step=4, small_mult=2.0, restart_warmup=2)
    record, model = grow_with(schedule)
    assert len(model.blocks) == 6
    assert [depth for _, depth, _ in record.rows] == [2] * 4 + [6] * 8  # grown after optimizer step 4
    for step, _, lrs in record.rows:
        assert lrs == pytest.approx([CONFIG.lr * schedule.factor(step)] * 2), step
    assert record.rows[3][2][0] == pytest.approx(2 * CONFIG.lr * warmup_cosine(CONFIG)(3))  # boosted small phase
    # The grown blocks' parameters joined the groups the schedule drives.
    assert all(id(p) in record.in_groups for p in model.blocks[5].parameters())


def test_default_settings_leave_the_base_schedule_unchanged() -> None:
    plain, _ = grow_with(GrowthAwareLR(CONFIG, at_step=4, small_mult=1.0, restart_warmup=None))
    base, _ = grow_with(None)
    assert [lrs for *_, lrs in plain.rows] == [lrs for *_, lrs in base.rows]
    assert len({lrs[0] for *_, lrs in base.rows}) > 2  # the base schedule does move the LR
