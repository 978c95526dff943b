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

Nothing is accepted on an unchecked assumption: the adapter refuses blocks whose zeroed copy is not an
identity (post-LayerNorm, a non-ReLU activation after the residual add), and with an example input
(``check_input=`` or :func:`verify_insertions`) every insertion is verified on a real forward pass (outputs
unchanged, every block runs) and undone when it fails. :func:`check_growable` does one such trial per
stack before training.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import operator
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.registry import BlockStack, StackChange, UnsupportedModelError, key_prefix, require_block_stacks
from ..events import AppliedChange, register_event_kind
from ..validation import check_int
from .ramp import advance_ramps, fold_ramps, ramp_traces

DEFAULT_TOLERANCE = 1e-5


class FunctionNotPreservedError(UnsupportedModelError):
    """An inserted block changed the model's outputs, or a block of the stack did not run; nothing was changed."""


@dataclass(frozen=True)
class _Check:
    example_input: Any
    tolerance: float


_ACTIVE_CHECK: contextvars.ContextVar[_Check | None] = contextvars.ContextVar("depthgrow_insert_check", default=None)


@contextlib.contextmanager
def verify_insertions(example_input: Any, tolerance: float = DEFAULT_TOLERANCE) -> Iterator[None]:
    """Within the block, every :func:`insert_identity_block` (also through ``apply_event``) is verified on
    ``example_input`` unless the call passes its own ``check_input``.

    Meant for callbacks that apply ``"insert_block"`` events: wrap the application, and an insertion that
    changes the model's outputs is undone and raises :class:`FunctionNotPreservedError`.

    Example:
        >>> import timm, torch
        >>> from lightning_depthgrow import ArchitectureEvent, apply_event
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> with verify_insertions(torch.randn(1, 3, 32, 32)):
        ...     _ = apply_event(vit, ArchitectureEvent("insert_block", {"stack": "blocks", "index": 1, "seed": 0}))
        >>> len(vit.blocks)
        3
    """
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    token = _ACTIVE_CHECK.set(_Check(example_input, float(tolerance)))
    try:
        yield
    finally:
        _ACTIVE_CHECK.reset(token)


