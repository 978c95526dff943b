"""Attach DMS gates to a model without editing it: forward hooks plus one container sub-module.

The gates (:class:`~lightning_depthgrow.dms.topk.TopKGate`) live in a :class:`DMSGates` container
added to the model as ``model.dms_gates``, so their ratios are ordinary parameters (optimizer, DDP,
checkpoints) and their importances ordinary buffers. Masks are applied by forward (pre-)hooks on the
gated layers or, for timm ViT blocks, folded into the weights of the Linear that consumes the masked
channels (an instance-level ``forward``); hooks and folded forwards are small callable objects, so
``copy.deepcopy`` of a gated model gives a copy whose hooks use the copy's gates. :func:`remove_gates`
takes all of it away and leaves the original ``state_dict`` keys untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.registry import UnsupportedModelError
from .families import GateSpec, describe_model, discover_gates, resnet_branch_end
from .topk import GateBank, TopKGate

CONTAINER = "dms_gates"


class DMSGates(nn.Module):
    """The gates of one model, keyed by gate name, plus the specs they were built from.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> gates = attach_gates(vit)
        >>> sorted(gates.gates)[:2], find_gates(vit) is gates
        (['blocks/0:heads', 'blocks/0:mlp'], True)
        >>> remove_gates(vit); find_gates(vit) is None
        True
    """

    def __init__(self, specs: list[GateSpec]) -> None:
        super().__init__()
        self.specs = [dict(s) for s in specs]
        self.gates = nn.ModuleDict(
            {s["name"]: TopKGate(s["n"], s["kind"], s.get("temperature"), s["min_keep"]) for s in self.specs}
        )
        self.index = {name: i for i, name in enumerate(self.gates)}
        self._bank: GateBank | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bank": None}

    @property
    def bank(self) -> GateBank:
        """All gates as one :class:`~lightning_depthgrow.dms.topk.GateBank` (what the hooks read)."""
        if self._bank is None:
            self._bank = GateBank(self.gate_list())
        return self._bank

    def masks(self) -> list[Tensor]:
        """Every gate's mask for the current forward pass (soft in training with autograd, else hard)."""
        return self.bank.masks(self.training)

    def gate_list(self) -> list[TopKGate]:
        """The gates, in attachment order."""
        return list(self.gates.values())

    def arch_parameters(self) -> list[nn.Parameter]:
        """The learnable ratios, in gate order."""
        return [g.ratio for g in self.gates.values()]

    def keep(self) -> dict[str, list[int]]:
        """Kept element indices of every gate under the current hard masks."""
        hard = self.bank.hard().split(self.bank.sizes)
        return {name: torch.nonzero(h).flatten().tolist() for name, h in zip(self.gates, hard)}

    def project_(self) -> None:
        """Keep every ratio in range (or at its frozen value); call after each optimizer step."""
        for gate in self.gates.values():
            gate.project_()


class _InputMask:
    """Forward pre-hook: multiply the layer's input channels (``dim``) by gate ``index``'s mask."""

    def __init__(self, gates: DMSGates, index: int, dim: int) -> None:
        self.gates, self.index, self.dim = gates, index, dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        m = self.gates.masks()[self.index]
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return (x * m.view(shape).to(x.dtype), *args[1:])


class _OutputScale:
    """Forward hook: multiply the module's output by element ``element`` of gate ``index``'s mask."""

    def __init__(self, gates: DMSGates, index: int, element: int) -> None:
        self.gates, self.index, self.element = gates, index, element

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output * self.gates.masks()[self.index][self.element].to(output.dtype)


class _ResidualScale:
    """Forward hook on a whole residual block: ``x + m (block(x) - x)`` (generic depth gate)."""

    def __init__(self, gates: DMSGates, index: int, element: int) -> None:
        self.gates, self.index, self.element = gates, index, element

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        return x + self.gates.masks()[self.index][self.element].to(output.dtype) * (output - x)


class _MaskedLinear:
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


_HOOK_TYPES = (_InputMask, _OutputScale, _ResidualScale)


