"""Hugging Face transformers models: refused, with a message that says why.

DMS has no gates for them yet (GPT-2's ``Conv1D`` stores its weight transposed; Llama-style attention
groups query heads over shared key/value heads), and dropping a decoder layer would leave the
config's depth (``num_hidden_layers``, ``n_layer``) and the layers' ``layer_idx`` (the KV cache) stale:
a silently wrong ``generate()``. Recognised by the class's module, so ``transformers`` is never imported.
"""

from __future__ import annotations

from torch import nn

from ...adapters.registry import BlockAdapter, UnsupportedModelError
from ..sites import DMSFamily, GateSpec


def _is_hf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def refusal(module: nn.Module, path: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"DMS does not support Hugging Face transformers models ({type(module).__name__} at "
        f"{path or '<root>'}): it has no width or head gates for them (GPT-2's Conv1D, grouped-query "
        "attention), and dropping a decoder layer would leave the config's depth and the layers' layer_idx "
        "(KV cache) stale. Search a timm model, or scale the Hugging Face config by hand."
    )


class TransformersRefusal(DMSFamily):
    name = "Hugging Face transformers (refused)"

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if _is_hf(block):
            raise refusal(block, path)
        return None

    def identity_skip(self, adapter: BlockAdapter, block: nn.Module) -> bool | None:
        if _is_hf(block):
            raise refusal(block, "a registered block stack")
        return None
