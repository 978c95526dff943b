"""DMS on Hugging Face ``ViTModel`` / ``ViTForImageClassification``: the embedding width, MLP hidden units, depth.

Recognised by class without importing transformers (:func:`~lightning_depthgrow.adapters.registry.lazy_class`). Read
from transformers 5.x's ``modeling_vit`` (``ViTAttention`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj``,
``ViTMLP`` with ``fc1``/``fc2``, ``ViTLayer`` returning one tensor); another layout is refused with a message.

- ``hf_vit_embed`` (opt-in, ``embed=True``): the residual-stream width (``config.hidden_size``), one width gate over
  its channels (:class:`HFViTEmbedFamily`).
- ``hf_vit_mlp`` (``block``): hidden units of a ``ViTLayer``'s MLP (``fc1`` -> ``fc2``), folded into ``fc2``'s input
  columns; the config's ``intermediate_size`` follows when every kept layer has the same width (else it keeps the
  supernet's, the per-layer widths go to ``config.dms_layer_widths`` and a warning says how to reload).
- depth: DMS's generic depth gate (``x + m (layer(x) - x)``) on the ``ViTLayer`` stack; export removes layers
  through the block adapter, which keeps ``num_hidden_layers`` in step.

Heads are refused (search with ``heads=False``): a config holds one head count for every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...adapters.registry import UnsupportedModelError, lazy_class
from ..hooks import MaskedLayerNorm, OutputMask
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_linear_hidden, tied
from ..topk import WIDTH
from .hf_decoders import _plan_configs

_MODULE = "transformers.models.vit.modeling_vit"


def _is(module: Any, name: str) -> bool:
    cls = lazy_class(_MODULE, name)
    return cls is not None and type(module) is cls


def is_vit_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``ViTLayer`` (exactly)."""
    return _is(module, "ViTLayer")


def _is_vit_model(module: nn.Module) -> bool:
    return _is(module, "ViTModel") or _is(module, "ViTForImageClassification")


def _layout_problem(layer: nn.Module) -> str | None:
    """Why ``layer`` is not the ViTLayer layout sliced here (transformers 5.x), or ``None``."""
    attn, mlp = getattr(layer, "attention", None), getattr(layer, "mlp", None)
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not _is(attn, "ViTAttention") or not all(type(p) is nn.Linear for p in projs):
        return "its attention is not a q_proj/k_proj/v_proj/o_proj ViTAttention (another transformers version?)"
    if not _is(mlp, "ViTMLP") or not all(type(getattr(mlp, n, None)) is nn.Linear for n in ("fc1", "fc2")):
        return "its MLP is not an fc1 -> fc2 ViTMLP (another transformers version?)"
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _refuse_embed(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"DMS cannot gate the embedding width (hidden_size) of the Hugging Face ViT at {path or 'the root'!r}: {why}. "
        "Search it with embed=False (its MLP widths and depth are still gated, with heads=False)."
    )


def _vit_of(model: nn.Module) -> nn.Module:
    """The ``ViTModel`` of a ``ViTModel`` or ``ViTForImageClassification``."""
    return model.vit if _is(model, "ViTForImageClassification") else model


def _prefix(model: nn.Module) -> str:
    return "vit." if _is(model, "ViTForImageClassification") else ""


def _norm_paths(model: nn.Module) -> list[str]:
    """Paths (inside ``model``) of the LayerNorms over the residual stream."""
    p, vit = _prefix(model), _vit_of(model)
    names = [f"{p}layers.{i}.{n}" for i in range(len(vit.layers)) for n in ("layernorm_before", "layernorm_after")]
    return [*names, f"{p}layernorm"]


