"""Depth-growth operators beyond the identity block: copies, whole-stack stacking, random init, all rampable.

- :func:`copy_block`: the new block is a copy of a trained block of the stack (its neighbour by default).
- :func:`stack_blocks`: G_stack / progressive stacking (Du et al., NeurIPS 2024; Gong et al., 2019): the whole
  stack is duplicated in one step, ``[b0, b1] -> [b0, b1, b0', b1']`` (``order="stack"``) or
  ``[b0, b0', b1, b1']`` (``order="interleave"``).
- :func:`insert_random_block`: a freshly initialised block (the family's init, nothing zeroed).

A copy without a ramp is **not** function-preserving: the grown network computes what the duplicated network
computes (a block applied twice), which can cost accuracy right after growth on short schedules. With
``ramp_steps=N`` every new block enters through a residual ramp (:mod:`.ramp`): it is the identity at birth for
any block type and becomes itself over ``N`` optimizer steps; advance with
:func:`~lightning_depthgrow.surgery.ramp.advance_ramps`, fold with
:func:`~lightning_depthgrow.surgery.ramp.fold_ramps`.

Every operator validates before it touches the model, and returns an
:class:`~lightning_depthgrow.events.AppliedChange` pairing each new parameter with its source's parameter, so
:func:`~lightning_depthgrow.surgery.update_optimizer` puts it in the source's param group (fresh state);
:func:`copy_optimizer_state` copies the source's state instead. Each operator is an event kind, so an event log
replays it (resume, ``load_grown``):

====================== ================================================================================
kind                   spec
====================== ================================================================================
``copy_block``         ``{"stack", "source", "index", "ramp_steps"}``: copy of ``source`` after ``index``
``stack_blocks``       ``{"stack", "factor", "order", "ramp_steps"}``, and ``"start"`` (default 0) to stack a tail
``insert_random_block`` ``{"stack", "index", "template", "seed", "ramp_steps"}``
``fold_ramps``         ``{"blocks": [names]}``: remove ended ramps (recorded when they end)
====================== ================================================================================

``copy_block`` and ``stack_blocks`` take ``"optimizer_state"``: ``"fresh"`` (default, also when absent) or
``"copy"``: the change then carries ``copy_state``, and the optimizer sync
(:func:`~lightning_depthgrow.surgery.update_optimizer`) gives each copy its source's optimizer state (Adam moments,
``step``), on every rank alike. A resumed run loads that state with the checkpoint's optimizer.

A ramp's progress is not part of the event: it is a buffer in the model's ``state_dict``, restored with the
weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..adapters.registry import BlockStack, StackChange, UnsupportedModelError
from ..events import AppliedChange, register_event_kind
from ..validation import check_choice, check_int
from .growth import (
    _check_container,
    _checked_index,
    _feature_info_snapshot,
    _find_stack,
    _insert_child,
    _remove_child,
    _renumber_feature_info,
    _restore_feature_info,
    _tensors,
)
from .optim import copy_twin_state
from .ramp import attach_ramp, fold_ramps, is_ramped

STACK_ORDERS = ("stack", "interleave")
#: The optimizer state a copied block starts with (``"optimizer_state"`` of ``copy_block``/``stack_blocks`` events).
OPTIMIZER_STATES = ("fresh", "copy")


def copy_block(
    model: nn.Module,
    stack_path: str,
    source: int,
    after_index: int | None = None,
    ramp_steps: int = 0,
) -> tuple[nn.Module, AppliedChange]:
    """Insert a copy of block ``source`` right after block ``after_index`` (default: right after ``source``).

    Args:
        model: the model to grow, in place.
        stack_path: the block container's dotted name (see :func:`lightning_depthgrow.find_block_stacks`).
        source: index of the block to copy (weights, buffers, train/eval mode).
        after_index: the copy becomes block ``after_index + 1``.
        ramp_steps: ``0``: no ramp (the copy acts at once; not function-preserving); ``N >= 1``: the copy enters
            through a residual ramp over ``N`` steps (function-preserving at birth).

    Returns:
        The new block and the change (each new parameter paired with the source's parameter of the same name).

    Example:
        >>> from lightning_depthgrow.adapters.registry import register_block, unregister_block
        >>> class Res(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.norm(x + self.fc(x))  # post-norm: zero-init cannot silence it
        >>> _ = register_block(Res, zero_init=["fc"])
        >>> net = nn.Sequential(Res(), Res())
        >>> x = torch.randn(2, 4)
        >>> before = net(x)
        >>> block, change = copy_block(net, "", source=1, ramp_steps=4)
        >>> len(net), torch.equal(net(x), before)
        (3, True)
        >>> unregister_block(Res)
    """
    stack = _find_stack(model, stack_path)
    source = _checked_index(source, len(stack), "source", stack)
    after_index = source if after_index is None else _checked_index(after_index, len(stack), "after_index", stack)
    ramp_steps = check_int("ramp_steps", ramp_steps, minimum=0)
    _check_container(stack)
    _check_copyable(stack, [source], after_index)
    block, change = _copy_of(stack.container[source], ramp_steps)
    _insert_tracked(model, stack, [(after_index + 1, block, source)])
    return block, change


def stack_blocks(
    model: nn.Module,
    stack_path: str,
    factor: int = 2,
    order: str = "stack",
    ramp_steps: int = 0,
    start: int = 0,
) -> tuple[list[nn.Module], AppliedChange]:
    """Grow the stack ``factor`` times deeper by copying all its blocks (G_stack's depthwise stacking).

    ``order="stack"`` appends ``factor - 1`` copies of the whole stack in order
    (``[b0, b1] -> [b0, b1, b0', b1']``); ``order="interleave"`` puts the copies of each block right after it
    (``[b0, b0', b1, b1']``). ``ramp_steps`` as in :func:`copy_block`. ``start`` stacks only the blocks from
    ``start`` on (the stack's tail): for a stage whose first block changes the shape (a ResNet stage that
    downsamples), ``start=1`` gives ``[d, b1] -> [d, b1, b1']``, the usual way to deepen such a stage; the tail is
    then ``factor`` times deeper.

    Example:
        >>> from lightning_depthgrow.adapters.registry import register_block, unregister_block
        >>> class Res(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> _ = register_block(Res, zero_init=["fc"])
        >>> net = nn.Sequential(Res(), Res())
        >>> first, second = net[0], net[1]
        >>> new, change = stack_blocks(net, "", factor=2)
        >>> [net[0] is first, net[1] is second, torch.equal(net[2].fc.weight, first.fc.weight)]
        [True, True, True]
        >>> unregister_block(Res)
    """
    stack = _find_stack(model, stack_path)
    factor = check_int("factor", factor, minimum=2)
    order = check_choice("order", order, STACK_ORDERS)
    ramp_steps = check_int("ramp_steps", ramp_steps, minimum=0)
    _check_container(stack)
    depth = len(stack)
    start = check_int("start", start, minimum=0)
    if start >= depth:
        raise ValueError(f"start={start}: {stack.path!r} has {depth} blocks, so no block from {start} on to stack.")
    _check_copyable(stack, list(range(start, depth)), None)
    tail = depth - start
    originals = stack.blocks[start:]
    copies = [[_copy_of(block, ramp_steps) for _ in range(factor - 1)] for block in originals]
    # One insertion at a time, in increasing position, so the family's bookkeeping (HF config depth and
    # ``layer_idx``, ``nn.TransformerEncoder.num_layers``) follows each step: (position, block, template now).
    if order == "stack":
        inserts = [(depth + k * tail + j, copies[j][k][0], start + j) for k in range(factor - 1) for j in range(tail)]
    else:
        inserts = [
            (start + j * factor + k + 1, copies[j][k][0], start + j * factor)
            for j in range(tail)
            for k in range(factor - 1)
        ]
    _insert_tracked(model, stack, inserts)
    change = AppliedChange(added=[pair for per_block in copies for _, c in per_block for pair in c.added])
    return [c[0] for per_block in copies for c in per_block], change


def insert_random_block(
    model: nn.Module,
    stack_path: str,
    after_index: int,
    seed: int | None = None,
    template_index: int | None = None,
    ramp_steps: int = 0,
) -> tuple[nn.Module, AppliedChange]:
    """Insert a freshly initialised block (the family's init, nothing zeroed) after block ``after_index``.

    ``template_index`` (default: ``after_index``) gives the configuration; ``seed`` fixes the weights (forked
    RNG: the caller's RNG state is untouched). Without a ramp the new block changes the function; with
    ``ramp_steps >= 1`` it is the identity at birth.
    """
    stack = _find_stack(model, stack_path)
    after_index = _checked_index(after_index, len(stack), "after_index", stack)
    template_index = after_index if template_index is None else template_index
    template_index = _checked_index(template_index, len(stack), "template_index", stack)
    ramp_steps = check_int("ramp_steps", ramp_steps, minimum=0)
    _check_container(stack)
    _check_copyable(stack, [template_index], after_index)
    template = stack.container[template_index]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(check_int("seed", seed))
        block = copy.deepcopy(template)
        for module in block.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if stack.adapter.init_fn is not None:
                stack.adapter.init_fn(module)
    if ramp_steps:
        attach_ramp(block, ramp_steps)
    twins = dict(template.named_parameters())
    change = AppliedChange(added=[(p, twins[n]) for n, p in block.named_parameters()], buffers_changed=True)
    _insert_tracked(model, stack, [(after_index + 1, block, template_index)])
    return block, change


def copy_optimizer_state(optimizer: torch.optim.Optimizer, change: AppliedChange) -> int:
    """Give each new parameter a copy of its twin's optimizer state (Adam moments, ``step``); return how many.

    Call after :func:`~lightning_depthgrow.surgery.update_optimizer` put the new parameters in their groups.
    Parameters whose twin has no state yet (or a different shape) keep fresh state. Inside a Trainer, put
    ``"optimizer_state": "copy"`` in a ``copy_block``/``stack_blocks`` event's spec instead
    (``DepthGrowth(optimizer_state="copy")``): the change then carries ``copy_state`` and the optimizer sync copies
    the state itself.
    """
    return copy_twin_state(optimizer, change.added)


def _copy_of(block: nn.Module, ramp_steps: int) -> tuple[nn.Module, AppliedChange]:
    new = copy.deepcopy(block)
    if is_ramped(new):
        raise UnsupportedModelError(
            f"Cannot copy a {type(block).__name__} that is still ramping in; fold its ramp (fold_ramps) first."
        )
    if ramp_steps:
        attach_ramp(new, ramp_steps)
    twins = dict(block.named_parameters())
    return new, AppliedChange(added=[(p, twins[n]) for n, p in new.named_parameters()], buffers_changed=True)


def _insert_tracked(model: nn.Module, stack: BlockStack, inserts: list[tuple[int, nn.Module, int]]) -> None:
    """Insert ``(position, block, template)`` one by one (positions in the stack as it is at that moment), each
    followed by the family's bookkeeping (:meth:`BlockStack.notify_depth_change`, timm's per-block
    ``feature_info`` as :func:`~lightning_depthgrow.surgery.insert_identity_block` keeps it); all undone if one
    fails."""
    prefix = stack.key_prefix or ""
    done: list[tuple[int, bool]] = []
    feature_info = _feature_info_snapshot(model, stack.path)
    try:
        for position, block, template in inserts:
            _insert_child(stack.container, position, block, prefix)
            done.append((position, False))
            stack.notify_depth_change(model, StackChange("insert", position, template))
            done[-1] = (position, True)
            # Copies never go first (position >= 1): the new entry follows its predecessor's.
            _renumber_feature_info(model, stack.path, position - 1, len(stack) - 1)
    except BaseException:
        for position, synced in reversed(done):
            _remove_child(stack.container, position, prefix)
            if synced:
                stack.notify_depth_change(model, StackChange("remove", position))
        _restore_feature_info(feature_info)
        raise


def _check_copyable(stack: BlockStack, sources: list[int], after_index: int | None) -> None:
    for i in sources:
        block = stack.container[i]
        if not stack.adapter.shape_preserving(block):
            raise UnsupportedModelError(
                f"{stack.block_name(i)} changes the shape of its input (stride or channels), so a copy of it "
                "cannot follow it; copy shape-preserving blocks only."
            )
        if is_ramped(block):
            raise UnsupportedModelError(
                f"{stack.block_name(i)} is still ramping in; fold its ramp (fold_ramps) before copying it."
            )
    if after_index is not None:
        low, high = sorted((min(sources), after_index))
        changing = [j for j in range(low + 1, high + 1) if not stack.adapter.shape_preserving(stack.container[j])]
        if changing:
            raise UnsupportedModelError(
                f"Cannot put a copy of {stack.block_name(sources[0])} after {stack.block_name(after_index)}: "
                f"block(s) {[stack.block_name(j) for j in changing]} between them change the feature shape."
            )
    if any(t.is_meta for i in sources for t in _tensors(stack.container[i])):
        raise UnsupportedModelError(f"{stack.path!r} holds meta tensors; materialise the model before growing it.")


def _copies_state(spec: dict[str, Any]) -> bool:
    """Whether a copy event's new parameters take their source's optimizer state (checked before any surgery)."""
    return check_choice("optimizer_state", spec.get("optimizer_state", "fresh"), OPTIMIZER_STATES) == "copy"


def _apply_copy_block(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    copy_state = _copies_state(spec)
    change = copy_block(model, spec["stack"], spec["source"], spec.get("index"), spec.get("ramp_steps", 0))[1]
    change.copy_state = copy_state
    return change


def _apply_stack_blocks(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    copy_state = _copies_state(spec)
    change = stack_blocks(
        model,
        spec["stack"],
        spec.get("factor", 2),
        spec.get("order", "stack"),
        spec.get("ramp_steps", 0),
        spec.get("start", 0),
    )[1]
    change.copy_state = copy_state
    return change


def _apply_insert_random_block(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    return insert_random_block(
        model, spec["stack"], spec["index"], spec.get("seed"), spec.get("template"), spec.get("ramp_steps", 0)
    )[1]


def _apply_fold_ramps(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    fold_ramps(model, list(spec["blocks"]))
    return AppliedChange(buffers_changed=True)


register_event_kind("copy_block", _apply_copy_block)
register_event_kind("stack_blocks", _apply_stack_blocks)
register_event_kind("insert_random_block", _apply_insert_random_block)
register_event_kind("fold_ramps", _apply_fold_ramps)
