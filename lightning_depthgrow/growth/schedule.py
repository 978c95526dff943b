"""When growth happens: after a warm-up, every few epochs, never in the last epoch."""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_int


@dataclass(frozen=True)
class Schedule:
    """Grow at the end of epoch ``warmup_epochs - 1``, then every ``every`` epochs; never twice in one epoch and
    never in the last epoch (an addition that is never trained only costs).

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
