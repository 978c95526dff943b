"""DMS on timm ViT ``Block`` and Eva ``EvaBlock``: MLP hidden units, attention heads, block depth.

- ``vit_mlp`` (``block``): hidden units of the block's MLP (timm ``Mlp``: ``fc1`` -> ``fc2``; ``SwiGLU``:
  ``fc1_g``, ``fc1_x`` -> ``fc2``); the mask is folded into ``fc2``'s input columns.
- ``vit_heads`` (``block``): heads of a timm ``Attention``; folded into ``attn.proj``'s input columns,
  per head. Eva's attention reshapes its output to the embedding width, so its heads are refused.
- depth style ``vit``: the block's mask scales both residual branches; each ends in a Linear
  (``attn.proj``, ``mlp.fc2``) followed only by per-channel linear maps (dropout, LayerScale,
  drop-path), so the mask is folded into that Linear's weight and bias.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention, Mlp, SwiGLU
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block
from torch import nn

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
