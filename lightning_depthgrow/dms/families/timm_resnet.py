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
from ..hooks import OutputScale
from ..sites import GateSpec, Hook, tied
from .conv_hidden import ConvHiddenFamily

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


class TimmResNetFamily(ConvHiddenFamily):
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
            specs.append(self.conv_hidden_spec(path, block, producer, norm, consumer))
        return specs

    def depth_style(self, block: nn.Module) -> str | None:
        return "resnet" if isinstance(block, BLOCKS) else None

    def identity_skip(self, adapter: BlockAdapter, block: nn.Module) -> bool | None:
        if not isinstance(block, BLOCKS):
            return None
        return block.downsample is None and adapter.shape_preserving(block)

    def depth_hooks(self, block: nn.Module, style: str, gates: Any, index: int, element: int, fold: Any) -> list[Hook]:
        return [(block.get_submodule(branch_end(block)), "post", OutputScale(gates, index, element))]
