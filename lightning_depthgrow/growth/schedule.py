"""When growth happens: by epoch (:class:`Schedule`: a warm-up, then every few epochs) or at fractions of the
training's optimizer steps (:class:`FractionSchedule`: e.g. once, early, as G_stack grows)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
