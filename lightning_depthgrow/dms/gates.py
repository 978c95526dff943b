"""Attach DMS gates to a model without editing it: forward hooks plus one container sub-module.

The gates (:class:`~lightning_depthgrow.dms.topk.TopKGate`) live in a :class:`DMSGates` container
added to the model as ``model.dms_gates``, so their ratios are ordinary parameters (optimizer, DDP,
checkpoints) and their importances ordinary buffers. Masks are applied by forward (pre-)hooks on the
gated layers or, where a family chooses so (timm ViT blocks), folded into the weights of the Linear
that consumes the masked channels (an instance-level ``forward``); hooks and folded forwards are small
callable objects, so ``copy.deepcopy`` of a gated model gives a copy whose hooks use the copy's gates.
:func:`remove_gates` takes all of it away and leaves the original ``state_dict`` keys untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.registry import UnsupportedModelError
from .hooks import FORWARD_TYPES, HOOK_TYPES, Fold, ResidualScale
from .sites import (
    GateSpec,
    Hook,
    describe_model,
    discover_gates,
    dms_families,
    family_for_site,
    family_for_style,
)
from .topk import HEADS, WIDTH, GateBank, TopKGate

CONTAINER = "dms_gates"
#: Kinds of gate whose ratios :func:`tie_specs` can tie across blocks (depth gates are one per stack already).
TIE_KINDS = (WIDTH, HEADS)


def check_tie(tie: str | Sequence[str] | None) -> tuple[str, ...]:
    """``tie`` as a sorted tuple of distinct gate kinds from :data:`TIE_KINDS` (a single kind may be a string).

    Example:
        >>> check_tie("width"), check_tie(["heads", "width"]), check_tie(None)
        (('width',), ('heads', 'width'), ())
    """
    if tie is None:
        return ()
    kinds = [tie] if isinstance(tie, str) else list(tie)
    bad = [k for k in kinds if k not in TIE_KINDS]
    if bad:
        raise ValueError(
            f"`tie` names kinds of gate to tie across blocks, one of {TIE_KINDS}; got {bad!r}. Depth gates cannot be "
            "tied (each stack has one already). For the same MLP width in every block write tie=('width',)."
        )
    return tuple(sorted(set(kinds)))


def tie_specs(specs: list[GateSpec], tie: str | Sequence[str] | None) -> list[GateSpec]:
    """The gate specs with ``"tie"`` set on the gates whose ratio is shared: one learnable ratio per group.

    A group is every gate of a kind in ``tie`` with the same site, size ``n`` and ``min_keep`` (all MLPs of a
    ViT; all heads gates); its specs get ``"tie": <name of the group's first gate>``. A shared ratio over equal
    sizes keeps the same *count* in every gate of the group; *which* elements each keeps still follows its own
    importances. A gate with no partner (the embedding gate, a stage of its own size) stays untied. Refuses
    (:class:`~lightning_depthgrow.UnsupportedModelError`) a kind in ``tie`` of which no two gates can be tied.
    ``tie=()`` returns the specs unchanged (without ``"tie"`` keys).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> specs = tie_specs(discover_gates(vit, depth=False), "width")
        >>> [s["name"] for s in specs]
        ['blocks/0:heads', 'blocks/0:mlp', 'blocks/1:heads', 'blocks/1:mlp']
        >>> [s.get("tie") for s in specs]
        [None, 'blocks/0:mlp', None, 'blocks/0:mlp']
    """
    kinds = check_tie(tie)
    out = [{k: v for k, v in s.items() if k != "tie"} for s in specs]
    groups: dict[tuple, list[GateSpec]] = {}
    for s in out:
        if s["kind"] in kinds:
            groups.setdefault((s["kind"], s["site"], s["n"], s["min_keep"]), []).append(s)
    tied = [g for g in groups.values() if len(g) > 1]
    missing = [k for k in kinds if not any(g[0]["kind"] == k for g in tied)]
    if missing:
        found = [f"{s['name']} ({s['n']})" for s in out if s["kind"] in missing]
        raise UnsupportedModelError(
            f"tie={kinds!r}: no two {'/'.join(missing)} gates of this model share a site and size, so there is "
            f"nothing to tie (found: {', '.join(found) or 'none'}). Drop {missing!r} from `tie`, or enable that kind "
            "of gate on a model with several blocks of equal width."
        )
    for group in tied:
        for s in group:
            s["tie"] = group[0]["name"]
    return out


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
        for s in self.specs:  # tied gates share their group's first gate's ratio parameter (one learnable ratio)
            leader = s.get("tie", s["name"])
            if leader == s["name"]:
                continue
            first = self.gates[leader] if leader in self.gates else None
            if first is None or (first.kind, first.n, first.min_keep) != (s["kind"], s["n"], s["min_keep"]):
                raise ValueError(
                    f"gate {s['name']!r} is tied to {leader!r}, which is not a gate of the same kind, size and "
                    "min_keep; build tied specs with lightning_depthgrow.dms.tie_specs."
                )
            self.gates[s["name"]].ratio = first.ratio
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
        """The learnable ratios, in gate order; a ratio tied gates share is listed once (at its first gate)."""
        return self.bank.distinct_ratios()[0]

    def tied(self) -> dict[str, list[str]]:
        """``{first gate: every gate sharing its ratio}`` for each group of tied gates (empty: nothing tied)."""
        groups: dict[str, list[str]] = {}
        for s in self.specs:
            if "tie" in s:
                groups.setdefault(s["tie"], []).append(s["name"])
        return groups

    def keep(self) -> dict[str, list[int]]:
        """Kept element indices of every gate under the current hard masks."""
        hard = self.bank.hard().split(self.bank.sizes)
        return {name: torch.nonzero(h).flatten().tolist() for name, h in zip(self.gates, hard)}

    @torch.no_grad()
    def project_(self) -> None:
        """Keep every ratio in range (or at its frozen value); call after each optimizer step.

        The same as :meth:`TopKGate.project_` on every gate, in a few batched ops and without reading any
        value back to Python (no device synchronisation per gate).
        """
        bank = self.bank
        ratios = bank.ratios()
        a = torch.stack(ratios)
        frozen = torch.stack(bank.frozen_ratios()).to(a.dtype)
        free = torch.minimum(a.clamp(min=0.0), bank.layout()["max_ratio"].to(a.dtype))
        new = torch.where(torch.isnan(frozen), free, frozen)
        distinct, _, first = bank.distinct_ratios()
        if len(distinct) != len(ratios):  # tied gates: one value per shared ratio (the group's is the same)
            ratios, new = distinct, new[first]
        torch._foreach_copy_(ratios, list(new.unbind()))


def _hooks_for(model: nn.Module, spec: GateSpec, gates: DMSGates, fold: Fold) -> list[Hook]:
    """Hooks of one gate, from the family that owns its site; factors folded into a Linear go to ``fold``."""
    index = gates.index[spec["name"]]
    if spec["site"] != "depth":
        return family_for_site(spec["site"]).mask_hooks(model, spec, gates, index, fold)
    stack = model.get_submodule(spec["stack"])
    hooks: list[Hook] = []
    for j, i in enumerate(spec["blocks"]):
        if spec["style"] == "generic":
            hooks.append((stack[i], "post", ResidualScale(gates, index, j)))
        else:
            hooks.extend(family_for_style(spec["style"]).depth_hooks(stack[i], spec["style"], gates, index, j, fold))
    return hooks


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
    embed: bool = False,
    tie: str | Sequence[str] | None = None,
) -> DMSGates:
    """Add gates to ``model`` in place (hooks plus ``model.dms_gates``) and return the container.

    ``specs`` (from a recorded ``dms_attach`` event) re-attaches exactly those gates; they must match
    what discovery finds on this model. Everything is checked before the model is touched.
    ``embed=True`` also gates the embedding (residual-stream) width of a timm ``VisionTransformer`` (site
    ``vit_embed``), a Hugging Face ViT (``hf_vit_embed``) or a torchvision ``VisionTransformer``
    (``torchvision_vit_embed``): one gate per model; its LayerNorms then take their statistics over the kept
    channels.
    ``tie=("width",)`` (or ``"heads"``) shares one ratio among the gates of that kind with the same site and size
    (:func:`tie_specs`: every block keeps the same number of MLP units, each block its own most important ones).
    Raises :class:`~lightning_depthgrow.UnsupportedModelError` if nothing can be gated.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet10t", num_classes=10)
        >>> [s["name"] for s in attach_gates(net, depth=False).specs]
        ['layer1/0:conv1', 'layer2/0:conv1', 'layer3/0:conv1', 'layer4/0:conv1']
    """
    if find_gates(model) is not None:
        raise RuntimeError("DMS gates are already attached to this model; remove_gates(model) first.")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise UnsupportedModelError(
            f"DMS adds its gates to the model as a sub-module, which a {type(model).__name__} root would run (or "
            "list) as one of its layers. Wrap the model in an nn.Module whose forward calls it."
        )
    if hasattr(model, CONTAINER):
        raise RuntimeError(f"the model already has an attribute {CONTAINER!r}; DMS needs that name for its gates.")
    found = discover_gates(model, width, heads, depth, embed=embed)
    if tie:
        found = tie_specs(found, tie)
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
            f"It gates the blocks of its registered families ({', '.join(f.name for f in dms_families())}) and "
            f"the depth of stacks of registered blocks; the model holds: {describe_model(model)}. Register your "
            "block type with lightning_depthgrow.register_block to get depth gates, and a DMS family "
            "(lightning_depthgrow.dms.register_dms_family) for width gates."
        )
    container = DMSGates(found)
    for s in container.specs:
        s.setdefault("temperature", container.gates[s["name"]].temperature)
    param = next(model.parameters(), None)
    if param is not None:
        container.to(param.device)
    fold = Fold(container)
    hooks = [h for s in container.specs for h in _hooks_for(model, s, container, fold)]
    for masked in fold.linears.values():
        if not isinstance(masked.module, nn.Linear) or "forward" in masked.module.__dict__:
            raise UnsupportedModelError(
                f"DMS folds its masks into {type(masked.module).__name__} layers, which must be plain nn.Linear "
                "without an overridden forward; disable that kind of gate for this model."
            )
    replaced = [id(m.module) for m in fold.linears.values()]
    for module, when, _ in hooks:
        if when == "forward":
            if "forward" in module.__dict__ or id(module) in replaced:
                raise UnsupportedModelError(
                    f"DMS replaces the forward of {type(module).__name__} layers with a masked one, and this one "
                    "already has an overridden forward (or two gates need it); disable that kind of gate."
                )
            replaced.append(id(module))
    model.add_module(CONTAINER, container)
    for masked in fold.linears.values():
        masked.module.forward = masked  # an instance attribute: the class (and state_dict) stay untouched
    for module, when, hook in hooks:
        if when == "pre":
            module.register_forward_pre_hook(hook)
        elif when == "forward":
            module.forward = hook  # a mask-aware forward (LayerNorm statistics over kept channels)
        else:
            module.register_forward_hook(hook)
    return container


def remove_gates(model: nn.Module) -> None:
    """Remove every DMS hook and the gate container (the model computes as before attaching)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FORWARD_TYPES):
            del module.__dict__["forward"]
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, HOOK_TYPES)]:
                del hooks[key]
    if CONTAINER in model._modules:
        del model._modules[CONTAINER]


def set_importance(gates: DMSGates, values: dict[str, Tensor]) -> None:
    """Overwrite importances (tests, or seeding a search from a pretrained model's saliency)."""
    with torch.no_grad():
        for name, value in values.items():
            gates.gates[name].importance.copy_(value)
