"""The ``dms_attach`` and ``dms_export`` architecture events: build their specs, apply them.

``dms_attach`` records which gates were attached (the discovery flags and the full gate specs) and the
architecture learning rate, so a resumed run re-attaches exactly the same gates. ``dms_export`` records
the kept indices of every gate, so a replay slices exactly as the original run did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..events import AppliedChange, ArchitectureEvent, register_event_kind
from .export import export_model
from .families import discover_gates
from .gates import attach_gates, check_tie, find_gates, tie_specs
from .topk import default_temperature

ATTACH, EXPORT = "dms_attach", "dms_export"
ARCH_GROUP_KEY = "dms_architecture"


def arch_group_options(
    lr: float, defaults: dict[str, Any] | None = None, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Param-group options of the architecture ratios: own constant lr, no weight decay, no momentum, a marker.

    ``defaults`` are the optimizer's (``optimizer.defaults``): where it has a first-moment or momentum
    setting (Adam's ``betas``, SGD's ``momentum``), the ratios get none. The resource loss is a hinge
    whose gradient vanishes at the target; momentum would carry the ratios on for about
    ``lr / (1 - beta1)`` past it (measured: 0.9 momentum and lr 0.05 took a 50% FLOPs search to 28%).

    The group holds one scalar per gate, where the per-parameter loop of torch's default (single-tensor)
    implementation costs more than the arithmetic: Adam and AdamW take their fused kernel for it when
    ``device`` (the ratios' device) is a CPU or CUDA one, other optimizers with a ``foreach`` setting the
    foreach implementation; the update is the same.

    Example:
        >>> arch_group_options(0.01, {"betas": (0.9, 0.999), "lr": 1e-3})["betas"]
        (0.0, 0.999)
        >>> options = arch_group_options(0.01, torch.optim.AdamW([torch.zeros(1)]).defaults, "cpu")
        >>> options["fused"], options["foreach"]
        (True, False)
    """
    options: dict[str, Any] = {"lr": lr, "weight_decay": 0.0, ARCH_GROUP_KEY: True}
    defaults = defaults or {}
    if "betas" in defaults:
        options["betas"] = (0.0, defaults["betas"][1])
    if "momentum" in defaults:
        options["momentum"] = 0.0
        if "nesterov" in defaults:
            options["nesterov"] = False
    if not defaults.get("differentiable"):
        fusable = device is not None and torch.device(device).type in ("cpu", "cuda")
        if "fused" in defaults and "betas" in defaults and fusable:
            options.update(fused=True, foreach=False)
        elif "foreach" in defaults and not defaults.get("fused"):
            options["foreach"] = True
    return options


def attach_event(
    model: nn.Module,
    lr: float,
    width: bool = True,
    heads: bool = True,
    depth: bool = True,
    embed: bool = False,
    tie: str | Sequence[str] | None = None,
    **meta: Any,
) -> ArchitectureEvent:
    """A ``dms_attach`` event for ``model`` (discovers the gates on a throw-away attach, then removes them).

    ``embed=True`` adds the embedding-width gate of a timm, Hugging Face or torchvision ViT (recorded as ``"embed"``
    in the spec; events recorded before it existed read as ``embed=False``). ``tie`` (e.g. ``("width",)``) shares one
    ratio per group of gates (:func:`~lightning_depthgrow.dms.tie_specs`), recorded as ``"tie"`` in the spec and in
    each tied gate's spec only when given, so events recorded before it existed read as untied.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> event = attach_event(vit, lr=0.01)
        >>> change = apply_attach(vit, event.spec)
        >>> change.new_group[1]["weight_decay"], len(change.new_group[0])
        (0.0, 5)
    """
    kinds = check_tie(tie)
    found = discover_gates(model, width, heads, depth, embed=embed)
    if kinds:
        found = tie_specs(found, kinds)
    gates = [{**s, "temperature": default_temperature(s["kind"], s["n"])} for s in found]
    spec = {"width": width, "heads": heads, "depth": depth, "lr": float(lr), "gates": gates}
    if embed:  # only when on, so the events of searches without it read exactly as before
        spec["embed"] = True
    if kinds:
        spec["tie"] = list(kinds)
    return ArchitectureEvent(ATTACH, spec, **meta)


def apply_attach(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    """Applier of ``dms_attach`` events: attach the recorded gates; their ratios form one new param group."""
    gates = attach_gates(
        model,
        spec["width"],
        spec["heads"],
        spec["depth"],
        specs=spec["gates"],
        embed=spec.get("embed", False),
        tie=spec.get("tie"),
    )
    return AppliedChange(new_group=(gates.arch_parameters(), arch_group_options(spec["lr"])))


def export_event(model: nn.Module, **meta: Any) -> ArchitectureEvent:
    """A ``dms_export`` event keeping what the gates' hard masks keep now."""
    gates = find_gates(model)
    if gates is None:
        raise RuntimeError("no DMS gates attached: nothing to export")
    return ArchitectureEvent(EXPORT, {"keep": gates.keep()}, **meta)


def apply_export(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    """Applier of ``dms_export`` events: slice ``model`` to the recorded kept indices (:func:`export_model`)."""
    return export_model(model, spec["keep"])


register_event_kind(ATTACH, apply_attach)
register_event_kind(EXPORT, apply_export)
