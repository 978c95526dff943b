"""Residual ramps: let a new block enter as ``x + a * (block(x) - x)``, ``a`` rising from 0 to 1.

A ramp makes *any* shape-preserving block function-preserving at birth, whatever its weights (a trained copy,
a random init, a post-LayerNorm block ``LN(x + f(x))`` that zero-init cannot silence, a ResNet block ending in a
non-ReLU activation): at ``a = 0`` the block returns its input exactly; as ``a`` rises it blends into the block's
own output, which it returns exactly at ``a = 1`` (masked structural growth, MSG, ICLR 2024, at block level).

The ramp lives *on the block itself*, not in a wrapper module, so the block keeps its type, its name in the
stack and its parameter names, and every tool that finds block stacks by type (growth, curvature, DMS) still
sees it:

- a persistent ``int64`` buffer ``depthgrow_ramp = [step, steps]`` holds the ramp's state, so it is saved in
  ``state_dict`` / checkpoints (resume mid-ramp is bitwise), broadcast by DDP with the other buffers and
  never cast by ``.to(dtype)``;
- a forward hook returns ``torch.lerp(x, block(x), step / steps)``; ``torch.lerp`` is exact at both ends
  (``x`` at weight 0, ``block(x)`` at weight 1).

:func:`advance_ramps` moves every ramp one step (call it once per optimizer step), and :func:`fold_ramps`
removes the buffer and the hook from blocks whose ramp has ended: the folded model computes bitwise the same
function and carries no trace of the ramp (``state_dict`` keys, pickling and export as before).

Example:
    >>> import torch
    >>> from torch import nn
    >>> block = nn.Linear(4, 4)
    >>> x = torch.randn(2, 4)
    >>> attach_ramp(block, steps=2)
    >>> torch.equal(block(x), x), ramp_weight(block)
    (True, 0.0)
    >>> advance_ramps(block), ramp_weight(block)
    ([], 0.5)
    >>> advance_ramps(block), ramp_weight(block)
    ([''], 1.0)
    >>> fold_ramps(block), is_ramped(block)
    ([''], False)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..validation import check_int

RAMP_BUFFER = "depthgrow_ramp"


def _ramp_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
    state = module._buffers[RAMP_BUFFER]
    x = args[0] if args else None
    if isinstance(x, Tensor) and isinstance(output, Tensor) and (x.is_nested or output.is_nested):
        return _nested_lerp(module, state, x, output)
    if not isinstance(output, Tensor) or not isinstance(x, Tensor) or output.shape != x.shape:
        got = "no positional input" if x is None else f"input {getattr(x, 'shape', type(x).__name__)}"
        raise RuntimeError(
            f"A ramped {type(module).__name__} must map one tensor to a tensor of the same shape; got {got} and "
            f"output {getattr(output, 'shape', type(output).__name__)}. A ramp blends the block's output with its "
            "positional input (x + a * (block(x) - x)), so only shape-preserving blocks that take their input "
            "positionally and return one tensor can be ramped (not a tuple, as the Hugging Face layers of older "
            "transformers releases return): grow such a block with zero-initialised blocks "
            "(DepthGrowth(operator='zero_init')) where its adapter allows, or wrap it so it maps one tensor to one "
            "tensor."
        )
    # step / steps in float64 first: the weight is the exact fraction rounded once to the output's dtype.
    weight = (state[0].double() / state[1]).clamp(max=1.0).to(output.dtype)
    return torch.lerp(x.to(output.dtype), output, weight)


def _nested_lerp(module: nn.Module, state: Tensor, x: Tensor, output: Tensor) -> Tensor:
    """The ramp on nested tensors (``nn.TransformerEncoder`` packs a padded batch into one in eval mode without
    gradients, ``enable_nested_tensor=True``): ``torch.lerp`` per component, exact at both ends as on a tensor."""
    xs = x.unbind() if x.is_nested else None
    outs = output.unbind() if output.is_nested else None
    if xs is None or outs is None or [t.shape for t in xs] != [t.shape for t in outs]:
        raise RuntimeError(
            f"A ramped {type(module).__name__} must map a nested tensor to a nested tensor of the same component "
            f"shapes; got {'a nested tensor' if x.is_nested else 'a tensor'} in and "
            f"{'a nested tensor' if output.is_nested else 'a tensor'} out."
        )
    weight = (state[0].double() / state[1]).clamp(max=1.0)
    blended = [torch.lerp(a.to(o.dtype), o, weight.to(o.dtype)) for a, o in zip(xs, outs)]
    return torch.nested.as_nested_tensor(blended, layout=output.layout)  # keeps autograd


def attach_ramp(block: nn.Module, steps: int) -> None:
    """Make ``block`` compute ``x + a * (block(x) - x)`` with ``a = 0`` now, rising to 1 over ``steps`` steps.

    Args:
        block: a module mapping one tensor to a tensor of the same shape (a residual block).
        steps: number of :func:`advance_ramps` calls until ``a = 1`` (``a = k / steps`` after ``k`` calls).

    Raises:
        TypeError / ValueError: ``steps`` is not an int >= 1.
        ValueError: ``block`` is already ramped.

    Example:
        >>> block = nn.Linear(3, 3)
        >>> attach_ramp(block, steps=10)
        >>> ramp_state(block)
        (0, 10)
    """
    steps = check_int("steps", steps, minimum=1)
    if is_ramped(block):
        raise ValueError(f"{type(block).__name__} already carries a ramp {ramp_state(block)}; fold it first.")
    device = next((t.device for t in [*block.parameters(), *block.buffers()]), None)
    block.register_buffer(RAMP_BUFFER, torch.tensor([0, steps], dtype=torch.int64, device=device))
    block.register_forward_hook(_ramp_hook)


def is_ramped(block: nn.Module) -> bool:
    """Whether ``block`` itself carries a ramp (its sub-modules are not searched)."""
    return RAMP_BUFFER in block._buffers


def ramp_state(block: nn.Module) -> tuple[int, int]:
    """``(step, steps)`` of ``block``'s ramp; ``ValueError`` if it has none."""
    if not is_ramped(block):
        raise ValueError(f"{type(block).__name__} carries no ramp")
    step, steps = block._buffers[RAMP_BUFFER].tolist()
    return int(step), int(steps)


