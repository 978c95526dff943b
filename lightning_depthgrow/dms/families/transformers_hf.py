"""Hugging Face transformers models DMS does not gate: refused, with a message that says why.

DMS gates GPT-2 blocks and Llama-style decoder layers (:mod:`.hf_decoders`), ViT layers (:mod:`.hf_vit`) and BERT /
RoBERTa encoder layers (:mod:`.hf_encoders`). Any other transformers model (DistilBERT, ALBERT, T5, ...) is refused
when discovery reaches it: its layers would need their own slicing (module names, head bookkeeping) and dropping one
the family's config bookkeeping.
Recognised by the class's module, so ``transformers`` is never imported.
"""

from __future__ import annotations

from torch import nn

from ...adapters.registry import BlockAdapter, UnsupportedModelError
from ..sites import DMSFamily, GateSpec
from .hf_decoders import supported_block as _decoder_block
from .hf_encoders import is_encoder_layer
from .hf_vit import is_vit_layer


def supported_block(module: nn.Module) -> bool:
    """Whether DMS gates ``module``: a GPT-2 block, a Llama-style decoder layer, a ViT or a BERT/RoBERTa layer."""
    return _decoder_block(module) or is_vit_layer(module) or is_encoder_layer(module)


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _is_hf_model(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (the outermost module of a Hugging Face model)."""
    return _is_hf(module) and any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(module).__mro__
    )


def refusal(module: nn.Module, where: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"DMS does not support this Hugging Face transformers model ({type(module).__name__} {where}): "
        "it gates GPT-2 (GPT2Block), Llama, Mistral, Qwen2 and Qwen3 decoder layers, ViT (ViTLayer) and BERT/RoBERTa "
        "encoders (BertLayer, RobertaLayer) only; other layers would need "
        "their own slicing of widths and heads, and their config's bookkeeping when a layer is dropped. Search one "
        "of those models or a timm model, or scale the Hugging Face config by hand."
    )


class TransformersRefusal(DMSFamily):
    name = "Hugging Face transformers (other than GPT-2, Llama-style decoders, ViT, BERT, RoBERTa: refused)"

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if _is_hf_model(block) and not any(supported_block(m) for m in block.modules()):
            raise refusal(block, f"at {path or '<root>'}")
        return None

    def identity_skip(self, adapter: BlockAdapter, block: nn.Module) -> bool | None:
        if _is_hf(block) and not supported_block(block):
            raise refusal(block, "in a stack of registered blocks")
        return None
