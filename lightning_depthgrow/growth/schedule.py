"""When growth happens: by epoch (:class:`Schedule`: a warm-up, then every few epochs) or at fractions of the
training's optimizer steps (:class:`FractionSchedule`: e.g. once, early, as G_stack grows); and a learning-rate
schedule that knows about it (:class:`GrowthCosineLR`: warm-up + cosine, restarted at each growth step; its base
without restarts is :func:`warmup_cosine`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from ..validation import check_float, check_int


@dataclass(frozen=True)
class Schedule:
    """Grow at the end of epoch ``warmup_epochs - 1``, then every ``every`` epochs; never twice in one epoch and
    never in the last epoch (an addition that is never trained only costs). The paper's schedule (warm-up, then
    every N epochs) and the epoch preset of the growth callbacks.

    Args:
        warmup_epochs: epochs trained before the first growth step (``0`` is the same as ``1``).
        every: after warm-up, grow at the end of every ``every``-th epoch (the callbacks' ``grow_every``).

    Example:
        >>> s = Schedule(warmup_epochs=2, every=2)
        >>> [epoch for epoch in range(8) if s.is_due(epoch, max_epochs=8, last_epoch=-1)]
        [1, 3, 5]
    """

    warmup_epochs: int = 1
    every: int = 1

    def __post_init__(self) -> None:
        check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        check_int("grow_every", self.every, minimum=1)

    def is_due(self, epoch: int, max_epochs: int | None, last_epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with growth, given the epoch of the previous growth step."""
        done = epoch + 1
        warmup = max(1, self.warmup_epochs)
        if epoch <= last_epoch or done < warmup:
            return False
        if max_epochs is not None and 0 <= max_epochs <= done:
            return False
        return (done - warmup) % self.every == 0

    def first_epoch(self) -> int:
        """The first epoch that ends with growth."""
        return max(1, self.warmup_epochs) - 1


@dataclass(frozen=True)
class FractionSchedule:
    """Grow right after the optimizer step at each fraction ``at`` of the training's optimizer steps.

    The total is what the run will take: ``Trainer.estimated_stepping_batches`` (``max_steps``, or ``max_epochs``
    times the optimizer steps per epoch, gradient accumulation counted), so the same fractions work for
    step-based and epoch-based runs; growth then happens after an optimizer step, mid-epoch if that is where the
    fraction falls. Fraction ``f`` is due after optimizer step ``round(f * total)``; fractions that fall on the
    same step grow once, and a step outside ``1 .. total - 1`` (growth nobody would train) is dropped.

    Args:
        at: fractions of training in ``(0, 1)``, one growth step each (e.g. ``[0.1, 0.25]``).

    Example:
        >>> s = FractionSchedule(at=[0.1, 0.25])
        >>> s.steps(total=1000)
        (100, 250)
        >>> [step for step in range(1, 1001) if s.is_due(step - 1, step, total=1000)]
        [100, 250]
    """

    at: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.at, (str, bytes)) or not isinstance(self.at, Sequence):
            raise TypeError(f"`at` must be a sequence of fractions of training in (0, 1), got {self.at!r}.")
        if not self.at:
            raise ValueError("`at` must name at least one fraction of training in (0, 1), got an empty sequence.")
        fractions = tuple(
            check_float(f"at[{i}]", f, low=0.0, high=1.0, high_inclusive=False) for i, f in enumerate(self.at)
        )
        if list(fractions) != sorted(set(fractions)):
            raise ValueError(f"`at` must list increasing fractions without repeats, got {list(self.at)}.")
        object.__setattr__(self, "at", fractions)

    def steps(self, total: int | float) -> tuple[int, ...]:
        """The optimizer steps after which growth is due, for a run of ``total`` optimizer steps (increasing)."""
        total = self.check_total(total)
        return tuple(sorted({step for step in (round(f * total) for f in self.at) if 1 <= step < total}))

    def dropped(self, total: int | float) -> list[float]:
        """The fractions that grow at no step of a ``total``-step run (before step 1 or at the end) or at the step
        of an earlier fraction."""
        total = self.check_total(total)
        seen: set[int] = set()
        lost = []
        for f in self.at:
            step = round(f * total)
            if not 1 <= step < total or step in seen:
                lost.append(f)
            seen.add(step)
        return lost

    def is_due(self, previous_step: int, step: int, total: int | float) -> bool:
        """Whether a due step lies in ``(previous_step, step]``: optimizer steps made since the last check."""
        return any(previous_step < due <= step for due in self.steps(total))

    def first_epoch(self) -> None:
        """Unknown before training (it depends on the data's length): ``None``."""
        return None

    @staticmethod
    def check_total(total: int | float) -> int:
        """``total`` as an int; ``ValueError`` for a run without a known length."""
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total) or total < 1:
            raise ValueError(
                f"Growth at fractions of training needs the run's length in optimizer steps, got {total!r}: set "
                "Trainer(max_steps=...) or max_epochs with a train dataloader that has a length "
                "(or Trainer(limit_train_batches=<int>))."
            )
        return int(total)