def insert_identity_block(
    model: nn.Module,
    stack_path: str,
    after_index: int,
    seed: int | None = None,
    template_index: int | None = None,
    check_input: Any = None,
    tolerance: float | None = None,
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
        check_input: an input of ``model`` (called as ``model(*x)`` for a tuple or list, ``model(**x)`` for a
            dict, else ``model(x)``; tensors are moved to the model's device, floating-point ones cast to its
            dtype). If given (or set by
            :func:`verify_insertions`), the insertion is verified: in eval mode, without gradients and with
            the RNG seeded alike, the outputs after insertion equal those before within ``tolerance``
            (``max |after - before| <= tolerance * max(1, max |before|)`` over every output tensor; per-layer
            caches, hidden states and attentions are not compared) and every block of the stack runs.
            Otherwise the insertion is undone and :class:`FunctionNotPreservedError` is raised.
        tolerance: default ``1e-5`` (or the one given to :func:`verify_insertions`).

    Returns:
        The new block and an :class:`~lightning_depthgrow.events.AppliedChange` whose ``added`` pairs
        each new parameter with the template's parameter of the same name (so it joins that
        parameter's optimizer group, see :func:`~lightning_depthgrow.surgery.update_optimizer`).

    Raises:
        UnsupportedModelError: no block stack at ``stack_path``, no usable template, or the block's adapter
            refuses it (post-LayerNorm blocks, an activation after the residual add other than ReLU, ...).
        FunctionNotPreservedError: the verification failed.
        IndexError: ``after_index`` or ``template_index`` outside the stack.

    On any error the model is left as it was (container, config depth, ``layer_idx``, ``feature_info``).

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> before = vit(x)
        >>> block, change = insert_identity_block(vit, "blocks", after_index=1, seed=0, check_input=x)
        >>> len(vit.blocks), torch.equal(vit(x), before)
        (3, True)
    """
    stack = _find_stack(model, stack_path)
    after_index = _checked_index(after_index, len(stack), "after_index", stack)
    template_index = _resolve_template(stack, after_index, template_index)
    _check_container(stack)
    _check_refusals(stack, after_index, template_index)
    check = _active_check(check_input, tolerance)
    before = _run_checked(model, stack, check.example_input) if check is not None else None
    template = stack.container[template_index]
    block = _fresh_identity(stack, template, seed)
    twins = dict(template.named_parameters())
    added = [(param, twins[name]) for name, param in block.named_parameters()]

    position = after_index + 1
    feature_info = _feature_info_snapshot(model, stack.path)
    _insert_child(stack.container, position, block, stack.key_prefix or "")
    synced = False
    try:
        stack.notify_depth_change(model, StackChange("insert", position, template_index))
        synced = True
        _renumber_feature_info(model, stack.path, after_index, len(stack) - 1)
        if check is not None:
            _verify(model, stack, check, before, f"the block inserted after {stack.block_name(after_index)}")
    except BaseException:
        _remove_child(stack.container, position, stack.key_prefix or "")
        if synced:
            stack.notify_depth_change(model, StackChange("remove", position))
        _restore_feature_info(feature_info)
        raise
    return block, AppliedChange(added=added)


def remove_block(model: nn.Module, stack_path: str, index: int) -> nn.Module:
    """Remove block ``index`` of the stack at ``stack_path`` and keep the family's bookkeeping in step
    (container keys, Hugging Face config depth and ``layer_idx``, ``nn.TransformerEncoder.num_layers``).

    Returns the removed block. The inverse of :func:`insert_identity_block` (which uses it to undo a
    refused insertion); it does not preserve the function unless the block is an identity.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
        >>> _ = remove_block(vit, "blocks", 1)
        >>> len(vit.blocks)
        2
    """
    stack = _find_stack(model, stack_path)
    index = _checked_index(index, len(stack), "index", stack)
    _check_container(stack)
    if len(stack) == 1:
        raise UnsupportedModelError(f"stack {stack.path!r} has a single block; removing it would empty the stack.")
    feature_info = _feature_info_snapshot(model, stack.path)
    block = _remove_child(stack.container, index, stack.key_prefix or "")
    try:
        stack.notify_depth_change(model, StackChange("remove", index))
        _drop_feature_info(model, stack.path, index, len(stack) + 1)
    except BaseException:
        _insert_child(stack.container, index, block, stack.key_prefix or "")
        _restore_feature_info(feature_info)
        raise
    return block


def check_growable(
    model: nn.Module, example_input: Any = None, tolerance: float = DEFAULT_TOLERANCE, ramp_steps: int = 0
) -> dict[str, str | None]:
    """Which block stacks of ``model`` can grow, checked before training; the model is left unchanged.

    ``ramp_steps=0`` (zero-initialised blocks, :func:`insert_identity_block`): every stack is checked for a
    structural refusal (its adapter's, no shape-preserving template, keys not ``0..n-1``). With ``example_input``,
    one trial insertion per growable stack (after its last growable block, seed 0) is verified as in
    :func:`insert_identity_block` (outputs equal within ``tolerance``, every block of the stack runs) and then
    removed again.

    ``ramp_steps >= 1`` (ramped copies, :func:`~lightning_depthgrow.surgery.copy_block` and
    :func:`~lightning_depthgrow.surgery.stack_blocks` with ``ramp_steps``): a ramp ``x + a * (block(x) - x)`` is
    the identity at ``a = 0`` for *any* block that maps one tensor to a tensor of its shape, so the adapters'
    zero-init refusals (post-LayerNorm blocks, a non-ReLU activation after the residual add) do not apply; a stack
    still needs a shape-preserving block to copy and keys ``0..n-1``. With ``example_input`` the trial runs on a
    deep copy of ``model``: a ramped copy of each kind of block the stack would copy (the last position that copies
    it), verified at birth like a zero-init insertion (in eval mode: outputs within ``tolerance``, every block
    runs); then the ramps run to their end and are folded, and the fold must leave the outputs bitwise unchanged
    and the copies plain blocks (no ramp buffer or hook). A block that returns anything but one tensor of its
    input's shape (a tuple, another shape) cannot be ramped and its stack is refused with the reason.

    Returns:
        ``{stack path: None if it can grow, else the reason}``, in module order.

    Raises:
        UnsupportedModelError: there is no block stack, or no stack can grow; the message gives every
            stack's reason and what to do.

    Example:
        >>> import timm, torch
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> check_growable(vit, torch.randn(1, 3, 32, 32))
        {'blocks': None}
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)  # post-LayerNorm
        >>> encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> check_growable(encoder, torch.randn(2, 5, 16), ramp_steps=10)
        {'layers': None}
    """
    ramp_steps = check_int("ramp_steps", ramp_steps, minimum=0)
    stacks = require_block_stacks(model)
    result: dict[str, str | None] = {}
    for stack in stacks:
        if ramp_steps:
            # Only the structural reasons (keys, no shape-preserving template) hold for a ramp.
            reason = stack.growth_refusal() if stack.key_prefix is None or stack.template_index() is None else None
            if reason is None and example_input is not None:
                reason = _trial_ramped_copies(model, stack.path, ramp_steps, example_input, tolerance)
            result[stack.path] = reason
            continue
        reason = stack.growth_refusal()
        positions = stack.growable_positions()
        if reason is None and not positions:
            reason = f"stack {stack.path!r} ({stack.adapter.name}): {_first_refusal(stack)}"
        if reason is None and example_input is not None:
            reason = _trial_insertion(model, stack.path, positions[-1], example_input, tolerance)
        result[stack.path] = reason
    if all(reason is not None for reason in result.values()):
        raise UnsupportedModelError(
            f"No block stack of {type(model).__name__} can grow: " + " ".join(str(r) for r in result.values())
        )
    return result


def _first_refusal(stack: BlockStack) -> str:
    return next((r for r in map(stack.adapter.growth_refusal, stack.blocks) if r is not None), "no position found")


def _trial_insertion(model: nn.Module, path: str, after: int, example_input: Any, tolerance: float) -> str | None:
    try:
        insert_identity_block(model, path, after, seed=0, check_input=example_input, tolerance=tolerance)
    except UnsupportedModelError as err:
        return str(err)
    remove_block(model, path, after + 1)
    return None


#: What to do when a ramped copy (the identity at ``a = 0`` by construction) still moved the outputs.
RAMP_REMEDY = (
    "A ramp returns the block's input exactly at a = 0, so what moved lies outside the blocks' outputs: a block "
    "that modifies its input in place, or a model that reads its depth elsewhere (a config field, a scaling by "
    "the number of layers). Make the block's forward out-of-place, or register an adapter whose on_depth_change "
    "keeps that depth in step."
)


def _trial_ramped_copies(
    model: nn.Module, path: str, ramp_steps: int, example_input: Any, tolerance: float
) -> str | None:
    """Why ramped copies cannot grow stack ``path`` (tried on a deep copy of ``model``), or ``None``."""
    from .operators import copy_block  # operators builds on this module

    probe = copy.deepcopy(model)
    stack = _find_stack(probe, path)
    blocks = stack.blocks
    # One copy per kind of block the stack would copy, after the last position that copies it (as the zero-init
    # trial inserts after the last growable block): (position, template block).
    trials: dict[type, tuple[int, nn.Module]] = {}
    for position in range(len(blocks)):
        template = blocks[stack.template_index(near=position)]
        trials[type(template)] = (position, template)
    what = f"a ramped copy (ramp_steps={ramp_steps}) of each block type {sorted(t.__name__ for t in trials)}"
    copies: list[nn.Module] = []
    try:
        before = _run_checked(probe, stack, example_input)
        for position, template in sorted(trials.values(), key=lambda item: -item[0]):
            source = next(i for i, block in enumerate(stack.blocks) if block is template)
            copies.append(copy_block(probe, path, source, after_index=position, ramp_steps=ramp_steps)[0])
        _verify(probe, stack, _Check(example_input, tolerance), before, what, remedy=RAMP_REMEDY)
        advance_ramps(probe, ramp_steps)
        ended, _ = _run(probe, stack, example_input)
        fold_ramps(probe)
        folded, _ = _run(probe, stack, example_input)
    except UnsupportedModelError as err:
        return f"stack {path!r} ({stack.adapter.name}): {err}"
    except Exception as err:  # the forward of a copy: any failure is a reason, and there is nothing to undo
        return (
            f"stack {path!r} ({stack.adapter.name}): {what} failed in the forward pass of a trial copy of "
            f"{type(model).__name__}: {type(err).__name__}: {err}"
        )
    positions = {id(block): i for i, block in enumerate(stack.blocks)}
    left = [stack.block_name(positions[id(block)]) for block in copies if ramp_traces(block)]
    if left or any(not torch.equal(a, b) for a, b in zip(ended, folded)):
        return (
            f"stack {path!r} ({stack.adapter.name}): folding the ended ramps of {what} changed the outputs or left "
            f"ramps on {left}; the fold must be exact. Report this with the block type."
        )
    return None


def _active_check(check_input: Any, tolerance: float | None) -> _Check | None:
    active = _ACTIVE_CHECK.get()
    if check_input is None and active is None:
        return None
    if tolerance is None:
        tolerance = active.tolerance if active is not None else DEFAULT_TOLERANCE
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    return _Check(check_input if check_input is not None else active.example_input, float(tolerance))


def _check_refusals(stack: BlockStack, after_index: int, template_index: int) -> None:
    # The template must make an identity copy; the block before the new one must hand it an input on which
    # that copy is the identity (ResNet: a ReLU output).
    for index in dict.fromkeys((template_index, after_index)):
        reason = stack.adapter.growth_refusal(stack.container[index])
        if reason is not None:
            raise UnsupportedModelError(
                f"Cannot insert a block after {stack.block_name(after_index)}: {stack.block_name(index)} "
                f"({stack.adapter.name}): {reason}"
            )


# ---------------------------------------------------------------------------------------- verification


def _run_checked(model: nn.Module, stack: BlockStack, example_input: Any) -> list[torch.Tensor]:
    outputs, missing = _run(model, stack, example_input)
    if missing:
        raise FunctionNotPreservedError(
            f"Blocks {missing} of stack {stack.path!r} do not run when {type(model).__name__} is called on the "
            "example input, so growing this stack cannot be verified and its blocks would be measured and "
            "grown for nothing. Make every block of the stack run (e.g. a Hugging Face config whose "
            "num_hidden_layers is smaller than the layer list) before growing."
        )
    bad = [i for i, t in enumerate(outputs) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise FunctionNotPreservedError(
            f"{type(model).__name__}'s outputs {bad} on the example input are not finite (NaN or inf), so an "
            "insertion cannot be verified; the model has diverged. Fix the training (learning rate, precision) "
            "before growing."
        )
    return outputs


def _verify(
    model: nn.Module, stack: BlockStack, check: _Check, before: list[torch.Tensor], what: str, remedy: str | None = None
) -> None:
    """Refuse (:class:`FunctionNotPreservedError`) if a block of the stack did not run or the outputs moved;
    ``remedy`` says what to do about moved outputs (default: the zero-init advice)."""
    after, missing = _run(model, stack, check.example_input)
    if missing:
        raise FunctionNotPreservedError(
            f"After inserting {what}, blocks {missing} of stack {stack.path!r} do not run in the forward pass, "
            f"so the grown {type(model).__name__} is not the model it was; the insertion was undone. The model "
            "keeps its depth somewhere the adapter does not update: register an adapter with an "
            "on_depth_change that updates it."
        )
    if len(after) != len(before) or any(a.shape != b.shape for a, b in zip(after, before)):
        raise FunctionNotPreservedError(
            f"After inserting {what}, {type(model).__name__}'s outputs changed structure "
            f"({[tuple(t.shape) for t in before]} -> {[tuple(t.shape) for t in after]}); the insertion was undone."
        )
    worst, scale = 0.0, 1.0
    for a, b in zip(after, before):
        if a.is_floating_point() or a.is_complex():
            if b.numel():
                scale = max(scale, float(b.abs().max()))
                worst = max(worst, float((a - b).abs().max()))
        elif not torch.equal(a, b):
            worst = math.inf
    if not worst <= check.tolerance * scale:
        raise FunctionNotPreservedError(
            f"{what[:1].upper()}{what[1:]} of stack {stack.path!r} ({stack.adapter.name}) is not an identity: "
            f"{type(model).__name__}'s outputs moved by up to {worst:.3g} (allowed {check.tolerance:g} x "
            f"{scale:.3g}) on the example input, in eval mode; the insertion was undone. "
            + (remedy if remedy is not None else _zero_init_remedy(stack))
        )


def _zero_init_remedy(stack: BlockStack) -> str:
    return (
        f"Zeroing {stack.adapter.zero_names(stack.container[0])} does not silence the block. Register the block "
        "with zero_init naming the last operation of every residual branch, or grow it with ramped copies, "
        "DepthGrowth(operator='copy' or 'stack', ramp_steps >= 1) (lightning_depthgrow.surgery.ramp), which "
        "preserve the function for any shape-preserving block."
    )


def _run(model: nn.Module, stack: BlockStack, example_input: Any) -> tuple[list[torch.Tensor], list[str]]:
    """Outputs of ``model`` on ``example_input`` (eval mode, no grad, RNG seeded and restored, modes restored)
    and the names of the stack's blocks that did not run."""
    ran: set[int] = set()
    blocks = stack.blocks
    handles = [b.register_forward_pre_hook(lambda m, _a, i=i: ran.add(i)) for i, b in enumerate(blocks)]
    modes = {m: m.training for m in model.modules()}
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    fork_devices = [device.index or 0] if device.type != "cpu" else []
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=fork_devices, device_type=device.type):
            torch.manual_seed(0)
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            out = _call(model, _to_model(example_input, device, dtype))
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes.items():
            module.training = mode
    missing = [stack.block_name(i) for i in range(len(blocks)) if i not in ran]
    return _output_tensors(out), missing


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return model(*x)
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


