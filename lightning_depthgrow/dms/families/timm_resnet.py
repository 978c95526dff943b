"""DMS on timm ResNet ``BasicBlock``/``Bottleneck``: inner channels and block depth.

- ``conv_width`` (``block``, ``producer``, ``norm``, ``consumer``): inner channels of the block; the
  mask multiplies ``consumer``'s input; ``producer``'s outputs and ``norm`` are sliced with it.
- depth style ``resnet``: the mask scales the residual branch just before the add (the block's last
  BatchNorm, or its squeeze-excite). Only blocks without downsampling can go.

The block's output channels are tied to the residual add and are not gated.
"""

from __future__ import annotations

from typing import Any

from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ...adapters.registry import BlockAdapter
from ..hooks import InputMask, OutputScale
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_conv_hidden, tied
from ..topk import WIDTH

BLOCKS = (BasicBlock, Bottleneck)


def _channel_agnostic(module: nn.Module | None) -> bool:
    """A layer between a gated producer and its consumer that treats channels independently and holds
    no per-channel state (identity, pooling, dropout-like), so slicing channels cannot break it."""
    if module is None or isinstance(module, nn.Identity):
        return True
    return not list(module.parameters()) and not list(module.buffers())


def branch_end(block: nn.Module) -> str:
    """The module whose output is the block's residual branch (just before the add)."""
    if getattr(block, "se", None) is not None:
        return "se"
    return "bn3" if hasattr(block, "conv3") else "bn2"


class TimmResNetFamily(DMSFamily):
    name = "timm ResNet block"
    sites = ("conv_width",)
    depth_styles = ("resnet",)

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if not isinstance(block, BLOCKS):
            return None
        if not width:
            return []
        bottleneck = hasattr(block, "conv3")
        # (producer conv, its norm, consumer conv, what sits between them)
        pairs = [("conv1", "bn1", "conv2", None if bottleneck else block.aa)]
        if bottleneck:
            pairs.append(("conv2", "bn2", "conv3", block.aa))
        specs = []
        for producer, norm, consumer, between in pairs:
            prod, cons = block.get_submodule(producer), block.get_submodule(consumer)
            if prod.groups != 1 or cons.groups != 1:
                raise tied(path, f"the channels between {producer} and {consumer} (grouped convolution)")
            if not _channel_agnostic(between):
                raise tied(path, f"the channels between {producer} and {consumer} ({type(between).__name__})")
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

    def depth_style(self, block: nn.Module) -> str | None:
        return "resnet" if isinstance(block, BLOCKS) else None

    def identity_skip(self, adapter: BlockAdapter, block: nn.Module) -> bool | None:
        if not isinstance(block, BLOCKS):
            return None
        return block.downsample is None and adapter.shape_preserving(block)

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        return [(model.get_submodule(f"{spec['block']}.{spec['consumer']}"), "pre", InputMask(gates, index, 1))]

    def depth_hooks(self, block: nn.Module, style: str, gates: Any, index: int, element: int, fold: Any) -> list[Hook]:
        return [(block.get_submodule(branch_end(block)), "post", OutputScale(gates, index, element))]

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        get = model.get_submodule(spec["block"]).get_submodule
        slice_conv_hidden(slices, get(spec["producer"]), get(spec["norm"]), get(spec["consumer"]), keep)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        b = spec["block"]
        return [("out", f"{b}.{spec['producer']}"), ("norm", f"{b}.{spec['norm']}"), ("in", f"{b}.{spec['consumer']}")]