def _configs(model: nn.Module) -> list[Any]:
    """The distinct Hugging Face configs held by the modules of ``model``."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict"):
            found.setdefault(id(config), config)
    return list(found.values())


class HFViTEmbedFamily(DMSFamily):
    """``hf_vit_embed``: the embedding width (``hidden_size``) of a Hugging Face ViT (opt-in: ``embed=True``).

    One width gate over the ``hidden_size`` channels of a ``ViTForImageClassification`` or of a ``ViTModel`` with
    its pooler (a ``ViTModel`` inside a ``ViTForImageClassification`` is the classifier's: one gate). The mask
    multiplies the embeddings' output (patch projection, class token, position embedding) and the output of each
    residual branch's last Linear (``attention.o_proj``, ``mlp.fc2``), so a masked channel is exactly 0 all the way;
    every LayerNorm over the stream (``layernorm_before``/``layernorm_after`` of each layer, the final
    ``layernorm``) takes its statistics over the kept channels only
    (:class:`~lightning_depthgrow.dms.hooks.MaskedLayerNorm`). With a hard mask the gated model computes what the
    sliced one does.

    Export slices the patch projection's output channels, the class, mask and position embeddings, the norms,
    ``q/k/v_proj`` and ``fc1`` input columns, ``o_proj``/``fc2`` output rows, the pooler's and the classifier's
    input columns, and sets ``config.hidden_size`` to the kept width. The attention keeps its heads and their size:
    ``config.head_dim`` is set to the supernet's (``ViTAttention`` reads it, else ``hidden_size //
    num_attention_heads``), so ``save_pretrained`` then ``from_pretrained`` rebuild the exported model;
    ``pooler_output_size`` is already explicit in the config. A ``ViTModel``'s ``last_hidden_state`` narrows to the
    kept width (its ``pooler_output`` keeps its size).

    Refused (before the model is touched): subclasses and other ViT heads (``ViTForMaskedImageModeling``), a
    ``ViTModel`` without a pooler (its only output is the stream itself), another transformers layout, norms other
    than ``nn.LayerNorm`` over the embedding or with an overridden forward.
    """

    name = "Hugging Face ViT embedding width"
    sites = ("hf_vit_embed",)

    def embed_specs(self, path: str, model: nn.Module) -> list[GateSpec] | None:
        known = lazy_class(_MODULE, "ViTPreTrainedModel")
        if known is None or not isinstance(model, known):
            return None
        if not _is_vit_model(model):
            raise _refuse_embed(
                path, f"{type(model).__name__} is not ViTModel or ViTForImageClassification (its head is not sliced)"
            )
        vit = _vit_of(model)
        config = vit.config
        dim = config.hidden_size
        if _is(model, "ViTModel") and model.pooler is None:
            raise _refuse_embed(
                path,
                "a ViTModel without a pooler returns the residual stream itself, which would narrow under the code "
                "that reads it; gate a ViTForImageClassification, or a ViTModel with its pooler",
            )
        if vit.pooler is not None and (not _is(vit.pooler, "ViTPooler") or type(vit.pooler.dense) is not nn.Linear):
            raise _refuse_embed(path, "the pooler is not ViTPooler's Linear")
        embeddings = vit.embeddings
        proj = getattr(getattr(embeddings, "patch_embeddings", None), "projection", None)
        if not _is(embeddings, "ViTEmbeddings") or type(proj) is not nn.Conv2d or proj.out_channels != dim:
            raise _refuse_embed(path, "the embeddings are not ViTEmbeddings with a Conv2d patch projection")
        for i, layer in enumerate(vit.layers):
            if not is_vit_layer(layer):
                raise _refuse_embed(path, f"layer {i} is a {type(layer).__name__}, not a ViTLayer")
            problem = _layout_problem(layer)
            if problem is not None:
                raise _refuse_embed(path, f"layer {i}: {problem}")
        for name in _norm_paths(model):
            norm = model.get_submodule(name)
            if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (dim,):
                raise _refuse_embed(path, f"{name} is a {type(norm).__name__}, not a LayerNorm over the embedding")
            if "forward" in norm.__dict__:
                raise _refuse_embed(path, f"{name} already has an overridden forward")
        classifier = getattr(model, "classifier", None)
        if classifier is not None and type(classifier) not in (nn.Linear, nn.Identity):
            raise _refuse_embed(path, f"the classifier is a {type(classifier).__name__}, not an nn.Linear")
        if isinstance(classifier, nn.Identity):
            raise _refuse_embed(path, "num_labels=0: the classifier is the identity, so the output is the stream")
        return [
            {
                "name": gate_name(path, "embed"),
                "kind": WIDTH,
                "site": "hf_vit_embed",
                "block": path,
                "n": dim,
                "min_keep": 1,
            }
        ]

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        top = model.get_submodule(spec["block"])
        vit = _vit_of(top)
        hooks: list[Hook] = [(vit.embeddings, "post", OutputMask(gates, index))]
        for layer in vit.layers:
            hooks += [
                (layer.attention.o_proj, "post", OutputMask(gates, index)),
                (layer.mlp.fc2, "post", OutputMask(gates, index)),
            ]
        for name in _norm_paths(top):
            norm = top.get_submodule(name)
            hooks.append((norm, "forward", MaskedLayerNorm(gates, index, norm)))
        return hooks

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        """Nothing per gate: the whole model is sliced in :meth:`plan_config`, which knows the layers that stay."""

    def plan_config(
        self,
        model: nn.Module,
        specs: list[GateSpec],
        keep: dict[str, list[int]],
        slices: Any,
        stays: Callable[[str], bool],
    ) -> None:
        for spec in specs:
            path = spec["block"]
            top = model.get_submodule(path)
            vit, prefix = _vit_of(top), _prefix(top)
            kept = keep[spec["name"]]
            idx = torch.tensor(kept, dtype=torch.long)
            width = len(kept)
            proj = vit.embeddings.patch_embeddings.projection
            slices.add(proj, ["weight", "bias"], 0, idx)
            slices.attr(proj, "out_channels", width)
            slices.add(vit.embeddings, ["cls_token", "mask_token", "position_embeddings"], 2, idx)
            for name in _norm_paths(top):
                if not stays(_join(path, name)):
                    continue
                norm = top.get_submodule(name)
                slices.add(norm, ["weight", "bias"], 0, idx)
                slices.attr(norm, "normalized_shape", (width,))
            for i, layer in enumerate(vit.layers):
                if not stays(_join(path, f"{prefix}layers.{i}")):
                    continue
                attn, mlp = layer.attention, layer.mlp
                for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc1):
                    slices.add(linear, ["weight"], 1, idx)
                    slices.attr(linear, "in_features", width)
                for linear in (attn.o_proj, mlp.fc2):
                    slices.add(linear, ["weight", "bias"], 0, idx)
                    slices.attr(linear, "out_features", width)
            readers = [vit.pooler.dense] if vit.pooler is not None else []
            if isinstance(getattr(top, "classifier", None), nn.Linear):
                readers.append(top.classifier)
            for linear in readers:
                slices.add(linear, ["weight"], 1, idx)
                slices.attr(linear, "in_features", width)
            head_dim = vit.layers[0].attention.head_dim if len(vit.layers) else None
            for config in _configs(top):
                slices.attr(config, "hidden_size", width)
                if head_dim is not None:  # the heads keep their size, which hidden_size no longer gives
                    slices.attr(config, "head_dim", head_dim)
                if getattr(config, "pooler_output_size", None) is None and vit.pooler is not None:
                    slices.attr(config, "pooler_output_size", vit.pooler.dense.out_features)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        path = spec["block"]
        top = model.get_submodule(path)
        vit = _vit_of(top)
        inner = _join(path, "vit") if vit is not top else path  # the ViTModel's path

        def at(name: str) -> str:
            return _join(inner, name)

        roles = [("out", at("embeddings.patch_embeddings.projection")), ("norm", at("embeddings"))]
        roles += [("norm", _join(path, n)) for n in _norm_paths(top)]
        for i in range(len(vit.layers)):
            b = at(f"layers.{i}")
            roles += [("in", f"{b}.attention.{n}") for n in ("q_proj", "k_proj", "v_proj")]
            roles += [("out", f"{b}.attention.o_proj"), ("in", f"{b}.mlp.fc1"), ("out", f"{b}.mlp.fc2")]
        if vit.pooler is not None:
            roles.append(("in", at("pooler.dense")))
        if isinstance(getattr(top, "classifier", None), nn.Linear):
            roles.append(("in", _join(path, "classifier")))
        return roles


class HFViTFamily(DMSFamily):
    """MLP hidden units of a Hugging Face ``ViTLayer`` (depth: the generic gate); heads refused."""

    name = "Hugging Face ViT layer"
    sites = ("hf_vit_mlp",)

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if not is_vit_layer(block):
            return None
        problem = _layout_problem(block)
        if problem is not None and (width or heads):
            raise tied(path, f"the MLP hidden units and heads ({problem})")
        if heads and block.attention.config.num_attention_heads > 1:
            raise tied(
                path,
                "the heads (a ViTConfig holds one head count for every layer; pass heads=False to search the "
                "embedding width, the MLP widths and the depth of this ViT)",
            )
        if not width:
            return []
        n = block.mlp.fc1.out_features
        return [
            {"name": gate_name(path, "mlp"), "kind": WIDTH, "site": "hf_vit_mlp", "block": path, "n": n, "min_keep": 1}
        ]

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        fold(model.get_submodule(spec["block"]).mlp.fc2).columns.append((index, 1))
        return []

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        mlp = model.get_submodule(spec["block"]).mlp
        slice_linear_hidden(slices, [mlp.fc1], mlp.fc2, keep)

    def plan_config(
        self,
        model: nn.Module,
        specs: list[GateSpec],
        keep: dict[str, list[int]],
        slices: Any,
        stays: Callable[[str], bool],
    ) -> None:
        """``intermediate_size`` follows the MLP width when every kept layer has the same; else noted."""

        def counts(layer: nn.Module) -> dict[str, int]:
            return {"intermediate_size": layer.mlp.fc1.out_features}

        def fields(config: Any, per_layer: dict[str, list[int]]) -> tuple[dict[str, int], dict[str, str]]:
            widths = set(per_layer["intermediate_size"])
            if len(widths) > 1:
                return {}, {"intermediate_size": "the layers keep different MLP widths"}
            (width,) = widths
            return ({"intermediate_size": width} if width != config.intermediate_size else {}), {}

        def gated_counts(layer: nn.Module, spec: GateSpec, n: int) -> dict[str, int]:
            return {"intermediate_size": n}

        _plan_configs(model, specs, keep, slices, stays, is_vit_layer, counts, gated_counts, fields)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        return [("out", spec["block"] + ".mlp.fc1"), ("in", spec["block"] + ".mlp.fc2")]
