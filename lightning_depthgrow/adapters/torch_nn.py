"""``torch.nn`` transformer layers: ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``.

Pre-LayerNorm layers (``norm_first=True``) grow with their attention output projections and ``linear2``
zeroed. Post-LayerNorm layers (the default, ``norm_first=False``) compute ``LN(x + f(x))``, which is
``LN(x)`` and not ``x`` when ``f`` is zeroed: they are found for curvature, their zero-init growth is refused, and
they grow by ramped copies (``DepthGrowth(operator="copy" | "stack", ramp_steps >= 1)``).
"""

from __future__ import annotations

from torch import nn

from .registry import BlockAdapter, BlockStack, StackChange, UnsupportedModelError, _register_builtin

POST_LN_REFUSAL = (
    "it is a post-LayerNorm block (LN(x + f(x))): with its residual branches zeroed it computes LN(x), not x, "
    "so no zero-initialised copy is an identity. Grow it with ramped copies instead, "
    "DepthGrowth(operator='copy' or 'stack', ramp_steps >= 1): each new block enters through a residual ramp "
    "(lightning_depthgrow.surgery.ramp: out = x + a * (block(x) - x), a = 0 at birth), which preserves the "
    "function for any shape-preserving block; or use a pre-LayerNorm variant{hint}."
)


def _zero(block: nn.Module) -> list[str]:
    cross = ["multihead_attn.out_proj"] if isinstance(block, nn.TransformerDecoderLayer) else []
    return ["self_attn.out_proj", *cross, "linear2"]


def _refuse(block: nn.Module) -> str | None:
    return None if block.norm_first else POST_LN_REFUSAL.format(hint=" (norm_first=True)")


def _sync_num_layers(model: nn.Module, stack: BlockStack, change: StackChange) -> None:
    # nn.TransformerEncoder/Decoder keep num_layers next to their ``layers`` ModuleList.
    parent_path, _, attr = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if attr != "layers" or not isinstance(getattr(parent, "num_layers", None), int):
        return
    old = len(stack) + (1 if change.kind == "remove" else -1)
    if parent.num_layers != old:
        raise UnsupportedModelError(
            f"{type(parent).__name__} at {parent_path or '<root>'!r} says num_layers={parent.num_layers} but "
            f"holds {old} layers; fix the model before growing it."
        )
    parent.num_layers = len(stack)


def register() -> None:
    """Register the ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` adapter."""
    _register_builtin(
        BlockAdapter(
            (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer),
            _zero,
            name="torch.nn.TransformerLayer",
            refuse=_refuse,
            on_depth_change=_sync_num_layers,
        )
    )
