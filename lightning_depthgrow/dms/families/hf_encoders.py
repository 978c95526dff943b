"""DMS on Hugging Face BERT and RoBERTa encoders: MLP hidden units, self-attention heads, depth.

Recognised by class without importing transformers (:func:`~lightning_depthgrow.adapters.registry.lazy_class`).
Read from transformers 5.x's ``modeling_bert`` / ``modeling_roberta`` (the same layout under two names): a
``BertLayer`` is post-LayerNorm, ``LN(x + f(x))`` for its attention (``attention.self`` -> ``attention.output``) and
its MLP (``intermediate.dense`` -> ``output.dense``); each returns one tensor.

- ``hf_encoder_mlp`` (``block``): hidden units of the MLP (``intermediate.dense`` rows -> ``output.dense``
  columns), folded into ``output.dense``'s input columns; a masked unit adds nothing before the LayerNorm.
- ``hf_encoder_heads`` (``block``): self-attention heads. Head ``j`` is rows ``j*d .. j*d+d-1`` of
  ``query``/``key``/``value`` (``d = attention_head_size``) and the same columns of ``attention.output.dense``,
  where the mask is folded (one element per head). ``BertSelfAttention.forward`` reshapes to ``(-1, d)``, so the
  head count comes from the projections' width: layers may keep different numbers of heads. A config holds no head
  size (``hidden_size / num_attention_heads``), so it cannot describe fewer heads: the config keeps its count, the
  per-layer counts go to ``config.dms_layer_widths`` and a warning says to rebuild the model with
  :func:`~lightning_depthgrow.load_grown` or :func:`~lightning_depthgrow.dms.build_architecture` (as for GPT-2).
- depth: DMS's generic depth gate (``x + m (layer(x) - x)``): with ``m = 0`` the layer is skipped, which is what
  removing it computes (the post-LayerNorm sits inside the layer); export removes layers through the block
  adapter, which keeps ``num_hidden_layers`` and every ``layer_idx`` in step.

The config after export: ``intermediate_size`` follows the MLP width when every kept layer has the same
(``tie=("width",)`` makes them so); then ``save_pretrained`` / ``from_pretrained`` rebuild the export.

Refused at discovery, before anything is attached: ``is_decoder=True`` (causal attention with a KV cache) and
``add_cross_attention``, another layout (another transformers version), subclasses of the layer. The embedding
width is not gated (``embed=True`` is refused by discovery: no family claims it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ...adapters.registry import UnsupportedModelError, lazy_class
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_linear_hidden
from ..topk import HEADS, WIDTH
from .hf_decoders import _groups, _plan_configs

_MODULES = {"Bert": "transformers.models.bert.modeling_bert", "Roberta": "transformers.models.roberta.modeling_roberta"}


def _kind(module: Any) -> str | None:
    """``"Bert"`` or ``"Roberta"`` when ``module`` is exactly that family's ``...Layer``, else ``None``."""
    for prefix, module_name in _MODULES.items():
        cls = lazy_class(module_name, f"{prefix}Layer")
        if cls is not None and type(module) is cls:
            return prefix
    return None