def ramp_weight(block: nn.Module) -> float:
    """The current blend weight ``a = min(1, step / steps)`` of ``block``'s ramp."""
    step, steps = ramp_state(block)
    return min(1.0, step / steps)


def ramped_blocks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (step, steps)}`` of every ramped module in ``model`` (``""`` is ``model`` itself)."""
    return {name: ramp_state(m) for name, m in model.named_modules() if is_ramped(m)}


def ramp_traces(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that hold a ramp buffer or a ramp hook (``[]`` once every ramp is folded).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> attach_ramp(net[0], steps=1)
        >>> ramp_traces(net), fold_ramps(net, ["0"]), ramp_traces(net)
        (['0'], ['0'], [])
    """
    return [
        name
        for name, module in model.named_modules()
        if is_ramped(module) or any(hook is _ramp_hook for hook in module._forward_hooks.values())
    ]


def advance_ramps(model: nn.Module, steps: int = 1) -> list[str]:
    """Move every ramp in ``model`` forward by ``steps``; return the names of those that reached ``a = 1`` now.

    A ramp that already ended stays at its end. Call once per optimizer step (not per forward: gradient
    accumulation, activation re-computation and validation must not move it).
    """
    steps = check_int("steps", steps, minimum=0)
    finished = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not is_ramped(module):
                continue
            state = module._buffers[RAMP_BUFFER]
            before = int(state[0])
            state[0] = min(before + steps, int(state[1]))
            if before < int(state[1]) <= int(state[0]):
                finished.append(name)
    return finished


def remove_ramp(block: nn.Module) -> None:
    """Remove ``block``'s ramp buffer and hook, whatever its state (``ValueError`` if it has none)."""
    if not is_ramped(block):
        raise ValueError(f"{type(block).__name__} carries no ramp to remove")
    for key in [k for k, hook in block._forward_hooks.items() if hook is _ramp_hook]:
        del block._forward_hooks[key]
    del block._buffers[RAMP_BUFFER]


def fold_ramps(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Remove the ramps that have ended (``a = 1``); return the folded modules' names.

    A block whose ramp ended computes exactly ``block(x)`` (``torch.lerp`` at weight 1), so folding changes no
    output. With ``names`` the given modules are folded whatever their state (used when an event log replays a
    fold before the checkpoint's ramp states are loaded); each must carry a ramp.

    Under ``DistributedDataParallel`` re-wrap the module after a fold: DDP keeps a list of the module's buffers,
    and if the fold removed the last ones its next forward fails inside torch (broadcast of an empty list).
    """
    if names is None:
        names = [name for name, (step, steps) in ramped_blocks(model).items() if step >= steps]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not is_ramped(modules[n])]
    if missing:
        raise ValueError(f"no ramped module named {missing} in {type(model).__name__}; ramped: {ramped_blocks(model)}")
    for name in names:
        remove_ramp(modules[name])
    return list(names)
