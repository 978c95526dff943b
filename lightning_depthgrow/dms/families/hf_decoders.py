"""DMS on Hugging Face transformers decoders: GPT-2 blocks and Llama-style decoder layers.

Recognised by class without importing transformers (:func:`~lightning_depthgrow.adapters.registry.lazy_class`: a
model holding one of these blocks has imported its module already). Read from transformers 5.x's forwards:

- ``hf_gpt2_mlp`` (``block``): hidden units of ``GPT2MLP``. ``Conv1D`` stores its weight as ``(in, out)``, so
  ``c_fc`` keeps weight columns and bias entries, ``mlp.c_proj`` weight rows. The mask is a pre-hook on
  ``mlp.c_proj``'s input (only ``nn.Linear`` is folded).
- ``hf_gpt2_heads`` (``block``): self-attention heads of ``GPT2Attention``. ``c_attn`` packs ``q | k | v`` along
  its output, so a head keeps its ``head_dim`` columns in each of the three parts, and its rows of ``attn.c_proj``.
  The forward splits ``c_attn``'s output at ``split_size`` and infers the head count from ``head_dim``: export sets
  ``split_size`` (and ``num_heads``). Mask: a pre-hook on ``attn.c_proj``'s input, one element per head.
- ``hf_decoder_mlp`` (``block``): hidden units of a Llama-style MLP (``gate_proj``, ``up_proj`` -> ``down_proj``),
  folded into ``down_proj``'s input columns.
- ``hf_decoder_heads`` (``block``): key/value-head *groups* of grouped-query attention: key/value head ``j`` with
  the ``num_key_value_groups`` query heads that share it (query heads ``j*g .. j*g+g-1``, ``repeat_kv``'s order).
  Gating whole groups keeps ``num_key_value_groups`` the same in every layer, so grouped-query attention stays
  valid (eager ``repeat_kv`` and SDPA alike). The forward reads only ``head_dim`` and ``num_key_value_groups``
  (head counts come from the projections' widths), so layers may keep different numbers of heads. Folded into
  ``o_proj``'s input columns, one element per group.
- depth: DMS's generic depth gate (``x + m (layer(x) - x)``); export removes layers through the block adapter,
  which keeps the config's depth, ``layer_types`` and every ``layer_idx`` (the KV cache) in step. GPT-2 built with
  ``scale_attn_by_inverse_layer_idx=True`` is refused depth gates at discovery (its attention scale is fixed from
  ``layer_idx``, which a removal renumbers; :func:`~lightning_depthgrow.adapters.hf_transformers.removal_refusal`).

The config after export (``plan_config``): when every kept layer has the same MLP width, ``n_inner`` /
``intermediate_size`` is set to it; when every kept Llama-style layer keeps the same key/value-head groups,
``num_key_value_heads``, ``num_attention_heads`` and ``head_dim`` are set. ``save_pretrained`` then
``from_pretrained`` (or the model class built from the config, then ``load_state_dict``) rebuild the exported model.
A config cannot say that layers differ, nor hold GPT-2 heads other than ``n_embd / n_head`` (GPT-2 derives
``head_dim`` from them): those fields keep the supernet's values, the exported per-layer counts go to
``config.dms_layer_widths`` and a warning says to rebuild the model with :func:`~lightning_depthgrow.load_grown`
(the checkpoint's events) or :func:`~lightning_depthgrow.dms.build_architecture`; loading by the config refuses
the weights with a size mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# the block classes the adapters know (module, class), and the configs on the way to a module
from ...adapters.hf_transformers import _DECODERS, _GPT2, _configs_above, removal_refusal
from ...adapters.registry import BlockAdapter, UnsupportedModelError, lazy_class
from ..hooks import InputMask
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_linear_hidden, tied
from ..topk import HEADS, WIDTH


def _is(module: nn.Module, module_name: str, class_name: str) -> bool:
    cls = lazy_class(module_name, class_name)
    return cls is not None and type(module) is cls


def is_gpt2_block(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``GPT2Block`` (exactly; a subclass may compute otherwise)."""
    return _is(module, *_GPT2)