def is_encoder_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``BertLayer`` or ``RobertaLayer`` (exactly)."""
    return _kind(module) is not None


def _is(module: Any, prefix: str, name: str) -> bool:
    cls = lazy_class(_MODULES[prefix], prefix + name)
    return cls is not None and type(module) is cls


def _linears(*modules: Any) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _layout_problem(layer: nn.Module) -> str | None:
    """Why ``layer`` is not the encoder layout sliced here (transformers 5.x), or ``None``."""
    prefix = _kind(layer)
    if getattr(layer, "is_decoder", False) or hasattr(layer, "crossattention"):
        return (
            "it is built with is_decoder=True (causal self-attention with a KV cache, cross-attention with "
            "add_cross_attention): DMS gates BERT/RoBERTa encoders only. Search an encoder (is_decoder=False)"
        )
    attn = getattr(layer, "attention", None)
    inner, out = getattr(attn, "self", None), getattr(attn, "output", None)
    if (
        not _is(attn, prefix, "Attention")
        or getattr(attn, "is_cross_attention", False)
        or not _is(inner, prefix, "SelfAttention")
        or not _linears(*(getattr(inner, n, None) for n in ("query", "key", "value")))
        or not _is(out, prefix, "SelfOutput")
        or not _linears(getattr(out, "dense", None))
    ):
        return (
            "its attention is not a query/key/value self-attention with an output.dense (another transformers version?)"
        )
    d, width = getattr(inner, "attention_head_size", None), inner.query.out_features
    if (
        not isinstance(d, int)
        or d < 1
        or width % d
        or not (inner.key.out_features == inner.value.out_features == width)
    ):
        return "its query/key/value widths are not whole heads of attention_head_size"
    if out.dense.in_features != width:
        return "attention.output.dense does not read the heads' output"
    mid, end = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if not _is(mid, prefix, "Intermediate") or not _is(end, prefix, "Output"):
        return "its MLP is not intermediate.dense -> output.dense (another transformers version?)"
    if not _linears(getattr(mid, "dense", None), getattr(end, "dense", None)):
        return "its MLP is not intermediate.dense -> output.dense Linears"
    if mid.dense.out_features != end.dense.in_features:
        return "intermediate.dense's output is not output.dense's input"
    return None


def _refuse(path: str, problem: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"DMS cannot search the Hugging Face encoder layer at {path!r}: {problem}. Nothing was attached; the model "
        "is untouched."
    )


class HFEncoderFamily(DMSFamily):
    """BERT's ``BertLayer`` and RoBERTa's ``RobertaLayer``: MLP hidden units and self-attention heads.

    Example:
        >>> import transformers
        >>> from lightning_depthgrow.dms import attach_gates, export_model
        >>> config = transformers.BertConfig(
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
        >>> bert = transformers.BertForSequenceClassification(config)
        >>> gates = attach_gates(bert)
        >>> [(s["name"], s["n"]) for s in gates.specs]  # doctest: +NORMALIZE_WHITESPACE
        [('bert/encoder/layer/0:heads', 4), ('bert/encoder/layer/0:mlp', 64), ('bert/encoder/layer/1:heads', 4),
         ('bert/encoder/layer/1:mlp', 64), ('bert/encoder/layer:depth', 2)]
        >>> keep = {name: list(range(g.n)) for name, g in gates.gates.items()}
        >>> keep["bert/encoder/layer/1:heads"], keep["bert/encoder/layer:depth"] = [0, 2], [1]
        >>> _ = export_model(bert, keep)
        >>> attn = bert.bert.encoder.layer[0].attention  # was layer 1
        >>> attn.self.query.out_features, attn.output.dense.in_features, bert.config.num_hidden_layers
        (16, 16, 1)
    """

    name = "Hugging Face BERT/RoBERTa encoder layer"
    sites = ("hf_encoder_mlp", "hf_encoder_heads")

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if not is_encoder_layer(block):
            return None
        problem = _layout_problem(block)
        if problem is not None:
            raise _refuse(path, problem)
        specs: list[GateSpec] = []
        inner = block.attention.self
        n_heads = inner.query.out_features // inner.attention_head_size
        if heads and n_heads > 1:
            specs.append(self._spec(path, "heads", HEADS, "hf_encoder_heads", n_heads))
        if width:
            specs.append(self._spec(path, "mlp", WIDTH, "hf_encoder_mlp", block.intermediate.dense.out_features))
        return specs

    def identity_skip(self, adapter: Any, block: nn.Module) -> bool | None:
        """Asked only when depth gates are requested: the same layout checks as for widths and heads."""
        if not is_encoder_layer(block):
            return None
        problem = _layout_problem(block)
        if problem is not None:
            raise _refuse("a stack of encoder layers", problem)
        return True

    @staticmethod
    def _spec(path: str, suffix: str, kind: str, site: str, n: int) -> GateSpec:
        return {"name": gate_name(path, suffix), "kind": kind, "site": site, "block": path, "n": n, "min_keep": 1}

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "hf_encoder_mlp":
            fold(block.output.dense).columns.append((index, 1))
        else:
            attn = block.attention
            fold(attn.output.dense).columns.append((index, attn.self.attention_head_size))
        return []

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "hf_encoder_mlp":
            slice_linear_hidden(slices, [block.intermediate.dense], block.output.dense, keep)
            return
        inner, out = block.attention.self, block.attention.output
        d = inner.attention_head_size
        idx = _groups(keep, d)
        for proj in (inner.query, inner.key, inner.value):
            slices.add(proj, ["weight", "bias"], 0, idx)
            slices.attr(proj, "out_features", len(idx))
        slices.add(out.dense, ["weight"], 1, idx)
        slices.attr(out.dense, "in_features", len(idx))
        # not read by the forward (it reshapes to (-1, attention_head_size)); kept true for readers
        slices.attr(inner, "num_attention_heads", len(keep))
        slices.attr(inner, "all_head_size", len(idx))

    def plan_config(
        self,
        model: nn.Module,
        specs: list[GateSpec],
        keep: dict[str, list[int]],
        slices: Any,
        stays: Callable[[str], bool],
    ) -> None:
        """``intermediate_size`` follows the MLP width when every kept layer has the same; fewer heads (or
        per-layer widths) cannot be said by a config, which is noted (:func:`~.hf_decoders._plan_configs`)."""

        def counts(layer: nn.Module) -> dict[str, int]:
            inner = layer.attention.self
            return {
                "intermediate_size": layer.intermediate.dense.out_features,
                "num_attention_heads": inner.query.out_features // inner.attention_head_size,
            }

        def fields(config: Any, per_layer: dict[str, list[int]]) -> tuple[dict[str, int], dict[str, str]]:
            new, unsaid = {}, {}
            widths = set(per_layer["intermediate_size"])
            if len(widths) > 1:
                unsaid["intermediate_size"] = "the layers keep different MLP widths"
            elif widths != {config.intermediate_size}:
                new["intermediate_size"] = widths.pop()
            if set(per_layer["num_attention_heads"]) != {config.num_attention_heads}:
                unsaid["num_attention_heads"] = (
                    f"{type(config).__name__} takes the head size as hidden_size / num_attention_heads, so it "
                    "cannot hold fewer heads of the same size"
                )
            return new, unsaid

        def gated_counts(layer: nn.Module, spec: GateSpec, n: int) -> dict[str, int]:
            return {"intermediate_size": n} if spec["kind"] == WIDTH else {"num_attention_heads": n}

        _plan_configs(model, specs, keep, slices, stays, is_encoder_layer, counts, gated_counts, fields)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        b = spec["block"]
        if spec["site"] == "hf_encoder_mlp":
            return [("out", b + ".intermediate.dense"), ("in", b + ".output.dense")]
        a = b + ".attention"
        return [
            *(("out", f"{a}.self.{p}") for p in ("query", "key", "value")),
            ("in", a + ".output.dense"),
            ("heads", a + ".self"),
        ]


__all__ = ["HFEncoderFamily", "is_encoder_layer"]
