"""Hugging Face transformers families: GPT-2, Llama/Mistral/Qwen2/Qwen3 decoder layers, ViT, BERT/RoBERTa.

Recognised without importing transformers (:func:`~.registry.lazy_class`). What each family needs beyond
zeroing the last projection of every residual branch:

* **Config depth.** ``LlamaModel`` (and relatives) run ``layers[: config.num_hidden_layers]``; GPT-2's cache
  is sized from ``config.n_layer``; Qwen2 picks each layer's attention mask from ``config.layer_types[i]``.
  After an insertion or removal every config on the path to the stack is updated (depth, ``layer_types``).
* **Per-layer indices.** Attention modules carry ``layer_idx``, their slot in the KV cache; a copied block
  would share its template's slot, so every ``layer_idx`` of the stack is renumbered by position.
* **Init.** A new block is re-initialised as ``PreTrainedModel._init_weights`` does (normal with the config's
  ``initializer_range`` for ``Linear`` and GPT-2's ``Conv1D``, which has no ``reset_parameters``; norms to
  weight 1, bias 0), with torch's own init functions (HF's skip tensors flagged as loaded).
* **Post-LayerNorm encoders** (BERT, RoBERTa) are found, so curvature is reported per layer, but zero-init growth
  is refused: ``LN(x + f(x))`` with ``f`` zeroed is ``LN(x)``, not ``x``. Ramped copies
  (``DepthGrowth(operator="copy" | "stack", ramp_steps >= 1)``) grow them.
* **GPT-2 with** ``scale_attn_by_inverse_layer_idx=True`` (e.g. Stanford CRFM's GPT-2 models) is refused by every
  operator: each layer's attention is scaled by ``1 / (layer_idx + 1)``, fixed when the layer is built, so a block
  copied to (or shifted into) another position computes something else than the layer a model rebuilt from the
  grown config (``save_pretrained`` / ``from_pretrained``) holds there. Removing a block other than the last
  renumbers the layers after it, so it is refused too (:func:`removal_refusal`: DMS refuses depth gates on such a
  stack at setup); removing the last block keeps every position and is allowed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .registry import BlockAdapter, BlockStack, StackChange, UnsupportedModelError, _register_builtin, lazy_class
from .torch_nn import POST_LN_REFUSAL

_GPT2 = ("transformers.models.gpt2.modeling_gpt2", "GPT2Block")
_DECODERS = (
    ("transformers.models.llama.modeling_llama", "LlamaDecoderLayer"),
    ("transformers.models.mistral.modeling_mistral", "MistralDecoderLayer"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3DecoderLayer"),
)
_VIT = (("transformers.models.vit.modeling_vit", "ViTLayer"),)
_POST_LN = (
    ("transformers.models.bert.modeling_bert", "BertLayer"),
    ("transformers.models.roberta.modeling_roberta", "RobertaLayer"),
)


def _matcher(*classes: tuple[str, str]) -> Callable[[nn.Module], bool]:
    def match(module: nn.Module) -> bool:
        types = tuple(t for t in (lazy_class(m, c) for m, c in classes) if t is not None)
        return bool(types) and isinstance(module, types)

    return match


def _existing(block: nn.Module, *candidates: str) -> str:
    """The first of ``candidates`` that is a sub-module of ``block`` (names differ across transformers versions)."""
    for name in candidates:
        try:
            block.get_submodule(name)
        except AttributeError:
            continue
        return name
    raise UnsupportedModelError(
        f"{type(block).__name__} has none of the sub-modules {list(candidates)}; this transformers version lays "
        "the block out differently. Register the block with register_block(..., zero_init=[...])."
    )


def _gpt2_zero(block: nn.Module) -> list[str]:
    cross = ["crossattention.c_proj"] if hasattr(block, "crossattention") else []
    return ["attn.c_proj", *cross, "mlp.c_proj"]


#: Why a GPT-2 whose attention is scaled by its layer index cannot grow (any operator).
INVERSE_LAYER_IDX_REFUSAL = (
    "its config sets scale_attn_by_inverse_layer_idx=True: each layer scales its attention by 1 / (layer_idx + 1), "
    "fixed when the layer is built, so a block copied to, or shifted into, another position computes something "
    "else than the layer a model rebuilt from the grown config (save_pretrained / from_pretrained) holds there; the "
    "grown model would not reload as itself. Depth growth of such a model is not supported: train one built with "
    "scale_attn_by_inverse_layer_idx=False."
)


#: Why a block other than the last cannot be removed from such a GPT-2 (DMS depth gates, any other removal).
INVERSE_LAYER_IDX_REMOVAL = (
    "its config sets scale_attn_by_inverse_layer_idx=True: each layer scales its attention by 1 / (layer_idx + 1), "
    "fixed when the layer is built, so removing a block other than the last renumbers the layers after it: in memory "
    "they keep their old scale, but a model rebuilt from the config (save_pretrained / from_pretrained) scales them "
    "by their new positions, so the smaller model would not reload as itself. Removing only the last block keeps "
    "every position; for any other, build the model with scale_attn_by_inverse_layer_idx=False."
)


def _scales_by_layer_idx(block: nn.Module) -> bool:
    return bool(getattr(_config_of(block), "scale_attn_by_inverse_layer_idx", False))


def removal_refusal(block: nn.Module) -> str | None:
    """Why blocks cannot be removed from (or gated out of) the stack holding ``block``, or ``None``.

    GPT-2 with ``scale_attn_by_inverse_layer_idx=True``: a removal renumbers ``layer_idx``, which its attention
    scale was fixed from (:data:`INVERSE_LAYER_IDX_REMOVAL`). The one place this is known: DMS's depth gates
    (:mod:`lightning_depthgrow.dms.families.hf_decoders`) and the stack bookkeeping (``_sync_hf``) both ask here.
    """
    return INVERSE_LAYER_IDX_REMOVAL if _scales_by_layer_idx(block) else None


def _gpt2_refuse(block: nn.Module) -> str | None:
    return INVERSE_LAYER_IDX_REFUSAL if _scales_by_layer_idx(block) else None


def _decoder_zero(block: nn.Module) -> list[str]:
    return ["self_attn.o_proj", "mlp.down_proj"]


def _vit_zero(block: nn.Module) -> list[str]:
    return [
        _existing(block, "attention.o_proj", "attention.output.dense"),
        _existing(block, "mlp.fc2", "output.dense"),
    ]


def _post_ln_refuse(block: nn.Module) -> str | None:
    return POST_LN_REFUSAL.format(hint="")


def _config_of(block: nn.Module) -> object | None:
    return next((m.config for m in block.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)


def _hf_reinit(block: nn.Module) -> None:
    """``PreTrainedModel._init_weights`` for the modules a block holds, with torch's init functions."""
    config = _config_of(block)
    std = getattr(config, "initializer_range", None) or 0.02
    for module in block.modules():
        name = type(module).__name__
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(module, nn.Linear) or name == "Conv1D":
            nn.init.normal_(module.weight, std=std)
            if bias is not None:
                nn.init.zeros_(bias)
        elif isinstance(module, nn.LayerNorm) or "LayerNorm" in name or "RMSNorm" in name:
            if isinstance(weight, nn.Parameter):
                nn.init.ones_(weight)
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)
        elif any(True for _ in module.parameters(recurse=False)):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def _configs_above(model: nn.Module, path: str) -> list[object]:
    """The distinct HF configs held by ``model`` and the modules on the way to ``path`` (outermost first)."""
    configs: list[object] = []
    module = model
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict") and all(config is not c for c in configs):
            configs.append(config)
        if i < len(parts):
            module = getattr(module, parts[i])
    return configs


