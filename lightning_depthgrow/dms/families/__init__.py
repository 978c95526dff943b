"""The built-in DMS families, one module each; each registers only when its library imports.

- :mod:`.timm_vit`: timm ViT ``Block`` and Eva ``EvaBlock`` (MLP hidden units, ViT heads, depth folded
  into the branches' last Linear).
- :mod:`.timm_resnet`: timm ResNet ``BasicBlock``/``Bottleneck`` (inner channels, depth on the branch).

- :mod:`.hf_decoders`: Hugging Face GPT-2 blocks and Llama/Mistral/Qwen2/Qwen3 decoder layers (MLP hidden
  units, heads or key/value-head groups); :mod:`.hf_vit`: Hugging Face ViT (embedding width with ``embed=True``, MLP
  hidden units, depth); :mod:`.hf_encoders`: Hugging Face BERT and RoBERTa encoders (MLP hidden units, heads,
  depth); :mod:`.transformers_hf` refuses other transformers models.

Any other stack of registered blocks gets generic depth gates.
"""

from __future__ import annotations

from ..sites import DMSFamily, GateSpec, describe_model, discover_gates, gate_name
from .torchvision_models import (  # never imports torchvision
    TorchvisionResNetFamily,
    TorchvisionViTEmbedFamily,
    TorchvisionViTFamily,
)


def register_builtin_families(registry: list[DMSFamily]) -> None:
    """Append the built-in families to ``registry`` (after any user registration); skip absent libraries."""
    registry.extend([TorchvisionResNetFamily(), TorchvisionViTFamily(), TorchvisionViTEmbedFamily()])
    from .hf_decoders import HFDecoderFamily, HFGPT2Family
    from .hf_encoders import HFEncoderFamily
    from .hf_vit import HFViTEmbedFamily, HFViTFamily
    from .transformers_hf import TransformersRefusal

    registry.extend(
        [
            HFGPT2Family(),
            HFDecoderFamily(),
            HFEncoderFamily(),
            HFViTFamily(),
            HFViTEmbedFamily(),
            TransformersRefusal(),
        ]
    )
    try:
        from .timm_resnet import TimmResNetFamily
        from .timm_vit import TimmViTEmbedFamily, TimmViTFamily
    except ImportError:
        return
    registry.extend([TimmViTFamily(), TimmViTEmbedFamily(), TimmResNetFamily()])


__all__ = ["GateSpec", "describe_model", "discover_gates", "gate_name", "register_builtin_families"]