def _hooks_for(
    model: nn.Module, spec: GateSpec, gates: DMSGates, folded: dict[int, _MaskedLinear]
) -> list[tuple[nn.Module, str, Any]]:
    """``(module, "pre" | "post", hook)`` for one gate, or a factor added to a folded Linear in ``folded``."""
    site, index = spec["site"], gates.index[spec["name"]]

    def fold(linear: nn.Linear) -> _MaskedLinear:
        return folded.setdefault(id(linear), _MaskedLinear(gates, linear))

    if site == "vit_mlp":
        fold(model.get_submodule(spec["block"] + ".mlp.fc2")).columns.append((index, 1))
        return []
    if site == "vit_heads":
        attn = model.get_submodule(spec["block"] + ".attn")
        fold(attn.proj).columns.append((index, attn.head_dim))
        return []
    if site == "conv_width":
        return [(model.get_submodule(f"{spec['block']}.{spec['consumer']}"), "pre", _InputMask(gates, index, 1))]
    if site == "depth":
        stack = model.get_submodule(spec["stack"])
        hooks: list[tuple[nn.Module, str, Any]] = []
        for j, i in enumerate(spec["blocks"]):
            block = stack[i]
            if spec["style"] == "vit":
                # each residual branch ends in a Linear followed by per-channel linear maps (dropout,
                # LayerScale, drop-path), so the block's mask can scale that Linear's weight and bias
                fold(block.attn.proj).scales.append((index, j))
                fold(block.mlp.fc2).scales.append((index, j))
            elif spec["style"] == "resnet":
                hooks.append((block.get_submodule(resnet_branch_end(block)), "post", _OutputScale(gates, index, j)))
            else:
                hooks.append((block, "post", _ResidualScale(gates, index, j)))
        return hooks
    raise UnsupportedModelError(f"unknown DMS gate site {site!r} in spec {spec}")


def find_gates(model: nn.Module) -> DMSGates | None:
    """The gate container attached to ``model``, or ``None``."""
    container = model._modules.get(CONTAINER)
    return container if isinstance(container, DMSGates) else None


def attach_gates(
    model: nn.Module,
    width: bool = True,
    heads: bool = True,
    depth: bool = True,
    specs: list[GateSpec] | None = None,
) -> DMSGates:
    """Add gates to ``model`` in place (hooks plus ``model.dms_gates``) and return the container.

    ``specs`` (from a recorded ``dms_attach`` event) re-attaches exactly those gates; they must match
    what discovery finds on this model. Everything is checked before the model is touched.
    Raises :class:`~lightning_depthgrow.UnsupportedModelError` if nothing can be gated.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet10t", num_classes=10)
        >>> [s["name"] for s in attach_gates(net, depth=False).specs]
        ['layer1/0:conv1', 'layer2/0:conv1', 'layer3/0:conv1', 'layer4/0:conv1']
    """
    if find_gates(model) is not None:
        raise RuntimeError("DMS gates are already attached to this model; remove_gates(model) first.")
    if hasattr(model, CONTAINER):
        raise RuntimeError(f"the model already has an attribute {CONTAINER!r}; DMS needs that name for its gates.")
    found = discover_gates(model, width, heads, depth)
    if specs is not None:
        strip = [{k: v for k, v in s.items() if k != "temperature"} for s in specs]
        if strip != found:
            raise UnsupportedModelError(
                f"the recorded DMS gates do not match this model: recorded {[s['name'] for s in specs]}, "
                f"found {[s['name'] for s in found]}. Build the same model the run started from."
            )
        found = [dict(s) for s in specs]
    if not found:
        raise UnsupportedModelError(
            f"DMS found nothing to gate in {type(model).__name__} (width={width}, heads={heads}, depth={depth}). "
            f"It gates timm ViT blocks (MLP units, heads), timm ResNet blocks (inner channels) and the depth of "
            f"stacks of registered blocks; the model holds: {describe_model(model)}. Register your block type "
            "with lightning_depthgrow.register_block to get depth gates."
        )
    container = DMSGates(found)
    for s in container.specs:
        s.setdefault("temperature", container.gates[s["name"]].temperature)
    param = next(model.parameters(), None)
    if param is not None:
        container.to(param.device)
    folded: dict[int, _MaskedLinear] = {}
    hooks = [h for s in container.specs for h in _hooks_for(model, s, container, folded)]
    for masked in folded.values():
        if not isinstance(masked.module, nn.Linear) or "forward" in masked.module.__dict__:
            raise UnsupportedModelError(
                f"DMS folds its masks into {type(masked.module).__name__} layers, which must be plain nn.Linear "
                "without an overridden forward; disable that kind of gate for this model."
            )
    model.add_module(CONTAINER, container)
    for masked in folded.values():
        masked.module.forward = masked  # an instance attribute: the class (and state_dict) stay untouched
    for module, when, hook in hooks:
        if when == "pre":
            module.register_forward_pre_hook(hook)
        else:
            module.register_forward_hook(hook)
    return container


def remove_gates(model: nn.Module) -> None:
    """Remove every DMS hook and the gate container (the model computes as before attaching)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _MaskedLinear):
            del module.__dict__["forward"]
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _HOOK_TYPES)]:
                del hooks[key]
    if CONTAINER in model._modules:
        del model._modules[CONTAINER]


def set_importance(gates: DMSGates, values: dict[str, Tensor]) -> None:
    """Overwrite importances (tests, or seeding a search from a pretrained model's saliency)."""
    with torch.no_grad():
        for name, value in values.items():
            gates.gates[name].importance.copy_(value)