def _sync_hf(model: nn.Module, stack: BlockStack, change: StackChange) -> None:
    """Keep ``num_hidden_layers``/``n_layer``, ``layer_types`` and every ``layer_idx`` in step with the stack."""
    new = len(stack)
    old = new - 1 if change.kind == "insert" else new + 1
    if change.kind == "insert" and any(_scales_by_layer_idx(block) for block in stack.blocks):
        # Every operator inserts through here (ramped copies skip the zero-init refusals): refuse before any change.
        raise UnsupportedModelError(f"Cannot grow stack {stack.path!r}: {INVERSE_LAYER_IDX_REFUSAL}")
    if change.kind == "remove" and change.index != new:  # the block removed was not the last one
        reason = next((r for r in map(removal_refusal, stack.blocks) if r is not None), None)
        if reason is not None:
            raise UnsupportedModelError(f"Cannot remove block {change.index} of stack {stack.path!r}: {reason}")
    configs = [c for c in _configs_above(model, stack.path) if hasattr(c, "num_hidden_layers")]
    for config in configs:
        if config.num_hidden_layers != old:
            raise UnsupportedModelError(
                f"{type(config).__name__}.num_hidden_layers is {config.num_hidden_layers} but stack "
                f"{stack.path!r} holds {old} layers, so the model does not run them all. Make the config match "
                "the layers before growing."
            )
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) != old:
            raise UnsupportedModelError(
                f"{type(config).__name__}.layer_types has {len(types)} entries for {old} layers; make it match."
            )
    for config in configs:
        config.num_hidden_layers = new
        types = getattr(config, "layer_types", None)
        if isinstance(types, list):
            if change.kind == "insert":
                types.insert(change.index, types[change.template if change.template is not None else change.index - 1])
            else:
                del types[change.index]
    for position, block in enumerate(stack.blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position


def register() -> None:
    """Register the transformers adapters (matched lazily: transformers is never imported here)."""
    for name, zero, classes, refuse in (
        ("transformers.GPT2Block", _gpt2_zero, (_GPT2,), _gpt2_refuse),
        ("transformers.DecoderLayer", _decoder_zero, _DECODERS, None),
        ("transformers.ViTLayer", _vit_zero, _VIT, None),
    ):
        _register_builtin(
            BlockAdapter(
                nn.Module,
                zero,
                name=name,
                match=_matcher(*classes),
                refuse=refuse,
                reinit=_hf_reinit,
                on_depth_change=_sync_hf,
            )
        )
    _register_builtin(
        BlockAdapter(
            nn.Module,
            [],
            name="transformers.PostLNEncoderLayer",
            match=_matcher(*_POST_LN),
            refuse=_post_ln_refuse,
            on_depth_change=_sync_hf,
        )
    )
