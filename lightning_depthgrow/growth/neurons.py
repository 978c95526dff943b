"""Which neurons get a residual sub-unit: a pure planner over splitting-matrix eigenvalues."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..events import ArchitectureEvent
from .budget import Budget

NEURON_BRANCH = "neuron_branch"


@dataclass
class NeuronBranch:
    """One planned branch: a residual sub-unit on ``neurons`` of the Linear at ``linear``.

    Example:
        >>> NeuronBranch("model.fc1", [0, 3], params=10).to_event().spec
        {'linear': 'model.fc1', 'neurons': [0, 3]}
    """

    linear: str
    neurons: list[int]
    params: int
    reason: dict[str, Any] = field(default_factory=dict)

    def to_event(self, epoch: int = -1, step: int = -1) -> ArchitectureEvent:
        """The ``neuron_branch`` event that applies this branch."""
        spec = {"linear": self.linear, "neurons": list(self.neurons)}
        return ArchitectureEvent(
            NEURON_BRANCH, spec, epoch=epoch, step=step, reason=dict(self.reason), cost={"params": self.params}
        )


def plan_neurons(
    eigenvalues: Mapping[str, Sequence[float]],
    costs: Mapping[str, int],
    budget: Budget,
    *,
    start: float,
    current: float,
    lr_scale: float = 1.0,
    min_neurons: int = 1,
) -> list[NeuronBranch]:
    """The branches of one growth step, in the order of ``eigenvalues`` (the watched layers' order).

    All neurons with a negative ``lambda_min`` are ranked across layers, most negative first, and taken while
    their parameters fit the budget's room; layers with fewer than ``min_neurons`` taken neurons are dropped.

    Args:
        eigenvalues: ``{linear_path: [lambda_min per output neuron]}``.
        costs: ``{linear_path: parameters one branch neuron adds}``.
        budget: a parameter budget; ``start`` and ``current`` are parameter counts.
        lr_scale: current lr / initial lr, used with ``budget.scale_by_lr``.
        min_neurons: the fewest neurons a layer's branch may have.

    Example:
        >>> plan = plan_neurons({"fc": [-2.0, 0.5, -1.0]}, {"fc": 5}, Budget(final=None, step=10, mode="absolute"),
        ...                     start=100, current=100)
        >>> [(b.linear, b.neurons, b.params) for b in plan]
        [('fc', [0, 2], 10)]
    """
    step_limit = budget.step_limit(start, lr_scale)
    final_limit = budget.final_limit(start)
    room = min(step_limit, final_limit - current)
    order = {path: k for k, path in enumerate(eigenvalues)}
    negative = sorted(
        (
            (value, path, i)
            for path, values in eigenvalues.items()
            for i, value in enumerate(values)
            if math.isfinite(value) and value < 0
        ),
        key=lambda e: (e[0], order[e[1]], e[2]),
    )
    selected: dict[str, list[int]] = {}
    used = 0
    for _, path, i in negative:
        if used + costs[path] <= room:
            selected.setdefault(path, []).append(i)
            used += costs[path]
    qualified = {path: sorted(idx) for path, idx in selected.items() if len(idx) >= min_neurons}
    threshold = max((eigenvalues[p][i] for p, idx in qualified.items() for i in idx), default=None)
    plans, added = [], 0
    for path in sorted(qualified, key=order.__getitem__):
        neurons = qualified[path]
        params = costs[path] * len(neurons)
        values = list(eigenvalues[path])
        reason = {
            "criterion": "splitting_min_eigenvalue",
            "linear": path,
            "eigenvalues": [values[i] for i in neurons],
            "layer_min_eigenvalue": min(values),
            "layer_negative": sum(v < 0 for v in values),
            "threshold": threshold,
            "min_neurons": min_neurons,
            "budget_before": current + added,
            "budget_after": current + added + params,
            "step_limit": step_limit,
            "final_limit": None if math.isinf(final_limit) else final_limit,
            "lr_scale": budget.lr_factor(lr_scale),
        }
        added += params
        plans.append(NeuronBranch(path, neurons, params, reason))
    return plans
