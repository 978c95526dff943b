"""Depth growth: insert a fresh, identity-initialised residual block into a stack of blocks.

The new block is a re-initialised copy of a shape-preserving *template* block of the same stack (same
configuration, drop-path rate, device, dtype and train/eval mode) whose residual branches are
silenced by the block's adapter (last projection, LayerScale gamma or last norm set to zero), so the
model computes exactly the same function right after growth. Training then moves the zeroed
parameters away from zero and the block starts to contribute.

The change is registered as the ``"insert_block"`` event kind: an event
``ArchitectureEvent("insert_block", {"stack": "blocks", "index": 3, "template": 3, "seed": 7})``
inserts a block right after ``blocks.3``; replaying it on the same starting model gives identical
weights.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..adapters.registry import BlockStack, UnsupportedModelError, require_block_stacks
from ..events import AppliedChange, register_event_kind


def insert_identity_block(
    model: nn.Module,
    stack_path: str,
    after_index: int,
    seed: int | None = None,
    template_index: int | None = None,
) -> tuple[nn.Module, AppliedChange]:
    """Insert an identity-initialised block right after block ``after_index`` of the stack at ``stack_path``.

    Args:
        model: the model to grow, in place.
        stack_path: dotted name of the block container (``"blocks"``, ``"layer3"``, ``"stages.2.blocks"``),
            as listed by :func:`lightning_depthgrow.find_block_stacks`.
        after_index: the new block becomes block ``after_index + 1``; ``len(stack) - 1`` appends.
        seed: if given, the fresh weights are drawn from ``torch.manual_seed(seed)`` inside a forked RNG,
            so the caller's RNG state is untouched and the same call always gives the same weights.
        template_index: the block to copy the configuration of; default: the shape-preserving block
            nearest to ``after_index``.

    Returns:
        The new block and an :class:`~lightning_depthgrow.events.AppliedChange` whose ``added`` pairs
        each new parameter with the template's parameter of the same name (so it joins that
        parameter's optimizer group, see :func:`~lightning_depthgrow.surgery.update_optimizer`).

    Raises:
        UnsupportedModelError: no block stack at ``stack_path`` or no usable template.
        IndexError: ``after_index`` or ``template_index`` outside the stack.

    Everything is validated before the model is touched: on error the model is unchanged.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> before = vit(x)
        >>> block, change = insert_identity_block(vit, "blocks", after_index=1, seed=0)
        >>> len(vit.blocks), torch.equal(vit(x), before)
        (3, True)
    """
    stack = _find_stack(model, stack_path)
    after_index = _checked_index(after_index, len(stack), "after_index", stack)
    template_index = _resolve_template(stack, after_index, template_index)
    _check_container(stack)
    template = stack.container[template_index]
    block = _fresh_identity(stack, template, seed)
    twins = dict(template.named_parameters())
    added = [(param, twins[name]) for name, param in block.named_parameters()]

    old_depth = len(stack)
    _insert_child(stack.container, after_index + 1, block)
    _renumber_feature_info(model, stack.path, after_index, old_depth)
    return block, AppliedChange(added=added)


def _find_stack(model: nn.Module, path: str) -> BlockStack:
    stacks = require_block_stacks(model)
    for stack in stacks:
        if stack.path == path:
            return stack
    raise UnsupportedModelError(
        f"No block stack at {path!r} in {type(model).__name__}; stacks present (path, depth): "
        f"{[(s.path, len(s)) for s in stacks]}. Pass one of these paths."
    )


def _checked_index(index: Any, size: int, what: str, stack: BlockStack) -> int:
    try:
        value = operator.index(index)
    except TypeError as err:
        raise TypeError(f"{what} must be an int, got {type(index).__name__} {index!r}") from err
    if isinstance(index, bool) or not 0 <= value < size:
        raise IndexError(
            f"{what}={index!r} is out of range for stack {stack.path!r} with {size} blocks; "
            f"valid values are 0..{size - 1}."
        )
    return value


def _resolve_template(stack: BlockStack, after_index: int, template_index: int | None) -> int:
    blocks = stack.blocks
    if template_index is None:
        found = stack.template_index(near=after_index)
        if found is None:
            raise UnsupportedModelError(
                f"Stack {stack.path!r} ({stack.adapter.name}, {len(blocks)} blocks) has no shape-preserving "
                "block to copy: every block changes its input's shape (stride or channels). Grow a stack "
                "with at least one block that keeps the shape, or register an adapter whose "
                "is_shape_preserving accepts one."
            )
        template_index = found
    template_index = _checked_index(template_index, len(blocks), "template_index", stack)
    if not stack.adapter.shape_preserving(blocks[template_index]):
        raise UnsupportedModelError(
            f"Template {stack.block_name(template_index)} changes the shape of its input (stride or channels), "
            f"so an identity copy of it cannot be inserted; pick a shape-preserving block of {stack.path!r}."
        )
    # The new block sees block ``after_index``'s output; it matches the template's input only when no
    # shape-changing block lies between the two positions.
    low, high = sorted((template_index, after_index))
    changing = [i for i in range(low + 1, high + 1) if not stack.adapter.shape_preserving(blocks[i])]
    if changing:
        raise UnsupportedModelError(
            f"Cannot insert after {stack.block_name(after_index)} using template "
            f"{stack.block_name(template_index)}: block(s) {[stack.block_name(i) for i in changing]} between "
            "them change the feature shape. Choose a template within the same stage."
        )
    return template_index


def _check_container(stack: BlockStack) -> None:
    keys = list(stack.container._modules)
    if keys != [str(i) for i in range(len(keys))]:
        raise UnsupportedModelError(
            f"Stack {stack.path!r} names its blocks {keys[:8]}; only containers indexed 0..n-1 "
            "(nn.Sequential(*blocks) or nn.ModuleList) can be grown."
        )


def _fresh_identity(stack: BlockStack, template: nn.Module, seed: int | None) -> nn.Module:
    if seed is None:
        return stack.adapter.make_identity(template)
    device_types = {t.device.type for t in _tensors(template)} - {"cpu"}
    device_type = next(iter(sorted(device_types)), "cuda")
    devices = sorted({t.device.index or 0 for t in _tensors(template) if t.device.type == device_type})
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        return stack.adapter.make_identity(template)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _insert_child(container: nn.Module, position: int, block: nn.Module) -> None:
    # Renumber in place rather than building a new container: the container object, its attributes,
    # hooks and every outside reference to it stay valid (nn.Sequential and nn.ModuleList alike).
    children = list(container._modules.values())
    children.insert(position, block)
    container._modules.clear()
    container._modules.update(OrderedDict((str(i), child) for i, child in enumerate(children)))


def _renumber_feature_info(model: nn.Module, stack_path: str, after_index: int, old_depth: int) -> None:
    """Keep timm's per-block ``feature_info`` (ViT: one entry ``blocks.i`` per block) in step with the stack.

    Entries that name whole stages (ResNet, ConvNeXt) are left alone.
    """
    parent_path, _, attr = stack_path.rpartition(".")
    if not attr:
        return
    parent = model.get_submodule(parent_path) if parent_path else model
    info = getattr(parent, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(entry, dict) for entry in info):
        return
    names = [entry.get("module") for entry in info]
    positions = [names.index(f"{attr}.{i}") if f"{attr}.{i}" in names else -1 for i in range(old_depth)]
    if -1 in positions or positions != sorted(positions):
        return
    for i in range(after_index + 1, old_depth):
        info[positions[i]]["module"] = f"{attr}.{i + 1}"
    new_entry = copy.deepcopy(info[positions[after_index]])
    new_entry["module"] = f"{attr}.{after_index + 1}"
    info.insert(positions[after_index] + 1, new_entry)


def _apply_insert_block(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    """Applier of ``"insert_block"`` events: ``{"stack": str, "index": int, "template": int, "seed": int}``."""
    missing = [key for key in ("stack", "index") if key not in spec]
    if missing:
        raise ValueError(f"insert_block event spec {spec} lacks {missing}; it needs 'stack' and 'index'.")
    _, change = insert_identity_block(
        model,
        spec["stack"],
        spec["index"],
        seed=spec.get("seed"),
        template_index=spec.get("template"),
    )
    return change


register_event_kind("insert_block", _apply_insert_block)