def warmup_cosine(total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier per optimizer step for ``torch.optim.lr_scheduler.LambdaLR``: a linear warm-up to 1, then a
    cosine decay to ``min_lr_ratio`` at ``total_steps`` (held there after).

    Step ``s < warmup_steps`` gets ``(s + 1) / warmup_steps``; a later step gets
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with ``p = (s - warmup_steps) / (total_steps -
    warmup_steps)`` capped at 1. It is :class:`GrowthCosineLR` without growth (the schedule it restarts), and the
    fixed-size models' schedule in the LM benchmark. The result is picklable (a ``functools.partial`` of a module
    function), so ``LambdaLR.state_dict`` and checkpoints keep working.

    Args:
        total_steps: the run's optimizer steps (``Trainer(max_steps=...)``; ``trainer.estimated_stepping_batches``).
        warmup_steps: steps of the linear warm-up (``0``: none; a warm-up as long as the run never reaches the
            cosine).
        min_lr_ratio: the multiplier at the end of training, in ``[0, 1]``.

    Example:
        >>> lr = warmup_cosine(total_steps=1500, warmup_steps=30, min_lr_ratio=0.1)
        >>> lr(0), lr(29), lr(765), round(lr(1500), 3)
        (0.03333333333333333, 1.0, 0.55, 0.1)
        >>> def configure_optimizers(self):  # in your LightningModule  # doctest: +SKIP
        ...     optimizer = torch.optim.AdamW(self.parameters(), lr=6e-3)
        ...     schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(1500, 30))
        ...     return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
    """
    check_int("total_steps", total_steps, minimum=1)
    check_int("warmup_steps", warmup_steps, minimum=0)
    min_lr_ratio = check_float("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0, low_inclusive=True)
    return partial(_warmup_cosine, total_steps, warmup_steps, min_lr_ratio)


def _warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float, step: int) -> float:
    """:func:`warmup_cosine`'s multiplier at ``step`` (arguments not checked)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return _cosine(step - warmup_steps, total_steps - warmup_steps, min_lr_ratio)


