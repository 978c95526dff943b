"""How much a model may grow: the one spelling of a growth budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..validation import check_bool, check_choice, check_float, check_optional

BudgetMetric = Literal["params", "flops"]
BudgetMode = Literal["relative", "absolute"]


@dataclass(frozen=True)
class Budget:
    """A final size limit and a per-step size limit, in parameters or FLOPs, relative to the start or absolute.

    Args:
        final: the size growth never exceeds: a multiple of the starting size (``mode="relative"``, e.g. ``2.0``)
            or an absolute count; ``None``: no final limit (only ``step`` limits growth).
        step: the most size one growth step adds (relative to the starting size or absolute, like ``final``);
            ``None``: no per-step size limit.
        metric: ``"params"`` or ``"flops"`` (forward FLOPs per sample).
        mode: how ``final`` and ``step`` are read: ``"relative"`` or ``"absolute"``.
        scale_by_lr: multiply the step limit by current lr / initial lr (growth shrinks along the learning-rate
            schedule); needs ``step``.

    The argument names in messages are the callbacks' (``final_budget``, ``step_budget``, ``budget_metric``,
    ``budget_mode``, ``scale_by_lr``): a wrong value raises ``TypeError`` / ``ValueError`` naming them.

    Example:
        >>> b = Budget(final=2.0, step=0.25, scale_by_lr=True)
        >>> b.final_limit(start=1000), b.step_limit(start=1000, lr_scale=0.5)
        (2000.0, 125.0)
        >>> b.room(start=1000, current=1900, lr_scale=1.0)
        100.0
    """

    final: float | None = 2.0
    step: float | None = None
    metric: BudgetMetric = "params"
    mode: BudgetMode = "relative"
    scale_by_lr: bool = False

    def __post_init__(self) -> None:
        check_choice("budget_metric", self.metric, ("params", "flops"))
        check_choice("budget_mode", self.mode, ("relative", "absolute"))
        final = check_optional(self.final, check_float, "final_budget", low=0.0)
        step = check_optional(self.step, check_float, "step_budget", low=0.0)
        check_bool("scale_by_lr", self.scale_by_lr)
        if final is not None and self.mode == "relative" and final < 1.0:
            raise ValueError(
                f"`final_budget`={final} with budget_mode='relative' is smaller than the starting model (1.0); "
                "growth only adds. Use e.g. final_budget=2.0 for twice the starting size."
            )
        if self.scale_by_lr and step is None:
            raise ValueError("`scale_by_lr`=True scales step_budget by the learning rate; set step_budget too.")
        object.__setattr__(self, "final", final)
        object.__setattr__(self, "step", step)

    def final_limit(self, start: float) -> float:
        """The final budget as an absolute count (``inf`` without one)."""
        if self.final is None:
            return math.inf
        return self.final if self.mode == "absolute" else self.final * float(start)

    def lr_factor(self, lr_scale: float) -> float:
        """The factor applied to the step limit: ``lr_scale`` with ``scale_by_lr``, else 1."""
        return float(lr_scale) if self.scale_by_lr else 1.0

    def step_limit(self, start: float, lr_scale: float = 1.0) -> float:
        """The most size one step may add now (``inf`` without a step budget)."""
        if self.step is None:
            return math.inf
        base = self.step if self.mode == "absolute" else self.step * float(start)
        return base * self.lr_factor(lr_scale)

    def room(self, start: float, current: float, lr_scale: float = 1.0) -> float:
        """What the next step may add: the smaller of the step limit and what is left of the final limit."""
        return min(self.final_limit(start) - float(current), self.step_limit(start, lr_scale))
