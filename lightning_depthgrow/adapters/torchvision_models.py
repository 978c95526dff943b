"""torchvision families: ResNet ``BasicBlock``/``Bottleneck`` and VisionTransformer ``EncoderBlock``.

Recognised without importing torchvision (:func:`~.registry.lazy_class`). The VisionTransformer keeps its
blocks in ``encoder.layers``, an ``nn.Sequential`` whose children are named ``encoder_layer_0``, ...; the
stack keeps that naming when it grows (block names ``encoder.layers.encoder_layer_3``).
"""

from __future__ import annotations

from torch import nn

from .registry import BlockAdapter, _register_builtin, lazy_class
from .timm_models import relu_after_add_refusal

_RESNET = "torchvision.models.resnet"
_VIT = "torchvision.models.vision_transformer"


def _is_resnet_block(module: nn.Module) -> bool:
    types = tuple(t for t in (lazy_class(_RESNET, "BasicBlock"), lazy_class(_RESNET, "Bottleneck")) if t)
    return bool(types) and isinstance(module, types)


def _resnet_zero(block: nn.Module) -> list[str]:
    # The last BatchNorm's weight and bias (what torchvision's zero_init_residual does to the weight).
    return ["bn3"] if hasattr(block, "bn3") else ["bn2"]


def _resnet_shape_preserving(block: nn.Module) -> bool:
    strided = block.conv2 if hasattr(block, "bn3") else block.conv1
    return block.downsample is None and tuple(strided.stride) == (1, 1)


def _resnet_refuse(block: nn.Module) -> str | None:
    return relu_after_add_refusal(block.relu, "torchvision ResNet")


def _resnet_init(module: nn.Module) -> None:
    # torchvision ResNet.__init__: kaiming normal (fan_out, relu) for convs; norms via reset_parameters.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _is_vit_block(module: nn.Module) -> bool:
    cls = lazy_class(_VIT, "EncoderBlock")
    return cls is not None and isinstance(module, cls)


def _vit_zero(block: nn.Module) -> list[str]:
    # x + dropout(attn(ln_1(x))), then x + mlp(ln_2(x)): the attention's out_proj and the MLP's last Linear.
    last = [name for name, m in block.mlp.named_children() if isinstance(m, nn.Linear)][-1]
    return ["self_attention.out_proj", f"mlp.{last}"]


def _vit_init(module: nn.Module) -> None:
    # torchvision MLPBlock: xavier uniform weights, normal(1e-6) biases; attention: MultiheadAttention's own.
    if type(module) is nn.Linear:
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.normal_(module.bias, std=1e-6)


def register() -> None:
    """Register the torchvision ResNet and VisionTransformer adapters (matched lazily, no import)."""
    _register_builtin(
        BlockAdapter(
            nn.Module,
            _resnet_zero,
            _resnet_init,
            _resnet_shape_preserving,
            name="torchvision.resnet.Block",
            match=_is_resnet_block,
            refuse=_resnet_refuse,
        )
    )
    _register_builtin(
        BlockAdapter(nn.Module, _vit_zero, _vit_init, name="torchvision.vit.EncoderBlock", match=_is_vit_block)
    )
