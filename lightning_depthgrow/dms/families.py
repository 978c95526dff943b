"""Where DMS can put gates in each model family, as plain serialisable *gate specs*.

This is the only DMS module that names a model family. A gate spec is a dict
``{"name", "kind", "site", "n", "min_keep", ...paths}`` (JSON types only, recorded in the
``dms_attach`` event) with one of these sites:

- ``"vit_mlp"`` (``block``): hidden units of a timm ViT ``Block``'s MLP; mask on ``mlp.fc2``'s input.
- ``"vit_heads"`` (``block``): heads of a timm ``Attention``; mask on ``attn.proj``'s input, per head.
- ``"conv_width"`` (``block``, ``producer``, ``norm``, ``consumer``): inner channels of a timm ResNet
  block; mask on ``consumer``'s input; ``producer``'s outputs and ``norm`` are sliced with it.
- ``"depth"`` (``stack``, ``blocks``, ``style``): blocks of a stack that have an identity skip;
  ``style`` ``"vit"`` scales both residual branches (``ls1``/``ls2`` outputs), ``"resnet"`` scales the
  branch before the residual add, ``"generic"`` any registered block as ``x + m (f(x) - x)``.

Channels tied by residual adds (a ResNet block's output, a ViT's embedding width) are not gated.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters.registry import UnsupportedModelError, find_block_stacks
from .topk import DEPTH, HEADS, WIDTH

GateSpec = dict[str, Any]


def _timm_types() -> dict[str, Any]:
    try:
        from timm.layers import Attention, Mlp
        from timm.models.resnet import BasicBlock, Bottleneck
        from timm.models.vision_transformer import Block
    except ImportError:
        return {}
    return {"vit_block": Block, "attention": Attention, "mlp": Mlp, "resnet": (BasicBlock, Bottleneck)}


def gate_name(path: str, suffix: str) -> str:
    """A ``ModuleDict`` key for a gate (no dots allowed there): ``model/blocks/0:mlp``."""
    return f"{path.replace('.', '/')}:{suffix}"


def _channel_agnostic(module: nn.Module | None) -> bool:
    """A layer between a gated producer and its consumer that treats channels independently and holds
    no per-channel state (identity, pooling, dropout-like), so slicing channels cannot break it."""
    if module is None or isinstance(module, nn.Identity):
        return True
    return not list(module.parameters()) and not list(module.buffers())


def _tied(path: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"DMS cannot gate {what} of {path}: those channels are tied to a layer we cannot slice. "
        "Disable that kind of gate (width=False or heads=False) for this model."
    )


def _vit_specs(path: str, block: nn.Module, types: dict[str, Any], width: bool, heads: bool) -> list[GateSpec]:
    specs: list[GateSpec] = []
    if heads:
        attn = block.attn
        if type(attn) is not types["attention"]:
            raise _tied(path, f"the heads ({type(attn).__name__} is not timm's Attention)")
        if not isinstance(attn.norm, nn.Identity):
            raise _tied(path, "the heads (attention output norm spans all heads)")
        if attn.num_heads > 1:
            specs.append(
                {
                    "name": gate_name(path, "heads"),
                    "kind": HEADS,
                    "site": "vit_heads",
                    "block": path,
                    "n": attn.num_heads,
                    "min_keep": 1,
                }
            )
    if width:
        mlp = block.mlp
        if type(mlp) is not types["mlp"] or not isinstance(mlp.fc1, nn.Linear):
            raise _tied(path, f"the MLP hidden units ({type(mlp).__name__} is not timm's Linear Mlp)")
        if not isinstance(mlp.norm, nn.Identity):
            raise _tied(path, "the MLP hidden units (a norm spans them)")
        specs.append(
            {
                "name": gate_name(path, "mlp"),
                "kind": WIDTH,
                "site": "vit_mlp",
                "block": path,
                "n": mlp.fc1.out_features,
                "min_keep": 1,
            }
        )
    return specs


def _resnet_specs(path: str, block: nn.Module) -> list[GateSpec]:
    bottleneck = hasattr(block, "conv3")
    # (producer conv, its norm, consumer conv, what sits between them)
    pairs = [("conv1", "bn1", "conv2", None if bottleneck else block.aa)]
    if bottleneck:
        pairs.append(("conv2", "bn2", "conv3", block.aa))
    specs = []
    for producer, norm, consumer, between in pairs:
        prod, cons = block.get_submodule(producer), block.get_submodule(consumer)
        if prod.groups != 1 or cons.groups != 1:
            raise _tied(path, f"the channels between {producer} and {consumer} (grouped convolution)")
        if not _channel_agnostic(between):
            raise _tied(path, f"the channels between {producer} and {consumer} ({type(between).__name__})")
        specs.append(
            {
                "name": gate_name(path, producer),
                "kind": WIDTH,
                "site": "conv_width",
                "block": path,
                "producer": producer,
                "norm": norm,
                "consumer": consumer,
                "n": prod.out_channels,
                "min_keep": 1,
            }
        )
    return specs


def discover_gates(
    model: nn.Module, width: bool = True, heads: bool = True, depth: bool = True, skip: str = ""
) -> list[GateSpec]:
    """Every gate DMS can attach to ``model``, in module order.

    Width and head gates come from timm ViT blocks and timm ResNet blocks; depth gates from every stack
    of registered blocks (:func:`lightning_depthgrow.find_block_stacks`), only over blocks with an identity
    skip. ``skip`` is a sub-module path to ignore (the gate container itself).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=3)
        >>> [s["name"] for s in discover_gates(vit)]
        ['blocks/0:heads', 'blocks/0:mlp', 'blocks/1:heads', 'blocks/1:mlp', 'blocks:depth']
    """
    types = _timm_types()
    specs: list[GateSpec] = []
    if (width or heads) and types:
        for path, module in model.named_modules():
            if skip and (path == skip or path.startswith(skip + ".")):
                continue
            if type(module) is types["vit_block"]:
                specs.extend(_vit_specs(path, module, types, width, heads))
            elif width and isinstance(module, types["resnet"]):
                specs.extend(_resnet_specs(path, module))
    if depth:
        for stack in find_block_stacks(model):
            if skip and stack.path.startswith(skip):
                continue
            blocks = stack.blocks
            gated = [i for i, b in enumerate(blocks) if _has_identity_skip(stack.adapter, b, types)]
            if not gated:
                continue
            style = (
                "vit"
                if types and all(type(blocks[i]) is types["vit_block"] for i in gated)
                else "resnet"
                if types and all(isinstance(blocks[i], types["resnet"]) for i in gated)
                else "generic"
            )
            specs.append(
                {
                    "name": gate_name(stack.path, "depth"),
                    "kind": DEPTH,
                    "site": "depth",
                    "stack": stack.path,
                    "blocks": gated,
                    "style": style,
                    "n": len(gated),
                    # a stack may lose all gated blocks only if an ungated one carries it on
                    "min_keep": 0 if len(gated) < len(blocks) else 1,
                }
            )
    return specs


def _has_identity_skip(adapter: Any, block: nn.Module, types: dict[str, Any]) -> bool:
    if types and isinstance(block, types["resnet"]):
        return block.downsample is None and adapter.shape_preserving(block)
    return adapter.shape_preserving(block)


def resnet_branch_end(block: nn.Module) -> str:
    """The module whose output is a timm ResNet block's residual branch (just before the add)."""
    if getattr(block, "se", None) is not None:
        return "se"
    return "bn3" if hasattr(block, "conv3") else "bn2"


def describe_model(model: nn.Module) -> str:
    """What a model holds, for the error raised when nothing can be gated."""
    kinds: dict[str, int] = {}
    for _, module in model.named_modules():
        kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:12]
    return ", ".join(f"{n} x{c}" for n, c in top)