def _cosine(done: int, length: int, min_lr_ratio: float) -> float:
    """The cosine from 1 to ``min_lr_ratio`` over ``length`` steps, ``done`` of them taken (held at the end)."""
    progress = min(1.0, done / max(1, length))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class GrowthCosineLR:
    """LR multiplier per optimizer step for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up, cosine decay to
    ``min_lr_ratio``, and the cosine **restarted at each growth step** of ``DepthGrowth(at=...)``.

    Without growth (steps before the first growth step) it is the usual schedule, :func:`warmup_cosine`:
    ``(step + 1) / warmup_steps``
    during warm-up, then ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of
    the steps after warm-up done. At each growth step ``s`` (the step :class:`FractionSchedule` grows after, for a
    run of ``total_steps``), the multiplier re-warms linearly over ``restart_warmup`` steps from the value the
    schedule had at ``s`` to 1, then follows a cosine from 1 to ``min_lr_ratio`` at ``total_steps``: the grown model
    gets the schedule of a fresh run over the steps it has left. On the byte-level LM (G_stack 2 -> 6 blocks at 1/3,
    ``docs/growth.md``) this is what made the grown model reach the fixed 6-block model's final loss at <= 0.65x its
    FLOPs in more seeds; the fixed model trained with the same schedule gains too (the control in the docs).

    Every param group (grown blocks included: they join their template's group) follows it. The object holds no
    state (a pure function of the step, picklable): ``LambdaLR`` checkpoints its step count, and a resumed run that
    builds the same ``GrowthCosineLR`` in ``configure_optimizers`` continues with the same learning rates.

    Args:
        total_steps: the run's optimizer steps (``Trainer(max_steps=...)``; ``trainer.estimated_stepping_batches``).
        at: the growth fractions, the same as ``DepthGrowth(at=...)`` (increasing, each in ``(0, 1)``).
        warmup_steps: steps of the initial linear warm-up (``0``: none).
        restart_warmup: steps of the linear re-warm after each growth step (``0``: the cosine restarts at 1 at once).
        min_lr_ratio: the multiplier at the end of training, in ``[0, 1]``.

    Example:
        >>> lr = GrowthCosineLR(total_steps=1500, at=[1 / 3], warmup_steps=30, restart_warmup=30)
        >>> lr.growth_steps
        (500,)
        >>> round(lr(499), 3), round(lr(500), 3), lr(529), round(lr(1500), 3)
        (0.792, 0.798, 1.0, 0.1)
        >>> def configure_optimizers(self):  # in your LightningModule  # doctest: +SKIP
        ...     optimizer = torch.optim.AdamW(self.parameters(), lr=6e-3)
        ...     schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, GrowthCosineLR(1500, [1 / 3], 30, 30))
        ...     return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
    """

    total_steps: int
    at: tuple[float, ...]
    warmup_steps: int = 0
    restart_warmup: int = 30
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        check_int("total_steps", self.total_steps, minimum=2)
        object.__setattr__(self, "at", FractionSchedule(self.at).at)
        check_int("warmup_steps", self.warmup_steps, minimum=0, maximum=self.total_steps - 1)
        check_int("restart_warmup", self.restart_warmup, minimum=0, maximum=self.total_steps - 1)
        object.__setattr__(
            self, "min_lr_ratio", check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0, low_inclusive=True)
        )
        if not self.growth_steps:
            raise ValueError(
                f"`at`={list(self.at)} grows at no step of a {self.total_steps}-step run (each fraction must fall on "
                "a step in 1 .. total_steps - 1): nothing to restart the schedule at. Check total_steps and at."
            )

    @property
    def growth_steps(self) -> tuple[int, ...]:
        """The optimizer steps after which growth happens (and the schedule restarts)."""
        return FractionSchedule(self.at).steps(self.total_steps)

    def __call__(self, step: int) -> float:
        """The LR multiplier of the optimizer step that follows ``step`` scheduler steps."""
        restarts = [s for s in self.growth_steps if s <= step]
        if not restarts:
            return self._base(step)
        return self._restarted(step, len(restarts) - 1)

    def _base(self, step: int) -> float:
        """The multiplier before any restart: :func:`warmup_cosine`'s."""
        return _warmup_cosine(self.total_steps, self.warmup_steps, self.min_lr_ratio, step)

    def _restarted(self, step: int, k: int) -> float:
        """The multiplier at ``step`` under the ``k``-th restart (0-based), the one most recently passed."""
        start, warm, end = self.growth_steps[k], self.restart_warmup, self.total_steps
        if step < start + warm:
            from_lr = self._base(start) if k == 0 else self._restarted(start, k - 1)
            return from_lr + (1 - from_lr) * (step - start + 1) / warm
        return _cosine(step - start - warm, end - start - warm, self.min_lr_ratio)


def growth_schedule(
    at: Sequence[float] | None, warmup_epochs: int | None, grow_every: int | None
) -> Schedule | FractionSchedule:
    """The schedule a growth callback's arguments ask for: growth at fractions of training (``at``) or by epoch
    (``warmup_epochs``/``grow_every``, each ``None`` read as ``1``); both at once are refused.

    >>> growth_schedule([0.5], None, None)
    FractionSchedule(at=(0.5,))
    >>> growth_schedule(None, 2, None)
    Schedule(warmup_epochs=2, every=1)
    """
    if at is not None and (warmup_epochs is not None or grow_every is not None):
        raise ValueError(
            f"Give either at={at!r} (growth at fractions of training) or warmup_epochs/grow_every (growth by "
            "epoch), not both."
        )
    if at is not None:
        return FractionSchedule(at)
    return Schedule(1 if warmup_epochs is None else warmup_epochs, 1 if grow_every is None else grow_every)
