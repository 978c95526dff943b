"""Decide how a model grows, without Lightning: a :class:`Budget`, a :class:`Schedule` and pure planners.

The planners read plain numbers (block costs, curvature scores, splitting eigenvalues) and return typed
records (:class:`Insertion`, :class:`NeuronBranch`) that convert to :class:`~lightning_depthgrow.ArchitectureEvent`
with ``to_event``. Nothing here needs a Trainer, so placement is unit-testable on its own; the callbacks in
:mod:`lightning_depthgrow.callbacks` only gather the numbers, call a planner and apply its events.

Example:
    >>> budget = Budget(final=1.5)  # grow to 1.5 x the starting parameter count
    >>> stack = StackLayout("blocks", growable=(0, 1), templates=(0, 1), original=(True, True))
    >>> costs = {"blocks.0": BlockCost(params=10, flops=0), "blocks.1": BlockCost(params=10, flops=0)}
    >>> plan = plan_depth([stack], costs, budget, start=40, current=40, scores={"blocks.0": 1.0, "blocks.1": 3.0})
    >>> [(p.block, p.params) for p in plan]
    [('blocks.1', 10)]
"""

from .budget import Budget, BudgetMetric, BudgetMode
from .depth import (
    BlockCost,
    Insertion,
    Placement,
    StackLayout,
    fits_any_insertion,
    plan_depth,
    stack_layouts,
    starting_blocks,
)
from .neurons import NeuronBranch, plan_neurons
from .schedule import FractionSchedule, GrowthCosineLR, Schedule, warmup_cosine

__all__ = [
    "BlockCost",
    "Budget",
    "BudgetMetric",
    "BudgetMode",
    "FractionSchedule",
    "GrowthCosineLR",
    "Insertion",
    "NeuronBranch",
    "Placement",
    "Schedule",
    "StackLayout",
    "fits_any_insertion",
    "plan_depth",
    "plan_neurons",
    "stack_layouts",
    "starting_blocks",
    "warmup_cosine",
]
