"""How DMS masks act on a model: small callable hook objects that read the gates' current masks.

Families (:mod:`lightning_depthgrow.dms.sites`) combine these; none of them names a model family.
Hooks are plain objects (not closures), so ``copy.deepcopy`` of a gated model gives hooks that use the
copy's gates, and :func:`~lightning_depthgrow.dms.remove_gates` finds them by type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .gates import DMSGates


class InputMask:
    """Forward pre-hook: multiply the layer's input channels (``dim``) by gate ``index``'s mask."""

    def __init__(self, gates: DMSGates, index: int, dim: int) -> None:
        self.gates, self.index, self.dim = gates, index, dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        m = self.gates.masks()[self.index]
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return (x * m.view(shape).to(x.dtype), *args[1:])


class OutputScale:
    """Forward hook: multiply the module's output by element ``element`` of gate ``index``'s mask."""

    def __init__(self, gates: DMSGates, index: int, element: int) -> None:
        self.gates, self.index, self.element = gates, index, element

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output * self.gates.masks()[self.index][self.element].to(output.dtype)


class ResidualScale:
    """Forward hook on a whole residual block: ``x + m (block(x) - x)`` (the generic depth gate).

    The block must return one tensor of its input's shape; anything else is refused with a message,
    because scaling part of a tuple (a cache, attention weights) would be a silent wrong model.
    """

    def __init__(self, gates: DMSGates, index: int, element: int) -> None:
        self.gates, self.index, self.element = gates, index, element

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0] if args else None
        if not isinstance(output, Tensor) or not isinstance(x, Tensor) or output.shape != x.shape:
            raise TypeError(
                f"DMS's generic depth gate needs {type(module).__name__} to map one tensor to a tensor of the same "
                f"shape (x + m (block(x) - x)); it returned {type(output).__name__}. Search width only "
                "(depth=False), or give this block type a DMS family (lightning_depthgrow.dms.register_dms_family)."
            )
        return x + self.gates.masks()[self.index][self.element].to(output.dtype) * (output - x)


class MaskedLinear:
    """Replaces an ``nn.Linear``'s ``forward`` with ``F.linear(x, W * col, b * s)``: masks folded into the weight.

    ``col`` is the product of the input-channel masks (MLP hidden units, heads repeated over their
    dims) and ``s`` of the output scales (the block's depth mask). Mathematically the same as masking
    the input and scaling the output, with the same ``dL/dm``, but the multiplies touch the weight
    (out x in) instead of activations (batch x tokens x in) in forward and backward.
    """

    def __init__(self, gates: DMSGates, module: nn.Linear) -> None:
        self.gates, self.module = gates, module
        self.columns: list[tuple[int, int]] = []  # (gate index, channels per mask element)
        self.scales: list[tuple[int, int]] = []  # (gate index, element)

    def __call__(self, x: Tensor) -> Tensor:
        masks = self.gates.masks()
        weight, bias = self.module.weight, self.module.bias
        col: Tensor | None = None
        for index, group in self.columns:
            m = masks[index] if group == 1 else masks[index].repeat_interleave(group)
            col = m if col is None else col * m
        scale: Tensor | None = None
        for index, element in self.scales:
            m = masks[index][element]
            scale = m if scale is None else scale * m
        if scale is not None:
            col = scale.expand(weight.shape[1]) if col is None else col * scale
            bias = bias * scale.to(bias.dtype) if bias is not None else None
        if col is not None:
            weight = weight * col.to(weight.dtype)
        return F.linear(x, weight, bias)


HOOK_TYPES = (InputMask, OutputScale, ResidualScale)


class Fold:
    """The :class:`MaskedLinear` of each folded Linear of one attach, created on first use."""

    def __init__(self, gates: DMSGates) -> None:
        self.gates = gates
        self.linears: dict[int, MaskedLinear] = {}

    def __call__(self, linear: nn.Module) -> MaskedLinear:
        return self.linears.setdefault(id(linear), MaskedLinear(self.gates, linear))
