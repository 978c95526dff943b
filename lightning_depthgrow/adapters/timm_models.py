"""timm families: ViT/DeiT ``Block``, ResNet ``BasicBlock``/``Bottleneck``, ``ConvNeXtBlock``, Eva ``EvaBlock``
(``EvaBlockPostNorm``: zero-init refused, ramped copies grow it), Swin ``SwinTransformerBlock``,
EfficientNet/MobileNetV3 ``InvertedResidual``/``DepthwiseSeparableConv``."""

from __future__ import annotations

import math

from torch import nn

from .registry import BlockAdapter, _register_builtin


def _timm_linear_init(module: nn.Module) -> None:
    # timm's ViT/ConvNeXt init: truncated normal (std .02) for linear and conv weights, zero bias.
    from timm.layers import trunc_normal_

    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _vit_zero(block: nn.Module) -> list[str]:
    # With LayerScale, gamma = 0 silences each branch; otherwise the branch's last projection.
    from timm.layers import LayerScale

    if isinstance(block.ls1, LayerScale) and isinstance(block.ls2, LayerScale):
        return ["ls1.gamma", "ls2.gamma"]
    return ["attn.proj", "mlp.fc2"]


def _resnet_zero(block: nn.Module) -> list[str]:
    # The last BatchNorm's weight and bias: the branch outputs exactly 0 in train and eval mode.
    return ["bn3"] if hasattr(block, "bn3") else ["bn2"]


def _resnet_shape_preserving(block: nn.Module) -> bool:
    return block.downsample is None and block.conv1.stride == (1, 1) and _conv_stride(block) == (1, 1)


def _conv_stride(block: nn.Module) -> tuple[int, int]:
    conv = block.conv2 if hasattr(block, "bn3") else block.conv1
    return tuple(conv.stride)


def _resnet_refuse(block: nn.Module) -> str | None:
    # The block computes act(x + f(x)); with f zeroed that is act(x), which equals x only for ReLU and only
    # because the block's input is itself a ReLU output (the block before it ends in the same ReLU).
    act = block.act3 if hasattr(block, "bn3") else block.act2
    return relu_after_add_refusal(act, "timm ResNet")


def relu_after_add_refusal(act: nn.Module, family: str) -> str | None:
    """The refusal reason for a residual block ``act(x + f(x))`` whose ``act`` is not ``nn.ReLU``, or ``None``."""
    if isinstance(act, nn.ReLU):
        return None
    return (
        f"the {family} block applies {type(act).__name__} after its residual add, so a copy with its branch "
        f"zeroed computes {type(act).__name__}(x), not x (only ReLU of a ReLU output is the identity). Grow "
        "it with ramped copies instead, DepthGrowth(operator='copy' or 'stack', ramp_steps >= 1): each new block "
        "enters through a residual ramp (lightning_depthgrow.surgery.ramp: out = x + a * (block(x) - x), a = 0 at "
        "birth), which preserves the function for any shape-preserving block; or build the model with "
        "act_layer='relu'."
    )


def _resnet_init(module: nn.Module) -> None:
    # timm ResNet.init_weights: kaiming normal (fan_out) for convs.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _convnext_zero(block: nn.Module) -> list[str]:
    return ["gamma"] if block.gamma is not None else ["mlp.fc2"]


def _convnext_shape_preserving(block: nn.Module) -> bool:
    return isinstance(block.shortcut, nn.Identity) and tuple(block.conv_dw.stride) == (1, 1)


def _eva_zero(block: nn.Module) -> list[str]:
    if block.gamma_1 is not None and block.gamma_2 is not None:
        return ["gamma_1", "gamma_2"]
    return ["attn.proj", "mlp.fc2"]


def _post_norm_refuse(block: nn.Module) -> str | None:
    from .torch_nn import POST_LN_REFUSAL

    return POST_LN_REFUSAL.format(hint=" (EvaBlock)")


def _efficientnet_zero(block: nn.Module) -> list[str]:
    # The last BatchNorm(Act) of the branch has no activation (or one with act(0) = 0; checked by verification).
    return ["bn3"] if hasattr(block, "conv_pwl") else ["bn2"]


def _efficientnet_init(module: nn.Module) -> None:
    # timm _init_weight_goog: normal(0, sqrt(2 / fan_out)) for convs, zero bias.
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def register() -> None:
    """Register the timm adapters; a no-op when timm is not installed."""
    try:
        from timm.models.convnext import ConvNeXtBlock
        from timm.models.resnet import BasicBlock, Bottleneck
        from timm.models.vision_transformer import Block
    except ImportError:
        return
    _register_builtin(BlockAdapter(Block, _vit_zero, _timm_linear_init, name="timm.vit.Block"))
    _register_builtin(
        BlockAdapter(
            (BasicBlock, Bottleneck),
            _resnet_zero,
            _resnet_init,
            _resnet_shape_preserving,
            name="timm.resnet.Block",
            refuse=_resnet_refuse,
        )
    )
    _register_builtin(
        BlockAdapter(
            ConvNeXtBlock,
            _convnext_zero,
            _timm_linear_init,
            _convnext_shape_preserving,
            name="timm.convnext.ConvNeXtBlock",
        )
    )
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.eva import EvaBlock, EvaBlockPostNorm
    from timm.models.swin_transformer import SwinTransformerBlock

    _register_builtin(BlockAdapter(EvaBlock, _eva_zero, _timm_linear_init, name="timm.eva.EvaBlock"))
    _register_builtin(BlockAdapter(EvaBlockPostNorm, [], name="timm.eva.EvaBlockPostNorm", refuse=_post_norm_refuse))
    _register_builtin(
        BlockAdapter(SwinTransformerBlock, ["attn.proj", "mlp.fc2"], _timm_linear_init, name="timm.swin.Block")
    )
    _register_builtin(
        BlockAdapter(
            (InvertedResidual, DepthwiseSeparableConv),
            _efficientnet_zero,
            _efficientnet_init,
            lambda block: bool(block.has_skip),
            name="timm.efficientnet.Block",
        )
    )