def _to_model(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``x`` on the model's device; floating-point tensors in the model's dtype (a bf16 model, fp32 input)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)
    if isinstance(x, Mapping):
        return {k: _to_model(v, device, dtype) for k, v in x.items()}
    if type(x) in (tuple, list):
        return type(x)(_to_model(v, device, dtype) for v in x)
    return x


# Per-layer outputs change length with depth; they are not the model's function.
_PER_LAYER_KEYS = {"past_key_values", "cache", "hidden_states", "attentions", "cross_attentions"}


def _output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k, v in out.items() if k not in _PER_LAYER_KEYS for t in _output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


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
    if stack.key_prefix is None:
        keys = list(stack.container._modules)
        raise UnsupportedModelError(
            f"Stack {stack.path!r} names its blocks {keys[:8]}; only containers whose keys are 0..n-1 "
            "(nn.Sequential(*blocks), nn.ModuleList), optionally with a common prefix (encoder_layer_0, ...), "
            "can be grown."
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


def _insert_child(container: nn.Module, position: int, block: nn.Module, prefix: str | None = None) -> None:
    # Renumber in place rather than building a new container: the container object, its attributes,
    # hooks and every outside reference to it stay valid (nn.Sequential and nn.ModuleList alike).
    # ``prefix``: the keys' common prefix (torchvision's "encoder_layer_"); default: the container's own.
    children = list(container._modules.values())
    children.insert(position, block)
    _set_children(container, children, (key_prefix(container) or "") if prefix is None else prefix)


def _remove_child(container: nn.Module, position: int, prefix: str) -> nn.Module:
    children = list(container._modules.values())
    block = children.pop(position)
    _set_children(container, children, prefix)
    return block


def _set_children(container: nn.Module, children: list[nn.Module], prefix: str) -> None:
    container._modules.clear()
    container._modules.update(OrderedDict((f"{prefix}{i}", child) for i, child in enumerate(children)))


def _feature_info_list(model: nn.Module, stack_path: str) -> list | None:
    parent_path, _, attr = stack_path.rpartition(".")
    if not attr:
        return None
    parent = model.get_submodule(parent_path) if parent_path else model
    info = getattr(parent, "feature_info", None)
    return info if isinstance(info, list) and all(isinstance(entry, dict) for entry in info) else None


def _feature_info_snapshot(model: nn.Module, stack_path: str) -> tuple[list, list] | None:
    info = _feature_info_list(model, stack_path)
    return None if info is None else (info, copy.deepcopy(info))


def _restore_feature_info(snapshot: tuple[list, list] | None) -> None:
    if snapshot is not None:
        info, saved = snapshot
        info[:] = saved


def _feature_positions(model: nn.Module, stack_path: str, depth: int) -> tuple[list, str, list[int]] | None:
    """timm's ``feature_info`` list, the stack's attribute name and the entry of each block ``attr.i`` in it;
    ``None`` unless there is one entry per block, in order (whole-stage entries: ResNet, ConvNeXt)."""
    info = _feature_info_list(model, stack_path)
    attr = stack_path.rpartition(".")[2]
    if info is None:
        return None
    names = [entry.get("module") for entry in info]
    positions = [names.index(f"{attr}.{i}") if f"{attr}.{i}" in names else -1 for i in range(depth)]
    if -1 in positions or positions != sorted(positions):
        return None
    return info, attr, positions


def _drop_feature_info(model: nn.Module, stack_path: str, index: int, old_depth: int) -> None:
    """Inverse of :func:`_renumber_feature_info` for a removed block ``index``."""
    found = _feature_positions(model, stack_path, old_depth)
    if found is None:
        return
    info, attr, positions = found
    for i in range(index + 1, old_depth):
        info[positions[i]]["module"] = f"{attr}.{i - 1}"
    del info[positions[index]]


def _renumber_feature_info(model: nn.Module, stack_path: str, after_index: int, old_depth: int) -> None:
    """Keep timm's per-block ``feature_info`` (ViT: one entry ``blocks.i`` per block) in step with the stack.

    Entries that name whole stages (ResNet, ConvNeXt) are left alone.
    """
    found = _feature_positions(model, stack_path, old_depth)
    if found is None:
        return
    info, attr, positions = found
    for i in range(after_index + 1, old_depth):
        info[positions[i]]["module"] = f"{attr}.{i + 1}"
    new_entry = copy.deepcopy(info[positions[after_index]])
    new_entry["module"] = f"{attr}.{after_index + 1}"
    info.insert(positions[after_index] + 1, new_entry)


def _apply_insert_block(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    """Applier of ``"insert_block"`` events: ``{"stack": str, "index": int, "template": int, "seed": int}``.

    The insertion is verified on the input of :func:`verify_insertions` if one is active, else on the model's
    ``example_input_array`` (a LightningModule's) if it has one; so growth callbacks check every insertion.
    """
    missing = [key for key in ("stack", "index") if key not in spec]
    if missing:
        raise ValueError(f"insert_block event spec {spec} lacks {missing}; it needs 'stack' and 'index'.")
    example = None if _ACTIVE_CHECK.get() is not None else getattr(model, "example_input_array", None)
    _, change = insert_identity_block(
        model,
        spec["stack"],
        spec["index"],
        seed=spec.get("seed"),
        template_index=spec.get("template"),
        check_input=example,
    )
    return change


register_event_kind("insert_block", _apply_insert_block)
