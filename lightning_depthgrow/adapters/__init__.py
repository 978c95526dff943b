"""Residual block adapters: the registry that tells the library what a block looks like."""

from .registry import (
    BlockAdapter,
    BlockStack,
    UnsupportedModelError,
    adapter_for,
    find_block_stacks,
    get_stack,
    register_block,
    registered_adapters,
    require_block_stacks,
    unregister_block,
)

__all__ = [
    "BlockAdapter",
    "BlockStack",
    "UnsupportedModelError",
    "adapter_for",
    "find_block_stacks",
    "get_stack",
    "register_block",
    "registered_adapters",
    "require_block_stacks",
    "unregister_block",
]
