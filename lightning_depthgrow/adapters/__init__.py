"""Residual block adapters: the registry that tells the library what a block looks like.

Built-in adapters cover timm (ViT/DeiT, ResNet, ConvNeXt, Eva, Swin, EfficientNet/MobileNetV3), Hugging Face
transformers (GPT-2, Llama/Mistral/Qwen2/Qwen3, ViT; BERT/RoBERTa found but not grown), torchvision (ResNet,
VisionTransformer) and ``nn.TransformerEncoderLayer``/``DecoderLayer``; :func:`register_block` adds your own.
"""

from .registry import (
    BlockAdapter,
    BlockStack,
    StackChange,
    UnsupportedModelError,
    adapter_for,
    find_block_stacks,
    get_stack,
    key_prefix,
    lazy_class,
    no_block_structure_message,
    register_block,
    registered_adapters,
    require_block_stacks,
    reset_parameters,
    unregister_block,
)

__all__ = [
    "BlockAdapter",
    "BlockStack",
    "StackChange",
    "UnsupportedModelError",
    "adapter_for",
    "find_block_stacks",
    "get_stack",
    "key_prefix",
    "lazy_class",
    "no_block_structure_message",
    "register_block",
    "registered_adapters",
    "require_block_stacks",
    "reset_parameters",
    "unregister_block",
]
