"""``growth.schedule.warmup_cosine``: the one warm-up + cosine that the LM benchmark and ``GrowthCosineLR`` share.

The multipliers must be bitwise those of the two formulas it replaced (``benchmarks.tasks.warmup_cosine`` and
``GrowthCosineLR._base``/``_cosine`` before the refactor), written out here as they were.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from benchmarks.tasks import LMConfig
from benchmarks.tasks import warmup_cosine as lm_warmup_cosine
from lightning_depthgrow.growth import GrowthCosineLR, warmup_cosine

SCHEDULES = [(1500, 30, 0.1), (1500, 30, 0.3), (1500, 30, 0.0), (2000, 0, 0.1), (500, 45, 1.0), (8, 30, 0.1)]


def old_lm_factor(steps: int, warmup: int, floor: float, step: int) -> float:
    """``benchmarks.tasks.warmup_cosine`` before the refactor (its inner ``factor``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def old_growth_cosine(total: int, warmup: int, rewarm: int, floor: float, growth: tuple[int, ...], step: int) -> float:
    """``GrowthCosineLR.__call__`` before the refactor (``_base``, ``_restarted`` and ``_cosine`` inlined)."""

    def cosine(done: int, length: int) -> float:
        progress = min(1.0, done / max(1, length))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def base(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return cosine(s - warmup, total - warmup)

    def restarted(s: int, k: int) -> float:
        start = growth[k]
        if s < start + rewarm:
            from_lr = base(start) if k == 0 else restarted(start, k - 1)
            return from_lr + (1 - from_lr) * (s - start + 1) / rewarm
        return cosine(s - start - rewarm, total - start - rewarm)

    passed = [s for s in growth if s <= step]
    return base(step) if not passed else restarted(step, len(passed) - 1)


@pytest.mark.parametrize(("steps", "warmup", "floor"), SCHEDULES)
def test_bitwise_the_old_lm_schedule(steps: int, warmup: int, floor: float) -> None:
    new = warmup_cosine(steps, warmup, floor)
    lm = lm_warmup_cosine(LMConfig(steps=steps, warmup_steps=warmup, min_lr_ratio=floor))
    for step in range(steps + 50):  # past the end too: held at the floor
        old = old_lm_factor(steps, warmup, floor, step)
        assert new(step) == old, step  # exact equality: the runs stored in benchmarks/results stay reproducible
        assert lm(step) == old, step


@pytest.mark.parametrize(
    ("total", "at", "warmup", "rewarm", "floor"),
    [(1500, [1 / 3], 30, 30, 0.1), (3000, [0.2, 0.5], 30, 45, 0.3), (1600, [0.25], 0, 0, 0.0)],
)
def test_growth_cosine_bitwise_unchanged(total: int, at: list[float], warmup: int, rewarm: int, floor: float) -> None:
    lr = GrowthCosineLR(total, at, warmup, rewarm, floor)
    growth = lr.growth_steps
    for step in range(total + 10):
        assert lr(step) == old_growth_cosine(total, warmup, rewarm, floor, growth, step), step
    # Before the first growth step it is warmup_cosine itself.
    base = warmup_cosine(total, warmup, floor)
    assert [lr(s) for s in range(growth[0])] == [base(s) for s in range(growth[0])]


def test_values_at_the_landmarks() -> None:
    lr = warmup_cosine(total_steps=100, warmup_steps=10, min_lr_ratio=0.2)
    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == 1.0
    assert lr(10) == 1.0
    assert lr(55) == pytest.approx(0.6)  # half way through the cosine: (1 + 0.2) / 2
    assert lr(100) == pytest.approx(0.2)
    assert lr(1000) == pytest.approx(0.2)


def test_picklable_and_drives_lambda_lr() -> None:
    lr = pickle.loads(pickle.dumps(warmup_cosine(20, 4, 0.1)))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [0.5 * lr(s) for s in range(20)]
    assert scheduler.state_dict()["last_epoch"] == 20


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"total_steps": 10.0}, TypeError, "total_steps"),
        ({"total_steps": 10, "warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"total_steps": 10, "min_lr_ratio": 1.5}, ValueError, "min_lr_ratio"),
        ({"total_steps": 10, "min_lr_ratio": float("nan")}, ValueError, "min_lr_ratio"),
    ],
)
def test_bad_arguments_say_which(arguments: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        warmup_cosine(**arguments)
