"""DMS on timm ViT ``Block`` and Eva ``EvaBlock``: MLP hidden units, attention heads, block depth.

- ``vit_mlp`` (``block``): hidden units of the block's MLP (timm ``Mlp``: ``fc1`` -> ``fc2``; ``SwiGLU``:
  ``fc1_g``, ``fc1_x`` -> ``fc2``); the mask is folded into ``fc2``'s input columns.
- ``vit_heads`` (``block``): heads of a timm ``Attention``; folded into ``attn.proj``'s input columns,
  per head. Eva's attention reshapes its output to the embedding width, so its heads are refused.
- depth style ``vit``: the block's mask scales both residual branches; each ends in a Linear
  (``attn.proj``, ``mlp.fc2``) followed only by per-channel linear maps (dropout, LayerScale,
  drop-path), so the mask is folded into that Linear's weight and bias.
- ``vit_embed`` (opt-in, ``embed=True``): the embedding (residual-stream) width of a timm ``VisionTransformer``
  (:class:`TimmViTEmbedFamily`).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention, Mlp, PatchEmbed, SwiGLU
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ...adapters.registry import UnsupportedModelError
from ..hooks import MaskedLayerNorm, OutputMask, StreamMask
from ..sites import DMSFamily, GateSpec, Hook, gate_name, slice_linear_hidden, tied
from ..topk import HEADS, WIDTH

BLOCKS = (Block, EvaBlock)


def _producers(mlp: nn.Module) -> list[str]:
    return ["fc1_g", "fc1_x"] if isinstance(mlp, SwiGLU) else ["fc1"]


def _head_rows(keep: list[int], heads: int, head_dim: int, parts: int) -> torch.Tensor:
    rows = [p * heads * head_dim + h * head_dim + d for p in range(parts) for h in keep for d in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


class TimmViTFamily(DMSFamily):
    name = "timm ViT/Eva block"
    sites = ("vit_mlp", "vit_heads")
    depth_styles = ("vit",)

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        if type(block) not in BLOCKS:
            return None
        specs: list[GateSpec] = []
        if heads:
            attn = block.attn
            if type(attn) is not Attention:
                raise tied(
                    path,
                    f"the heads ({type(attn).__name__} is not timm's Attention; Eva's attention reshapes its output "
                    "to the embedding width, so its head count is fixed)",
                )
            if not isinstance(attn.norm, nn.Identity):
                raise tied(path, "the heads (attention output norm spans all heads)")
            if attn.num_heads > 1:
                specs.append(
                    {
                        "name": gate_name(path, "heads"),
                        "kind": HEADS,
                        "site": "vit_heads",
                        "block": path,
                        "n": attn.num_heads,
                        "min_keep": 1,
                    }
                )
        if width:
            mlp = block.mlp
            layers = [getattr(mlp, n, None) for n in (*_producers(mlp), "fc2")]
            if type(mlp) not in (Mlp, SwiGLU) or not all(isinstance(m, nn.Linear) for m in layers):
                raise tied(path, f"the MLP hidden units ({type(mlp).__name__} is not timm's Linear Mlp or SwiGLU)")
            if not isinstance(mlp.norm, nn.Identity):
                raise tied(path, "the MLP hidden units (a norm spans them)")
            specs.append(
                {
                    "name": gate_name(path, "mlp"),
                    "kind": WIDTH,
                    "site": "vit_mlp",
                    "block": path,
                    "n": layers[0].out_features,
                    "min_keep": 1,
                }
            )
        return specs

    def depth_style(self, block: nn.Module) -> str | None:
        if type(block) in BLOCKS and isinstance(block.attn.proj, nn.Linear) and isinstance(block.mlp.fc2, nn.Linear):
            return "vit"
        return None

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "vit_mlp":
            fold(block.mlp.fc2).columns.append((index, 1))
        else:
            fold(block.attn.proj).columns.append((index, block.attn.head_dim))
        return []

    def depth_hooks(self, block: nn.Module, style: str, gates: Any, index: int, element: int, fold: Any) -> list[Hook]:
        fold(block.attn.proj).scales.append((index, element))
        fold(block.mlp.fc2).scales.append((index, element))
        return []

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        block = model.get_submodule(spec["block"])
        if spec["site"] == "vit_mlp":
            mlp = block.mlp
            slice_linear_hidden(slices, [getattr(mlp, n) for n in _producers(mlp)], mlp.fc2, keep)
            return
        attn = block.attn
        heads, head_dim = attn.num_heads, attn.head_dim
        slices.add(attn.qkv, ["weight", "bias"], 0, _head_rows(keep, heads, head_dim, 3))
        slices.attr(attn.qkv, "out_features", 3 * len(keep) * head_dim)
        if getattr(attn, "gate", None) is not None:
            slices.add(attn.gate, ["weight", "bias"], 0, _head_rows(keep, heads, head_dim, 1))
            slices.attr(attn.gate, "out_features", len(keep) * head_dim)
        slices.add(attn.proj, ["weight"], 1, _head_rows(keep, heads, head_dim, 1))
        slices.attr(attn.proj, "in_features", len(keep) * head_dim)
        slices.attr(attn, "num_heads", len(keep))
        slices.attr(attn, "attn_dim", len(keep) * head_dim)

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        block = spec["block"]
        if spec["site"] == "vit_mlp":
            mlp = model.get_submodule(block + ".mlp")
            return [("out", f"{block}.mlp.{n}") for n in _producers(mlp)] + [("in", block + ".mlp.fc2")]
        attn = block + ".attn"
        return [("out", attn + ".qkv"), ("out", attn + ".gate"), ("in", attn + ".proj"), ("heads", attn)]


# ------------------------------------------------------------------------------------------ embedding width
_POOLS = ("token", "avg", "max", "avgmax", "")  # channel-wise pools (a masked channel stays 0 through them)


def _norm_paths(model: nn.Module, path: str) -> list[str]:
    """Paths (inside ``model``) of the LayerNorms over the residual stream: made mask-aware, sliced at export."""
    names = ["patch_embed.norm", "norm_pre"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.norm1", f"blocks.{i}.norm2"]
    names += ["norm", "fc_norm"]
    return [n for n in names if not isinstance(model.get_submodule(n), nn.Identity)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _refuse_embed(path: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"DMS cannot gate the embedding width of the VisionTransformer at {path or 'the root'!r}: {why}. "
        "Search it with embed=False (MLP widths, heads and depth are still gated)."
    )


class TimmViTEmbedFamily(DMSFamily):
    """``vit_embed``: the embedding (residual-stream) width of a timm ``VisionTransformer`` (opt-in: ``embed=True``).

    One width gate over the ``embed_dim`` channels. The mask multiplies the stream where it enters the
    blocks (a pre-hook on ``norm_pre``, after patch embedding, class/register tokens and position
    embedding) and the output of every residual branch's last Linear (``attn.proj``, ``mlp.fc2``), so a
    masked channel is exactly 0 all the way; every LayerNorm over the stream (``patch_embed.norm``,
    ``norm_pre``, ``norm1``/``norm2``, ``norm``, ``fc_norm``) takes its statistics over the kept channels
    only (:class:`~lightning_depthgrow.dms.hooks.MaskedLayerNorm`), so with a hard mask the gated model
    computes what the sliced one does. Export slices the patch projection's output channels, the class,
    register and position embeddings, the norms, LayerScale gammas, ``qkv``/``gate``/``fc1`` input
    columns, ``proj``/``fc2`` output rows and the head's input columns; the head dimension of attention
    stays (``head_dim`` and ``attn_dim`` do not depend on the embedding width in timm's ``Attention``).

    Refused (before the model is touched): blocks other than timm's ``Block`` with timm's ``Attention`` and
    ``Mlp``/``SwiGLU``, norms over the stream other than ``nn.LayerNorm``, attention pooling (``global_pool
    ='map'``), a patch embedding whose projection is not a ``Conv2d``.
    """

    name = "timm VisionTransformer embedding width"
    sites = ("vit_embed",)

    def embed_specs(self, path: str, model: nn.Module) -> list[GateSpec] | None:
        if not isinstance(model, VisionTransformer):
            return None
        if type(model) is not VisionTransformer:
            raise _refuse_embed(
                path, f"{type(model).__name__} subclasses VisionTransformer and may compute differently"
            )
        dim = model.embed_dim
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in _POOLS:
            raise _refuse_embed(path, f"global_pool={model.global_pool!r} (attention pooling) is not handled")
        proj = getattr(model.patch_embed, "proj", None)
        if type(model.patch_embed) is not PatchEmbed or not isinstance(proj, nn.Conv2d) or proj.out_channels != dim:
            raise _refuse_embed(
                path, f"the patch embedding {type(model.patch_embed).__name__} is not timm's Conv2d one"
            )
        for i, block in enumerate(model.blocks):
            if type(block) is not Block:
                raise _refuse_embed(path, f"block {i} is a {type(block).__name__}, not timm's Block")
            if type(block.attn) is not Attention or type(block.mlp) not in (Mlp, SwiGLU):
                raise _refuse_embed(path, f"block {i}'s attention or MLP is not timm's Attention and Mlp/SwiGLU")
            if not isinstance(block.attn.proj, nn.Linear) or not isinstance(block.mlp.fc2, nn.Linear):
                raise _refuse_embed(path, f"block {i}'s branches do not end in an nn.Linear")
            for name in ("ls1", "ls2"):
                ls = getattr(block, name)
                if not isinstance(ls, nn.Identity) and not isinstance(getattr(ls, "gamma", None), nn.Parameter):
                    raise _refuse_embed(path, f"block {i}'s {name} is a {type(ls).__name__}, not a LayerScale")
        for name in _norm_paths(model, path):
            norm = model.get_submodule(name)
            if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (dim,):
                raise _refuse_embed(path, f"{name} is a {type(norm).__name__}, not a LayerNorm over the embedding")
            if "forward" in norm.__dict__:
                raise _refuse_embed(path, f"{name} already has an overridden forward")
        if isinstance(model.norm_pre, nn.Identity) and "forward" in model.norm_pre.__dict__:
            raise _refuse_embed(path, "norm_pre already has an overridden forward")
        head = model.head
        if not isinstance(head, (nn.Linear, nn.Identity)):
            raise _refuse_embed(path, f"the head is a {type(head).__name__}, not an nn.Linear")
        return [
            {
                "name": gate_name(path, "embed"),
                "kind": WIDTH,
                "site": "vit_embed",
                "block": path,
                "n": dim,
                "min_keep": 1,
            }
        ]

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Any) -> list[Hook]:
        vit = model.get_submodule(spec["block"])
        hooks: list[Hook] = [(vit.norm_pre, "pre", StreamMask(gates, index))]
        for block in vit.blocks:
            hooks += [
                (block.attn.proj, "post", OutputMask(gates, index)),
                (block.mlp.fc2, "post", OutputMask(gates, index)),
            ]
        for name in _norm_paths(vit, spec["block"]):
            norm = vit.get_submodule(name)
            hooks.append((norm, "forward", MaskedLayerNorm(gates, index, norm)))
        return hooks

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        """Nothing per gate: the whole model is sliced in :meth:`plan_config`, which knows the blocks that stay."""

    def plan_config(
        self, model: nn.Module, specs: list[GateSpec], keep: dict[str, list[int]], slices: Any, stays: Any
    ) -> None:
        for spec in specs:
            path = spec["block"]
            vit = model.get_submodule(path)
            kept = keep[spec["name"]]
            idx = torch.tensor(kept, dtype=torch.long)
            width = len(kept)
            proj = vit.patch_embed.proj
            slices.add(proj, ["weight", "bias"], 0, idx)
            slices.attr(proj, "out_channels", width)
            slices.add(vit, ["cls_token", "reg_token", "pos_embed"], 2, idx)
            for name in _norm_paths(vit, path):
                if not stays(_join(path, name)):
                    continue
                norm = vit.get_submodule(name)
                slices.add(norm, ["weight", "bias"], 0, idx)
                slices.attr(norm, "normalized_shape", (width,))
            for i, block in enumerate(vit.blocks):
                if not stays(_join(path, f"blocks.{i}")):
                    continue
                attn, mlp = block.attn, block.mlp
                for linear in [attn.qkv, getattr(attn, "gate", None), *[getattr(mlp, n) for n in _producers(mlp)]]:
                    if linear is not None:
                        slices.add(linear, ["weight"], 1, idx)
                        slices.attr(linear, "in_features", width)
                for linear in (attn.proj, mlp.fc2):
                    slices.add(linear, ["weight", "bias"], 0, idx)
                    slices.attr(linear, "out_features", width)
                for ls in (block.ls1, block.ls2):
                    if not isinstance(ls, nn.Identity):
                        slices.add(ls, ["gamma"], 0, idx)
            if isinstance(vit.head, nn.Linear):
                slices.add(vit.head, ["weight"], 1, idx)
                slices.attr(vit.head, "in_features", width)
            for attr in ("embed_dim", "num_features", "head_hidden_size"):
                if hasattr(vit, attr):
                    slices.attr(vit, attr, width)
            info = getattr(vit, "feature_info", None)
            if isinstance(info, list):
                slices.attr(vit, "feature_info", [{**f, "num_chs": width} if "num_chs" in f else f for f in info])

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        path = spec["block"]
        vit = model.get_submodule(path)
        roles = [("out", _join(path, "patch_embed.proj")), ("norm", path)]  # path: cls/reg/pos embeddings
        roles += [("norm", _join(path, n)) for n in _norm_paths(vit, path)]
        for i, block in enumerate(vit.blocks):
            b = _join(path, f"blocks.{i}")
            roles += [("in", f"{b}.attn.qkv"), ("in", f"{b}.attn.gate"), ("out", f"{b}.attn.proj")]
            roles += [("in", f"{b}.mlp.{n}") for n in _producers(block.mlp)] + [("out", f"{b}.mlp.fc2")]
            roles += [("norm", f"{b}.{n}") for n in ("ls1", "ls2") if not isinstance(getattr(block, n), nn.Identity)]
        if isinstance(vit.head, nn.Linear):
            roles.append(("in", _join(path, "head")))
        return roles