def is_decoder_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Llama, Mistral, Qwen2 or Qwen3 decoder layer (exactly)."""
    return any(_is(module, m, c) for m, c in _DECODERS)


def supported_block(module: nn.Module) -> bool:
    """Whether DMS gates ``module`` (a GPT-2 block or a Llama-style decoder layer)."""
    return is_gpt2_block(module) or is_decoder_layer(module)


def _is_conv1d(module: Any) -> bool:
    cls = lazy_class("transformers.pytorch_utils", "Conv1D")
    return cls is not None and type(module) is cls


def _groups(keep: list[int], width: int, parts: int = 1, part_width: int | None = None) -> torch.Tensor:
    """Channel indices of the kept groups: group ``j`` is channels ``j*width .. j*width+width-1`` of each of
    ``parts`` consecutive parts of ``part_width`` channels (``q | k | v`` packed in one projection)."""
    part_width = 0 if part_width is None else part_width
    rows = [p * part_width + j * width + d for p in range(parts) for j in keep for d in range(width)]
    return torch.tensor(rows, dtype=torch.long)


class GroupedInputMask(InputMask):
    """Forward pre-hook: multiply the last dim of the layer's input by gate ``index``'s mask, each element
    covering ``group`` consecutive channels (a head's ``head_dim`` outputs)."""

    def __init__(self, gates: Any, index: int, group: int) -> None:
        super().__init__(gates, index, -1)
        self.group = group

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        m = self.gates.masks()[self.index]
        if self.group > 1:
            m = m.repeat_interleave(self.group)
        return (x * m.to(x.dtype), *args[1:])


class HFGPT2Family(DMSFamily):
    """GPT-2's ``GPT2Block``: MLP hidden units (``Conv1D``) and self-attention heads.

    Example:
        >>> import transformers
        >>> from lightning_depthgrow.dms import attach_gates, export_model
        >>> config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=32, n_positions=16)
        >>> gpt2 = transformers.GPT2LMHeadModel(config)
        >>> [(s["name"], s["n"]) for s in attach_gates(gpt2).specs]  # doctest: +NORMALIZE_WHITESPACE
        [('transformer/h/0:heads', 4), ('transformer/h/0:mlp', 64), ('transformer/h/1:heads', 4),
         ('transformer/h/1:mlp', 64), ('transformer/h:depth', 2)]
        >>> keep = {"transformer/h/0:heads": [1, 3], "transformer/h/1:heads": [0, 1, 2, 3],
        ...         "transformer/h/0:mlp": list(range(10)), "transformer/h/1:mlp": list(range(64)),
        ...         "transformer/h:depth": [0, 1]}
        >>> _ = export_model(gpt2, keep)
        >>> attn = gpt2.transformer.h[0].attn
        >>> attn.c_attn.weight.shape, attn.split_size, gpt2.transformer.h[0].mlp.c_fc.weight.shape
        (torch.Size([16, 24]), 8, torch.Size([16, 10]))
    """

    name = "Hugging Face GPT-2 block"
    sites = ("hf_gpt2_mlp", "hf_gpt2_heads")

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if not is_gpt2_block(block):
            return None
        specs: list[GateSpec] = []
        if heads:
            attn = block.attn
            layers = (getattr(attn, "c_attn", None), getattr(attn, "c_proj", None))
            if getattr(attn, "is_cross_attention", False) or not all(_is_conv1d(m) for m in layers):
                raise tied(path, "the heads (attn is not GPT-2's Conv1D self-attention)")
            head_dim, split = getattr(attn, "head_dim", None), getattr(attn, "split_size", None)
            if not isinstance(head_dim, int) or split != attn.c_attn.nf // 3 or split % head_dim:
                raise tied(path, "the heads (attn.split_size/head_dim do not describe c_attn: another GPT-2 layout)")
            if split // head_dim > 1:
                specs.append(self._spec(path, "heads", HEADS, "hf_gpt2_heads", split // head_dim))
        if width:
            mlp = block.mlp
            if not (_is_conv1d(getattr(mlp, "c_fc", None)) and _is_conv1d(getattr(mlp, "c_proj", None))):
                raise tied(path, "the MLP hidden units (mlp is not GPT-2's Conv1D c_fc -> c_proj)")
            specs.append(self._spec(path, "mlp", WIDTH, "hf_gpt2_mlp", mlp.c_fc.nf))
        return specs

    def identity_skip(self, adapter: BlockAdapter, block: nn.Module) -> bool | None:
        """Asked only when depth gates are requested: refused where a removal would renumber a layer's fixed
        attention scale (``scale_attn_by_inverse_layer_idx=True``), before anything is attached."""
        if not is_gpt2_block(block):
            return None
        reason = removal_refusal(block)
        if reason is not None:
            raise UnsupportedModelError(
                f"DMS cannot gate the depth of this GPT-2: {reason} Search it without depth gates, "
                "DifferentiableModelScaling(depth=False) (or attach_gates(model, depth=False)): its MLP widths and "
                "heads keep every layer's position, so their export reloads as itself."
            )
        return None

    @staticmethod
    def _spec(path: str, suffix: str, kind: str, site: str, n: int) -> GateSpec:
        return {"name": gate_name(path, suffix), "kind": kind, "site": site, "block": path, "n": n, "min_keep": 1}

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "hf_gpt2_mlp":
            return [(block.mlp.c_proj, "pre", InputMask(gates, index, -1))]
        return [(block.attn.c_proj, "pre", GroupedInputMask(gates, index, block.attn.head_dim))]

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "hf_gpt2_mlp":
            idx = _groups(keep, 1)
            c_fc, c_proj = block.mlp.c_fc, block.mlp.c_proj
            slices.add(c_fc, ["weight"], 1, idx)
            slices.add(c_fc, ["bias"], 0, idx)
            slices.add(c_proj, ["weight"], 0, idx)
            slices.attr(c_fc, "nf", len(keep))
            slices.attr(c_proj, "nx", len(keep))
            return
        attn = block.attn
        head_dim, width = attn.head_dim, len(keep) * attn.head_dim
        qkv = _groups(keep, head_dim, parts=3, part_width=attn.split_size)
        slices.add(attn.c_attn, ["weight"], 1, qkv)
        slices.add(attn.c_attn, ["bias"], 0, qkv)
        slices.add(attn.c_proj, ["weight"], 0, _groups(keep, head_dim))
        slices.attr(attn.c_attn, "nf", 3 * width)
        slices.attr(attn.c_proj, "nx", width)
        slices.attr(attn, "split_size", width)
        slices.attr(attn, "num_heads", len(keep))

    def plan_config(
        self,
        model: nn.Module,
        specs: list[GateSpec],
        keep: dict[str, list[int]],
        slices: Any,
        stays: Callable[[str], bool],
    ) -> None:
        """``n_inner`` follows the MLP width when every kept block has the same; a config cannot describe
        anything else (per-layer widths, or heads other than ``n_embd / n_head``: GPT-2 derives ``head_dim``
        from them), which is noted (:func:`_plan_configs`)."""

        def counts(block: nn.Module) -> dict[str, int]:
            return {"n_inner": block.mlp.c_fc.nf, "n_head": block.attn.split_size // block.attn.head_dim}

        def fields(config: Any, per_layer: dict[str, list[int]]) -> tuple[dict[str, int], dict[str, str]]:
            new, unsaid = {}, {}
            inner = per_layer["n_inner"][0] if len(set(per_layer["n_inner"])) == 1 else None
            current = config.n_inner if config.n_inner is not None else 4 * config.n_embd
            if inner is None:
                unsaid["n_inner"] = "the layers keep different MLP widths"
            elif inner != current:
                new["n_inner"] = inner
            if set(per_layer["n_head"]) != {config.n_head}:
                unsaid["n_head"] = (
                    "GPT-2 takes head_dim = n_embd / n_head, so its config cannot hold fewer heads of the same size"
                )
            return new, unsaid

        def gated_counts(block: nn.Module, spec: GateSpec, n: int) -> dict[str, int]:
            return {"n_inner": n} if spec["kind"] == WIDTH else {"n_head": n}

        _plan_configs(model, specs, keep, slices, stays, is_gpt2_block, counts, gated_counts, fields)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        b = spec["block"]
        if spec["site"] == "hf_gpt2_mlp":
            return [("out", b + ".mlp.c_fc"), ("in", b + ".mlp.c_proj")]
        return [("out", b + ".attn.c_attn"), ("in", b + ".attn.c_proj"), ("heads", b + ".attn")]


class HFDecoderFamily(DMSFamily):
    """Llama, Mistral, Qwen2 and Qwen3 decoder layers: MLP hidden units and key/value-head groups.

    Example (4 query heads over 2 key/value heads: two groups of one key/value head and two query heads):
        >>> import transformers
        >>> from lightning_depthgrow.dms import attach_gates, export_model
        >>> config = transformers.LlamaConfig(
        ...     hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...     num_key_value_heads=2, vocab_size=32)
        >>> llama = transformers.LlamaForCausalLM(config)
        >>> gates = attach_gates(llama)
        >>> {s["name"]: s["n"] for s in gates.specs}["model/layers/0:heads"]
        2
        >>> keep = {name: list(range(g.n)) for name, g in gates.gates.items()}
        >>> keep["model/layers/1:heads"], keep["model/layers:depth"] = [1], [1]  # layer 1 keeps its 2nd group
        >>> _ = export_model(llama, keep)
        >>> attn = llama.model.layers[0].self_attn  # was layer 1
        >>> len(llama.model.layers), llama.config.num_hidden_layers, attn.layer_idx
        (1, 1, 0)
        >>> attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups
        (16, 8, 2)
    """

    name = "Hugging Face Llama-style decoder layer"
    sites = ("hf_decoder_mlp", "hf_decoder_heads")

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if not is_decoder_layer(block):
            return None
        specs: list[GateSpec] = []
        if heads:
            groups = _kv_heads(path, block.self_attn)
            if groups > 1:
                specs.append(HFGPT2Family._spec(path, "heads", HEADS, "hf_decoder_heads", groups))
        if width:
            mlp = block.mlp
            layers = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if not all(type(m) is nn.Linear for m in layers) or layers[0].out_features != layers[2].in_features:
                raise tied(path, "the MLP hidden units (mlp is not a gate_proj, up_proj -> down_proj Linear MLP)")
            specs.append(HFGPT2Family._spec(path, "mlp", WIDTH, "hf_decoder_mlp", layers[0].out_features))
        return specs

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "hf_decoder_mlp":
            fold(block.mlp.down_proj).columns.append((index, 1))
        else:
            attn = block.self_attn
            fold(attn.o_proj).columns.append((index, attn.num_key_value_groups * attn.head_dim))
        return []

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "hf_decoder_mlp":
            mlp = block.mlp
            slice_linear_hidden(slices, [mlp.gate_proj, mlp.up_proj], mlp.down_proj, keep)
            return
        attn = block.self_attn
        head_dim, group = attn.head_dim, attn.num_key_value_groups
        queries, keys = _groups(keep, group * head_dim), _groups(keep, head_dim)
        for proj, idx in ((attn.q_proj, queries), (attn.k_proj, keys), (attn.v_proj, keys)):
            slices.add(proj, ["weight", "bias"], 0, idx)
            slices.attr(proj, "out_features", len(idx))
        slices.add(attn.o_proj, ["weight"], 1, queries)
        slices.attr(attn.o_proj, "in_features", len(queries))
        # older transformers versions keep head counts on the module; keep them true where present
        for name, value in (("num_heads", len(keep) * group), ("num_key_value_heads", len(keep))):
            if isinstance(getattr(attn, name, None), int):
                slices.attr(attn, name, value)

    def plan_config(
        self,
        model: nn.Module,
        specs: list[GateSpec],
        keep: dict[str, list[int]],
        slices: Any,
        stays: Callable[[str], bool],
    ) -> None:
        """``intermediate_size`` follows the MLP width, ``num_key_value_heads`` and ``num_attention_heads`` the
        kept key/value-head groups (with ``head_dim`` set explicitly, as it no longer equals ``hidden_size /
        num_attention_heads``), each when every kept layer has the same; per-layer counts are noted
        (:func:`_plan_configs`)."""

        def counts(layer: nn.Module) -> dict[str, int]:
            attn = layer.self_attn
            return {
                "intermediate_size": layer.mlp.gate_proj.out_features,
                "num_key_value_heads": attn.k_proj.out_features // attn.head_dim,
                "num_attention_heads": attn.q_proj.out_features // attn.head_dim,
                "head_dim": attn.head_dim,
            }

        def fields(config: Any, per_layer: dict[str, list[int]]) -> tuple[dict[str, int], dict[str, str]]:
            new, unsaid = {}, {}
            if len(set(per_layer["intermediate_size"])) == 1:
                if per_layer["intermediate_size"][0] != config.intermediate_size:
                    new["intermediate_size"] = per_layer["intermediate_size"][0]
            else:
                unsaid["intermediate_size"] = "the layers keep different MLP widths"
            kv = config.num_key_value_heads if config.num_key_value_heads is not None else config.num_attention_heads
            heads = ("num_key_value_heads", "num_attention_heads", "head_dim")
            if any(len(set(per_layer[f])) > 1 for f in heads):
                for f in heads[:2]:
                    unsaid[f] = "the layers keep different numbers of key/value-head groups"
            elif per_layer["num_key_value_heads"][0] != kv or per_layer["num_attention_heads"][0] != (
                config.num_attention_heads
            ):
                new.update({f: per_layer[f][0] for f in heads})
            return new, unsaid

        def gated_counts(layer: nn.Module, spec: GateSpec, n: int) -> dict[str, int]:
            if spec["kind"] == WIDTH:
                return {"intermediate_size": n}
            return {"num_key_value_heads": n, "num_attention_heads": n * layer.self_attn.num_key_value_groups}

        _plan_configs(model, specs, keep, slices, stays, is_decoder_layer, counts, gated_counts, fields)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        b = spec["block"]
        if spec["site"] == "hf_decoder_mlp":
            return [("out", b + ".mlp.gate_proj"), ("out", b + ".mlp.up_proj"), ("in", b + ".mlp.down_proj")]
        a = b + ".self_attn"
        return [*(("out", f"{a}.{p}_proj") for p in "qkv"), ("in", a + ".o_proj"), ("heads", a)]


def _kv_heads(path: str, attn: nn.Module) -> int:
    """The number of key/value heads of a Llama-style attention, after checking its layout is the one sliced."""
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    head_dim, group = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
    if not all(type(p) is nn.Linear for p in projs) or not isinstance(head_dim, int) or not isinstance(group, int):
        raise tied(
            path, "the heads (self_attn is not a q/k/v/o_proj Linear attention with head_dim and num_key_value_groups)"
        )
    q, k, v, o = projs
    kv = k.out_features // head_dim
    if k.out_features != kv * head_dim or v.out_features != k.out_features or q.out_features != kv * group * head_dim:
        raise tied(path, "the heads (q/k/v_proj widths do not match head_dim and num_key_value_groups)")
    if o.in_features != q.out_features:
        raise tied(path, "the heads (o_proj's input is not the query heads' output)")
    return kv


LAYER_WIDTHS = "dms_layer_widths"  # config attribute: the exported per-layer counts a config cannot describe


def _plan_configs(
    model: nn.Module,
    specs: list[GateSpec],
    keep: dict[str, list[int]],
    slices: Any,
    stays: Callable[[str], bool],
    is_block: Callable[[nn.Module], bool],
    counts: Callable[[nn.Module], dict[str, int]],
    gated_counts: Callable[[nn.Module, GateSpec, int], dict[str, int]],
    fields: Callable[[Any, dict[str, list[int]]], tuple[dict[str, int], dict[str, str]]],
) -> None:
    """Bring every Hugging Face config above the kept blocks in step with the exported widths.

    Per config: the kept blocks' counts after export (``counts`` of the block, updated by
    ``gated_counts(block, spec, kept elements)`` for each of its gates), then ``fields(config, per_layer)`` ->
    ``(new values, {field: why it cannot be said})``.
    The new values are set (``save_pretrained`` then ``from_pretrained`` rebuild the model); where a field
    cannot be said it keeps the supernet's value, the per-layer counts are recorded in
    ``config.dms_layer_widths`` (saved with it) and a warning says how to reload the model instead.
    """
    gated: dict[str, dict[str, int]] = {}
    for s in specs:
        block = model.get_submodule(s["block"])
        after = gated.setdefault(s["block"], counts(block))
        after.update(gated_counts(block, s, len(keep[s["name"]])))
    per_config: dict[int, tuple[Any, list[dict[str, int]]]] = {}
    for path, module in model.named_modules():
        if not is_block(module) or not stays(path):
            continue
        layer = gated.get(path) or counts(module)
        for config in _configs_above(model, path):
            per_config.setdefault(id(config), (config, []))[1].append(layer)
    for config, layers in per_config.values():
        per_layer = {k: [layer[k] for layer in layers] for k in layers[0]}
        new, unsaid = fields(config, per_layer)
        for name, value in new.items():
            slices.attr(config, name, value)
        if unsaid:
            slices.attr(config, LAYER_WIDTHS, {k: per_layer[k] for k in unsaid})
            reasons = "; ".join(f"{k}: {why}" for k, why in unsaid.items())
            slices.note(
                f"{type(config).__name__} cannot describe the exported model ({reasons}), so the config keeps "
                f"the supernet's {', '.join(unsaid)} and the per-layer counts are in "
                f"config.{LAYER_WIDTHS}. save_pretrained writes them, but from_pretrained (or the model class "
                "built from this config, then load_state_dict) refuses the weights with a size mismatch. Reload "
                "the exported model with lightning_depthgrow.load_grown(fresh_module, checkpoint) or "
                "lightning_depthgrow.dms.build_architecture(fresh_supernet, architecture)."
            )
        elif getattr(config, LAYER_WIDTHS, None) is not None:
            slices.attr(config, LAYER_WIDTHS, None)
