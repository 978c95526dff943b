"""DMS on torchvision ``ResNet`` blocks and ``VisionTransformer`` encoder blocks.

Recognised by their classes in ``sys.modules`` (:func:`~lightning_depthgrow.adapters.lazy_class`), so this module
never imports torchvision: a model built from these classes has imported it already.

- ``torchvision_conv_width`` (``block``, ``producer``, ``norm``, ``consumer``): inner channels of a ``BasicBlock``
  (``conv1``/``bn1`` -> ``conv2``) or of a ``Bottleneck`` (``conv1``/``bn1`` -> ``conv2`` and ``conv2``/``bn2`` ->
  ``conv3``, two gates); the mask multiplies ``consumer``'s input channels; the producer's outputs and its
  BatchNorm are sliced with it. The block's output channels are tied to the residual add and are not gated;
  grouped convolutions (ResNeXt) and norms other than BatchNorm are refused with a message.
- ``torchvision_vit_mlp`` (``block``): hidden units of an ``EncoderBlock``'s MLP (``mlp[0]`` -> ``mlp[3]``), the
  mask folded into ``mlp[3]``'s input columns.
- depth style ``torchvision_vit``: the block's mask scales both residual branches, ``x + m attn(ln_1(x))`` (a
  forward hook on the ``dropout`` the attention output passes through) and ``x + m mlp(ln_2(x))`` (folded into
  ``mlp[3]``'s weight and bias; the MLP's last dropout is per element). Only the block's own stack is touched:
  ``encoder.layers`` keeps its ``encoder_layer_i`` keys when blocks are dropped.
- ResNet depth: the generic gate ``x + m (block(x) - x)`` on blocks whose skip is the identity (``downsample``
  is ``None``). It is exact at export for any input, where scaling the branch before the block's final ReLU
  would give ``relu(x)`` for a dropped block (equal to ``x`` only for non-negative inputs).

Attention heads of the ViT are refused: ``nn.MultiheadAttention`` derives ``head_dim = embed_dim // num_heads``
from its input width and calls its output projection's weight directly, so a head can neither be sliced out
nor masked. Search it with ``heads=False`` (MLP width and depth).

Example:
    >>> from torchvision.models import VisionTransformer
    >>> from lightning_depthgrow.dms import attach_gates, export_model
    >>> vit = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    >>> gates = attach_gates(vit, heads=False)
    >>> [s["name"] for s in gates.specs]
    ['encoder/layers/encoder_layer_0:mlp', 'encoder/layers/encoder_layer_1:mlp', 'encoder/layers:depth']
    >>> _ = export_model(vit, {"encoder/layers/encoder_layer_0:mlp": [0, 1], "encoder/layers/encoder_layer_1:mlp": [3],
    ...                        "encoder/layers:depth": [1]})
    >>> list(vit.encoder.layers._modules), vit.encoder.layers.encoder_layer_0.mlp[0].out_features
    (['encoder_layer_0'], 1)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...adapters.registry import lazy_class
from ..hooks import OutputScale
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_linear_hidden, tied
from ..topk import WIDTH
from .conv_hidden import ConvHiddenFamily

_RESNET = "torchvision.models.resnet"
_VIT = "torchvision.models.vision_transformer"


def _resnet_block_kind(module: nn.Module) -> str | None:
    """``"basic"`` or ``"bottleneck"`` for torchvision's own block classes (not subclasses: their forward may
    differ, e.g. the quantizable blocks), else ``None``."""
    if type(module) is lazy_class(_RESNET, "BasicBlock"):
        return "basic"
    if type(module) is lazy_class(_RESNET, "Bottleneck"):
        return "bottleneck"
    return None


def _is_encoder_block(module: nn.Module) -> bool:
    cls = lazy_class(_VIT, "EncoderBlock")
    return cls is not None and type(module) is cls


def _per_channel_norm(module: nn.Module) -> bool:
    """A norm whose statistics and affine are per channel, so slicing channels slices it (BatchNorm variants,
    torchvision's ``FrozenBatchNorm2d``)."""
    frozen = lazy_class("torchvision.ops.misc", "FrozenBatchNorm2d")
    return isinstance(module, _BatchNorm) or (frozen is not None and isinstance(module, frozen))


def _mlp_linears(block: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """``(mlp[0], mlp[3])`` if the block's MLP is torchvision's ``Linear, act, Dropout, Linear, Dropout``."""
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 5:
        return None
    first, last = mlp[0], mlp[3]
    if type(first) is not nn.Linear or type(last) is not nn.Linear:
        return None
    # the modules between and after them act per element and hold nothing per hidden unit
    if any(list(mlp[i].parameters()) or list(mlp[i].buffers()) for i in (1, 2, 4)):
        return None
    return first, last


class TorchvisionResNetFamily(ConvHiddenFamily):
    """Inner channels of torchvision ``BasicBlock``/``Bottleneck`` (depth: the generic gate)."""

    name = "torchvision ResNet block"
    sites = ("torchvision_conv_width",)

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        kind = _resnet_block_kind(block)
        if kind is None:
            return None
        if not width:
            return []
        pairs = [("conv1", "bn1", "conv2")]
        if kind == "bottleneck":
            pairs.append(("conv2", "bn2", "conv3"))
        specs = []
        for producer, norm, consumer in pairs:
            prod, cons = block.get_submodule(producer), block.get_submodule(consumer)
            if prod.groups != 1 or cons.groups != 1:
                raise tied(path, f"the channels between {producer} and {consumer} (grouped convolution, as in ResNeXt)")
            if not _per_channel_norm(block.get_submodule(norm)):
                raise tied(
                    path,
                    f"the channels between {producer} and {consumer} ({norm} is a "
                    f"{type(block.get_submodule(norm)).__name__}, not a per-channel BatchNorm)",
                )
            specs.append(self.conv_hidden_spec(path, block, producer, norm, consumer))
        return specs


class TorchvisionViTFamily(DMSFamily):
    """MLP hidden units and depth of torchvision ``EncoderBlock``; its heads are refused."""

    name = "torchvision VisionTransformer EncoderBlock"
    sites = ("torchvision_vit_mlp",)
    depth_styles = ("torchvision_vit",)

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if not _is_encoder_block(block):
            return None
        specs: list[GateSpec] = []
        if heads and block.self_attention.num_heads > 1:
            raise tied(
                path,
                "the attention heads (torch's nn.MultiheadAttention computes head_dim = embed_dim // num_heads from "
                "its input width and uses its out_proj weight directly, so a head can be neither sliced out nor "
                "masked; pass heads=False to search the MLP width and the depth of this VisionTransformer)",
            )
        if width:
            linears = _mlp_linears(block)
            if linears is None:
                raise tied(path, f"the MLP hidden units ({type(block.mlp).__name__} is not torchvision's MLPBlock)")
            specs.append(
                {
                    "name": gate_name(path, "mlp"),
                    "kind": WIDTH,
                    "site": "torchvision_vit_mlp",
                    "block": path,
                    "n": linears[0].out_features,
                    "min_keep": 1,
                }
            )
        return specs

    def depth_style(self, block: nn.Module) -> str | None:
        if _is_encoder_block(block) and isinstance(block.dropout, nn.Dropout) and _mlp_linears(block) is not None:
            return "torchvision_vit"
        return None

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        fold(model.get_submodule(spec["block"]).mlp[3]).columns.append((index, 1))
        return []

    def depth_hooks(self, block: nn.Module, style: str, gates: Any, index: int, element: int, fold: Any) -> list[Hook]:
        fold(block.mlp[3]).scales.append((index, element))
        return [(block.dropout, "post", OutputScale(gates, index, element))]

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        mlp = model.get_submodule(spec["block"]).mlp
        slice_linear_hidden(slices, [mlp[0]], mlp[3], keep)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        return [("out", spec["block"] + ".mlp.0"), ("in", spec["block"] + ".mlp.3")]
