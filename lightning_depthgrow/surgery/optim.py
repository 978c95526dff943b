"""Bring any ``torch.optim.Optimizer`` (and its LR schedulers) in line with a changed parameter set.

Works by parameter identity, like Composer's surgery: new parameters join their twin's param group
(so weight-decay splits and per-group learning rates hold) with fresh state, or a copy of the twin's state
when the change says so (``AppliedChange.copy_state``); replaced parameters take
their predecessor's slot and a sliced copy of its state (Adam moments, momentum; scalar ``step``
kept; divided by the rescaling of a parameter whose values were also rescaled, ``AppliedChange.rescaled``);
removed parameters leave with their state. Finally every group is ordered as the model orders
its parameters, so a checkpoint of the grown optimizer lines up with the optimizer a resumed run
builds from the regrown model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..events import AppliedChange


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict[str, Any] | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _slice_state_value(value: Any, old: Tensor, index: tuple[Tensor | None, ...]) -> Any:
    if not isinstance(value, Tensor) or value.shape != old.shape:
        return value  # scalars such as Adam's ``step`` are kept as they are
    for dim, keep in enumerate(index):
        if keep is not None:
            value = value.index_select(dim, keep.to(value.device))
    return value.clone()


# Optimizer state that is linear / quadratic in the gradient, for the optimizers whose state keys mean that.
_LINEAR_STATE = ("exp_avg", "momentum_buffer")
_SQUARED_STATE = ("exp_avg_sq", "max_exp_avg_sq")
_RESCALABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.NAdam, torch.optim.RAdam)


def _rescale_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], param: Tensor, factor: Tensor) -> None:
    """Bring ``param``'s state in line with values multiplied by ``factor``: gradients are divided by it."""
    if not isinstance(optimizer, _RESCALABLE):
        if any(isinstance(v, Tensor) and v.shape == param.shape for v in state.values()):
            warnings.warn(
                f"{type(optimizer).__name__}'s state of a rescaled parameter of shape {tuple(param.shape)} is kept "
                "as sliced, not rescaled (rescaling is known for Adam, AdamW, NAdam, RAdam and SGD)",
                UserWarning,
                stacklevel=3,
            )
        return
    for key, power in [(k, 1) for k in _LINEAR_STATE] + [(k, 2) for k in _SQUARED_STATE]:
        value = state.get(key)
        if isinstance(value, Tensor) and value.shape == param.shape:
            state[key] = value / factor.to(value) ** power


def update_optimizer(
    optimizer: torch.optim.Optimizer,
    change: AppliedChange,
    model: nn.Module | None = None,
) -> None:
    """Apply ``change`` to ``optimizer`` in place.

    Parameters the optimizer never held (frozen twins, parameters of another optimizer) are skipped:
    with several optimizers each takes only what concerns it. Everything is checked before anything
    is modified. If ``model`` is given, each group's parameters are then ordered as in
    ``model.parameters()``.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
        >>> extra = nn.Parameter(torch.zeros(2))
        >>> update_optimizer(opt, AppliedChange(added=[(extra, lin.bias)]))
        >>> any(p is extra for p in opt.param_groups[0]["params"])
        True
    """
    added = [(new, _group_of(optimizer, twin)) for new, twin in change.added if twin is not None]
    orphans = [new for new, twin in change.added if twin is None]
    if orphans and change.new_group is None:
        raise ValueError(
            f"{len(orphans)} new parameter(s) have no twin and no explicit param group; an applier must "
            "name a twin or a new_group for every parameter it adds."
        )
    replaced = [(old, new, idx, _group_of(optimizer, old)) for old, new, idx in change.replaced]
    for old, new, idx, _ in replaced:
        if len(idx) > old.dim():
            raise ValueError(f"index with {len(idx)} dims for a parameter of shape {tuple(old.shape)}")
        expected = [len(k) if k is not None else s for k, s in zip(idx, old.shape)] + list(old.shape[len(idx) :])
        if list(new.shape) != expected:
            raise ValueError(f"replacement of shape {tuple(new.shape)} does not match kept index {expected}")

    for new, group in added:
        if group is not None:
            group["params"].append(new)
    if change.copy_state:
        copy_twin_state(optimizer, change.added)
    rescaled = {id(new): factor for new, factor in change.rescaled}
    for old, new, idx, group in replaced:
        if group is None:
            continue
        group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            state = optimizer.state.pop(old)
            optimizer.state[new] = {k: _slice_state_value(v, old, idx) for k, v in state.items()}
            if id(new) in rescaled:
                _rescale_state(optimizer, optimizer.state[new], new, rescaled[id(new)])
    removed = {id(p) for p in change.removed}
    if removed:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in removed]
        for p in change.removed:
            optimizer.state.pop(p, None)
    if change.new_group is not None:
        params, options = change.new_group
        optimizer.add_param_group({"params": list(params), **options})
    if model is not None:
        order_like_model(optimizer, model.parameters())


def copy_twin_state(optimizer: torch.optim.Optimizer, pairs: Iterable[tuple[Tensor, Tensor | None]]) -> int:
    """Give each new parameter of ``(new, twin)`` a copy of its twin's optimizer state; return how many.

    Parameters whose twin has no state yet (before the first step, or a frozen twin) or another shape keep
    fresh state.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
        >>> lin(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> extra = nn.Parameter(lin.bias.detach().clone())
        >>> update_optimizer(opt, AppliedChange(added=[(extra, lin.bias)], copy_state=True))
        >>> torch.equal(opt.state[extra]["exp_avg"], opt.state[lin.bias]["exp_avg"])
        True
    """
    copied = 0
    for new, twin in pairs:
        state = optimizer.state.get(twin) if twin is not None else None
        if not state or twin.shape != new.shape:
            continue
        optimizer.state[new] = {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()}
        copied += 1
    return copied


def order_like_model(optimizer: torch.optim.Optimizer, model_params: Iterable[Tensor]) -> None:
    """Sort each group's parameters by their position in ``model_params`` (others keep theirs, last)."""
    rank = {id(p): i for i, p in enumerate(model_params)}
    for group in optimizer.param_groups:
        # Positions by enumeration: list.index would compare tensors with ``==`` (elementwise).
        ordered = sorted(enumerate(group["params"]), key=lambda item: rank.get(id(item[1]), len(rank) + item[0]))
        group["params"] = [p for _, p in ordered]


def sync_schedulers(schedulers: Iterable[Any], optimizer: torch.optim.Optimizer) -> None:
    """Let LR schedulers drive param groups added after they were built.

    torch schedulers keep one ``base_lr`` per group from construction time and silently ignore later
    groups (pytorch issues 79888, 20997); append the new groups' initial lr so they are driven too.
    """
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is not optimizer or not hasattr(scheduler, "base_lrs"):
            continue
        new_groups = optimizer.param_groups[len(scheduler.base_lrs) :]
        lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR, MultiplicativeLR: one function per group
        if new_groups and lambdas is not None:
            if any(f is not lambdas[0] for f in lambdas):
                raise ValueError(
                    f"{type(scheduler).__name__} was built with one lr_lambda per param group, so the schedule of "
                    "a group added later is unknown; build it with a single lr_lambda shared by all groups."
                )
            lambdas.extend([lambdas[0]] * len(new_groups))
        for group in new_groups:
            group.setdefault("initial_lr", group["lr"])
            scheduler.base_lrs.append(group["initial_lr"])
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr.append(group["lr"])
