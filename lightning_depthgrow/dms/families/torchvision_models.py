"""DMS on torchvision ``ResNet`` blocks and ``VisionTransformer`` encoder blocks.

Recognised by their classes in ``sys.modules`` (:func:`~lightning_depthgrow.adapters.lazy_class`), so this module
never imports torchvision: a model built from these classes has imported it already.

- ``torchvision_conv_width`` (``block``, ``producer``, ``norm``, ``consumer``): inner channels of a ``BasicBlock``
  (``conv1``/``bn1`` -> ``conv2``) or of a ``Bottleneck`` (``conv1``/``bn1`` -> ``conv2`` and ``conv2``/``bn2`` ->
  ``conv3``, two gates); the mask multiplies ``consumer``'s input channels; the producer's outputs and its
  BatchNorm are sliced with it. The block's output channels are tied to the residual add and are not gated;
  grouped convolutions (ResNeXt) and norms other than BatchNorm are refused with a message.
- ``torchvision_vit_mlp`` (``block``): hidden units of an ``EncoderBlock``'s MLP (``mlp[0]`` -> ``mlp[3]``), the
  mask folded into ``mlp[3]``'s input columns.
- depth style ``torchvision_vit``: the block's mask scales both residual branches, ``x + m attn(ln_1(x))`` (a
  forward hook on the ``dropout`` the attention output passes through) and ``x + m mlp(ln_2(x))`` (folded into
  ``mlp[3]``'s weight and bias; the MLP's last dropout is per element). Only the block's own stack is touched:
  ``encoder.layers`` keeps its ``encoder_layer_i`` keys when blocks are dropped.
- ResNet depth: the generic gate ``x + m (block(x) - x)`` on blocks whose skip is the identity (``downsample``
  is ``None``). It is exact at export for any input, where scaling the branch before the block's final ReLU
  would give ``relu(x)`` for a dropped block (equal to ``x`` only for non-negative inputs).

- ``torchvision_vit_embed`` (opt-in, ``embed=True``): the embedding width of the ``VisionTransformer`` together with
  its attention's inner width (:class:`TorchvisionViTEmbedFamily`).

Attention heads of the ViT are refused: ``nn.MultiheadAttention`` derives ``head_dim = embed_dim // num_heads``
from its input width and calls its output projection's weight directly, so a head can neither be sliced out
nor masked. Search it with ``heads=False`` (MLP width and depth).

Example:
    >>> from torchvision.models import VisionTransformer
    >>> from lightning_depthgrow.dms import attach_gates, export_model
    >>> vit = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    >>> gates = attach_gates(vit, heads=False)
    >>> [s["name"] for s in gates.specs]
    ['encoder/layers/encoder_layer_0:mlp', 'encoder/layers/encoder_layer_1:mlp', 'encoder/layers:depth']
    >>> _ = export_model(vit, {"encoder/layers/encoder_layer_0:mlp": [0, 1], "encoder/layers/encoder_layer_1:mlp": [3],
    ...                        "encoder/layers:depth": [1]})
    >>> list(vit.encoder.layers._modules), vit.encoder.layers.encoder_layer_0.mlp[0].out_features
    (['encoder_layer_0'], 1)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...adapters.registry import UnsupportedModelError, lazy_class
from ..hooks import MaskedLayerNorm, MaskedMultiheadAttention, OutputMask, OutputScale, StreamMask
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_linear_hidden, tied
from ..topk import WIDTH
from .conv_hidden import ConvHiddenFamily

_RESNET = "torchvision.models.resnet"
_VIT = "torchvision.models.vision_transformer"


def _resnet_block_kind(module: nn.Module) -> str | None:
    """``"basic"`` or ``"bottleneck"`` for torchvision's own block classes (not subclasses: their forward may
    differ, e.g. the quantizable blocks), else ``None``."""
    if type(module) is lazy_class(_RESNET, "BasicBlock"):
        return "basic"
    if type(module) is lazy_class(_RESNET, "Bottleneck"):
        return "bottleneck"
    return None


def _is_encoder_block(module: nn.Module) -> bool:
    cls = lazy_class(_VIT, "EncoderBlock")
    return cls is not None and type(module) is cls


def _per_channel_norm(module: nn.Module) -> bool:
    """A norm whose statistics and affine are per channel, so slicing channels slices it (BatchNorm variants,
    torchvision's ``FrozenBatchNorm2d``)."""
    frozen = lazy_class("torchvision.ops.misc", "FrozenBatchNorm2d")
    return isinstance(module, _BatchNorm) or (frozen is not None and isinstance(module, frozen))


def _mlp_linears(block: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """``(mlp[0], mlp[3])`` if the block's MLP is torchvision's ``Linear, act, Dropout, Linear, Dropout``."""
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, nn.Sequential) or len(mlp) != 5:
        return None
    first, last = mlp[0], mlp[3]
    if type(first) is not nn.Linear or type(last) is not nn.Linear:
        return None
    # the modules between and after them act per element and hold nothing per hidden unit
    if any(list(mlp[i].parameters()) or list(mlp[i].buffers()) for i in (1, 2, 4)):
        return None
    return first, last


class TorchvisionResNetFamily(ConvHiddenFamily):
    """Inner channels of torchvision ``BasicBlock``/``Bottleneck`` (depth: the generic gate)."""

    name = "torchvision ResNet block"
    sites = ("torchvision_conv_width",)

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        kind = _resnet_block_kind(block)
        if kind is None:
            return None
        if not width:
            return []
        pairs = [("conv1", "bn1", "conv2")]
        if kind == "bottleneck":
            pairs.append(("conv2", "bn2", "conv3"))
        specs = []
        for producer, norm, consumer in pairs:
            prod, cons = block.get_submodule(producer), block.get_submodule(consumer)
            if prod.groups != 1 or cons.groups != 1:
                raise tied(path, f"the channels between {producer} and {consumer} (grouped convolution, as in ResNeXt)")
            if not _per_channel_norm(block.get_submodule(norm)):
                raise tied(
                    path,
                    f"the channels between {producer} and {consumer} ({norm} is a "
                    f"{type(block.get_submodule(norm)).__name__}, not a per-channel BatchNorm)",
                )
            specs.append(self.conv_hidden_spec(path, block, producer, norm, consumer))
        return specs


class TorchvisionViTFamily(DMSFamily):
    """MLP hidden units and depth of torchvision ``EncoderBlock``; its heads are refused."""

    name = "torchvision VisionTransformer EncoderBlock"
    sites = ("torchvision_vit_mlp",)
    depth_styles = ("torchvision_vit",)

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if not _is_encoder_block(block):
            return None
        specs: list[GateSpec] = []
        if heads and block.self_attention.num_heads > 1:
            raise tied(
                path,
                "the attention heads (torch's nn.MultiheadAttention computes head_dim = embed_dim // num_heads from "
                "its input width and uses its out_proj weight directly, so a head can be neither sliced out nor "
                "masked; pass heads=False to search the MLP width and the depth of this VisionTransformer)",
            )
        if width:
            linears = _mlp_linears(block)
            if linears is None:
                raise tied(path, f"the MLP hidden units ({type(block.mlp).__name__} is not torchvision's MLPBlock)")
            specs.append(
                {
                    "name": gate_name(path, "mlp"),
                    "kind": WIDTH,
                    "site": "torchvision_vit_mlp",
                    "block": path,
                    "n": linears[0].out_features,
                    "min_keep": 1,
                }
            )
        return specs

    def depth_style(self, block: nn.Module) -> str | None:
        if _is_encoder_block(block) and isinstance(block.dropout, nn.Dropout) and _mlp_linears(block) is not None:
            return "torchvision_vit"
        return None

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        fold(model.get_submodule(spec["block"]).mlp[3]).columns.append((index, 1))
        return []

    def depth_hooks(self, block: nn.Module, style: str, gates: Any, index: int, element: int, fold: Any) -> list[Hook]:
        fold(block.mlp[3]).scales.append((index, element))
        return [(block.dropout, "post", OutputScale(gates, index, element))]

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        mlp = model.get_submodule(spec["block"]).mlp
        slice_linear_hidden(slices, [mlp[0]], mlp[3], keep)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        return [("out", spec["block"] + ".mlp.0"), ("in", spec["block"] + ".mlp.3")]


# ------------------------------------------------------------------------------------------ embedding width
def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _refuse_embed(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"DMS cannot gate the embedding width (hidden_dim) of the torchvision VisionTransformer at "
        f"{path or 'the root'!r}: {why}. Search it with embed=False (its MLP widths and depth are still gated, with "
        "heads=False)."
    )


def _blocks(vit: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(vit.encoder.layers.named_children())


def _heads_reader(vit: nn.Module) -> nn.Linear:
    """The Linear of ``vit.heads`` that reads the class token (``pre_logits`` if present, else ``head``)."""
    return vit.heads.pre_logits if hasattr(vit.heads, "pre_logits") else vit.heads.head


class TorchvisionViTEmbedFamily(DMSFamily):
    """``torchvision_vit_embed``: the embedding width (``hidden_dim``) of a torchvision ``VisionTransformer``
    (opt-in: ``embed=True``).

    ``nn.MultiheadAttention`` sizes its attention by its input width (``head_dim = embed_dim // num_heads``), so the
    residual stream and the attention's inner width are cut together: one gate of ``head_dim`` elements, element
    ``s`` covering residual channels ``{s + h head_dim}`` and dimension ``s`` of every head (channel ``c`` is element
    ``c % head_dim``: the mask tiled ``num_heads`` times). Keeping ``k`` elements exports ``hidden_dim = k num_heads``
    with ``head_dim = k``; the supernet's ``1 / sqrt(head_dim)`` is kept by scaling the exported query rows by
    ``sqrt(k / head_dim)``.

    The mask multiplies the stream where it enters the blocks (a pre-hook on ``encoder.layers``, after the class
    token, position embedding and dropout), each attention's query and value rows and output (an instance-level
    ``forward`` calling torch's ``F.multi_head_attention_forward`` with masked weights) and each MLP's output
    (``mlp[3]``); ``ln_1``, ``ln_2`` and ``encoder.ln`` take their statistics over the kept channels. Export slices
    ``conv_proj``, ``class_token``, ``pos_embedding``, the norms, ``in_proj_weight``/``in_proj_bias`` (rows and
    columns), ``out_proj``, ``mlp[0]``'s input and ``mlp[3]``'s output and the first Linear of ``heads``, and sets
    ``hidden_dim`` and each attention's ``embed_dim``/``kdim``/``vdim``/``head_dim``. torchvision has no config:
    rebuild the export with :func:`~lightning_depthgrow.dms.build_architecture` on a fresh supernet (or
    :func:`~lightning_depthgrow.load_grown` from a checkpoint).

    Refused (before the model is touched): subclasses, a convolutional stem (``conv_stem_configs``), blocks other
    than torchvision's ``EncoderBlock`` with a packed, bias-free-of-extras ``nn.MultiheadAttention`` and
    ``MLPBlock``, norms other than ``nn.LayerNorm`` over the embedding.
    """

    name = "torchvision VisionTransformer embedding width"
    sites = ("torchvision_vit_embed",)

    def embed_specs(self, path: str, model: nn.Module) -> list[GateSpec] | None:
        cls = lazy_class(_VIT, "VisionTransformer")
        if cls is None or not isinstance(model, cls):
            return None
        if type(model) is not cls:
            raise _refuse_embed(
                path, f"{type(model).__name__} subclasses VisionTransformer and may compute differently"
            )
        dim = model.hidden_dim
        if type(model.conv_proj) is not nn.Conv2d or model.conv_proj.out_channels != dim:
            raise _refuse_embed(path, "a convolutional stem (conv_stem_configs) is not handled")
        if type(model.encoder) is not lazy_class(_VIT, "Encoder") or not isinstance(
            model.encoder.layers, nn.Sequential
        ):
            raise _refuse_embed(path, "the encoder is not torchvision's Encoder")
        heads = None
        norms = [model.encoder.ln]
        for name, block in _blocks(model):
            if not _is_encoder_block(block) or _mlp_linears(block) is None:
                raise _refuse_embed(path, f"{name} is not torchvision's EncoderBlock with its MLPBlock")
            mha = block.self_attention
            plain = (
                type(mha) is nn.MultiheadAttention
                and mha._qkv_same_embed_dim
                and mha.batch_first
                and mha.bias_k is None
                and mha.bias_v is None
                and not mha.add_zero_attn
                and mha.embed_dim == dim
            )
            if not plain:
                raise _refuse_embed(path, f"{name}'s attention is not a packed batch-first nn.MultiheadAttention")
            if heads is not None and mha.num_heads != heads:
                raise _refuse_embed(path, "the blocks have different numbers of heads")
            heads = mha.num_heads
            norms += [block.ln_1, block.ln_2]
        for norm in norms:
            if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (dim,):
                raise _refuse_embed(path, f"a norm over the embedding is a {type(norm).__name__}, not a LayerNorm")
            if "forward" in norm.__dict__:
                raise _refuse_embed(path, "a LayerNorm over the embedding already has an overridden forward")
        if heads is None:
            raise _refuse_embed(path, "it has no encoder block")
        reader = getattr(model.heads, "head", None)
        if not isinstance(model.heads, nn.Sequential) or type(reader) is not nn.Linear:
            raise _refuse_embed(path, "its heads are not torchvision's Sequential of Linear layers")
        if type(_heads_reader(model)) is not nn.Linear:
            raise _refuse_embed(path, "heads.pre_logits is not an nn.Linear")
        return [
            {
                "name": gate_name(path, "embed"),
                "kind": WIDTH,
                "site": "torchvision_vit_embed",
                "block": path,
                "n": dim // heads,
                "tile": heads,
                "min_keep": 1,
            }
        ]

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        vit, tile = model.get_submodule(spec["block"]), spec["tile"]
        hooks: list[Hook] = [(vit.encoder.layers, "pre", StreamMask(gates, index, tile))]
        for _, block in _blocks(vit):
            mha = block.self_attention
            hooks += [
                (mha, "forward", MaskedMultiheadAttention(gates, index, mha, tile)),
                (block.mlp[3], "post", OutputMask(gates, index, tile)),
            ]
            hooks += [(norm, "forward", MaskedLayerNorm(gates, index, norm, tile)) for norm in (block.ln_1, block.ln_2)]
        hooks.append((vit.encoder.ln, "forward", MaskedLayerNorm(gates, index, vit.encoder.ln, tile)))
        return hooks

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        """Nothing per gate: the whole model is sliced in :meth:`plan_config`, which knows the blocks that stay."""

    def plan_config(
        self, model: nn.Module, specs: list[GateSpec], keep: dict[str, list[int]], slices: Any, stays: Any
    ) -> None:
        for spec in specs:
            path, tile, n = spec["block"], spec["tile"], spec["n"]
            vit = model.get_submodule(path)
            kept = keep[spec["name"]]
            width = len(kept) * tile
            idx = torch.tensor([h * n + s for h in range(tile) for s in kept], dtype=torch.long)
            dim = n * tile
            slices.add(vit.conv_proj, ["weight", "bias"], 0, idx)
            slices.attr(vit.conv_proj, "out_channels", width)
            slices.add(vit, ["class_token"], 2, idx)
            slices.add(vit.encoder, ["pos_embedding"], 2, idx)
            slices.attr(vit, "hidden_dim", width)
            norms = [vit.encoder.ln]
            scale = math.sqrt(len(kept) / n)  # the supernet's 1/sqrt(n) where the export computes 1/sqrt(len(kept))

            query_rows = torch.ones(3 * width)
            query_rows[:width] = scale

            for name, block in _blocks(vit):
                if not stays(_join(path, f"encoder.layers.{name}")):
                    continue
                norms += [block.ln_1, block.ln_2]
                mha = block.self_attention
                slices.add(mha, ["in_proj_weight", "in_proj_bias"], 0, torch.cat([idx, idx + dim, idx + 2 * dim]))
                slices.add(mha, ["in_proj_weight"], 1, idx)
                for name_ in ("in_proj_weight", "in_proj_bias"):
                    if getattr(mha, name_, None) is not None:
                        slices.scale_rows(mha, name_, query_rows)
                slices.add(mha.out_proj, ["weight", "bias"], 0, idx)
                slices.add(mha.out_proj, ["weight"], 1, idx)
                slices.attr(mha.out_proj, "in_features", width)
                slices.attr(mha.out_proj, "out_features", width)
                for attr, value in (("embed_dim", width), ("kdim", width), ("vdim", width), ("head_dim", len(kept))):
                    slices.attr(mha, attr, value)
                first, last = block.mlp[0], block.mlp[3]
                slices.add(first, ["weight"], 1, idx)
                slices.attr(first, "in_features", width)
                slices.add(last, ["weight", "bias"], 0, idx)
                slices.attr(last, "out_features", width)
            for norm in norms:
                slices.add(norm, ["weight", "bias"], 0, idx)
                slices.attr(norm, "normalized_shape", (width,))
            reader = _heads_reader(vit)
            slices.add(reader, ["weight"], 1, idx)
            slices.attr(reader, "in_features", width)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        path = spec["block"]
        vit = model.get_submodule(path)
        roles = [("out", _join(path, "conv_proj")), ("norm", path), ("norm", _join(path, "encoder"))]
        roles.append(("norm", _join(path, "encoder.ln")))
        for name, _ in _blocks(vit):
            b = _join(path, f"encoder.layers.{name}")
            roles += [("norm", f"{b}.ln_1"), ("norm", f"{b}.ln_2"), ("in", f"{b}.mlp.0"), ("out", f"{b}.mlp.3")]
            a = f"{b}.self_attention"
            roles += [("in", a), ("out", a), ("heads", a), ("in", f"{a}.out_proj"), ("out", f"{a}.out_proj")]
        head = "heads.pre_logits" if hasattr(vit.heads, "pre_logits") else "heads.head"
        roles.append(("in", _join(path, head)))
        return roles

    def flop_shares(self, model: nn.Module, spec: GateSpec) -> dict[str, list[tuple[float, tuple[str, ...]]]]:
        """An ``nn.MultiheadAttention`` over ``S`` tokens of width ``E`` runs its projections in its own forward
        (``8 S E^2`` FLOPs per sample: in and out, scaling with the kept fraction squared) and the attention
        products (``4 S^2 E``: linear in it)."""
        vit = model.get_submodule(spec["block"])
        e, seq = vit.hidden_dim, vit.seq_length
        projections = 2 * e / (2 * e + seq)
        return {
            _join(spec["block"], f"encoder.layers.{name}.self_attention"): [
                (projections, ("in", "out")),
                (1.0 - projections, ("heads",)),
            ]
            for name, _ in _blocks(vit)
        }
