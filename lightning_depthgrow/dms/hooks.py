"""How DMS masks act on a model: small callable hook objects that read the gates' current masks.

Families (:mod:`lightning_depthgrow.dms.sites`) combine these; none of them names a model family.
Hooks are plain objects (not closures), so ``copy.deepcopy`` of a gated model gives hooks that use the
copy's gates, and :func:`~lightning_depthgrow.dms.remove_gates` finds them by type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .gates import DMSGates


class InputMask:
    """Forward pre-hook: multiply the layer's input channels (``dim``) by gate ``index``'s mask."""

    def __init__(self, gates: DMSGates, index: int, dim: int) -> None:
        self.gates, self.index, self.dim = gates, index, dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        m = self.gates.masks()[self.index]
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return (x * m.view(shape).to(x.dtype), *args[1:])


class OutputScale:
    """Forward hook: multiply the module's output by element ``element`` of gate ``index``'s mask."""

    def __init__(self, gates: DMSGates, index: int, element: int) -> None:
        self.gates, self.index, self.element = gates, index, element

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output * self.gates.masks()[self.index][self.element].to(output.dtype)


class ResidualScale:
    """Forward hook on a whole residual block: ``x + m (block(x) - x)`` (the generic depth gate).

    The block must return one tensor of its input's shape; anything else is refused with a message,
    because scaling part of a tuple (a cache, attention weights) would be a silent wrong model.
    """

    def __init__(self, gates: DMSGates, index: int, element: int) -> None:
        self.gates, self.index, self.element = gates, index, element

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0] if args else None
        if not isinstance(output, Tensor) or not isinstance(x, Tensor) or output.shape != x.shape:
            raise TypeError(
                f"DMS's generic depth gate needs {type(module).__name__} to map one tensor to a tensor of the same "
                f"shape (x + m (block(x) - x)); it returned {type(output).__name__}. Search width only "
                "(depth=False), or give this block type a DMS family (lightning_depthgrow.dms.register_dms_family)."
            )
        return x + self.gates.masks()[self.index][self.element].to(output.dtype) * (output - x)


class MaskedLinear:
    """Replaces an ``nn.Linear``'s ``forward`` with ``F.linear(x, W * col, b * s)``: masks folded into the weight.

    ``col`` is the product of the input-channel masks (MLP hidden units, heads repeated over their
    dims) and of the output scales ``s`` (the block's depth mask). Mathematically the same as masking
    the input and scaling the output, with the same ``dL/dm``, but the multiplies touch the weight
    (out x in) instead of activations (batch x tokens x in) in forward and backward. The factors of all
    the Linears of one attach are gathered in one go per forward pass (:class:`Fold`).
    """

    def __init__(self, gates: DMSGates, module: nn.Linear, fold: Fold) -> None:
        self.gates, self.module, self.fold = gates, module, fold
        self.columns: list[tuple[int, int]] = []  # (gate index, channels per mask element)
        self.scales: list[tuple[int, int]] = []  # (gate index, element)

    def __call__(self, x: Tensor) -> Tensor:
        weight, bias = self.module.weight, self.module.bias
        col, scale = self.fold.factors(self)
        if scale is not None and bias is not None:
            bias = bias * (scale if scale.dtype == bias.dtype else scale.to(bias.dtype))
        if col is not None:
            weight = weight * (col if col.dtype == weight.dtype else col.to(weight.dtype))
        return F.linear(x, weight, bias)


class OutputMask:
    """Forward hook: multiply the module's output channels (last dim) by gate ``index``'s mask.

    Used on the Linear that ends each residual branch of a timm ViT block when the embedding width is gated,
    so the masked residual-stream channels stay exactly 0 (the sliced model has no such channels).
    """

    tile = 1  # the mask repeated this many times over the channels (channel c is element c % n)

    def __init__(self, gates: DMSGates, index: int, tile: int = 1) -> None:
        self.gates, self.index = gates, index
        if tile != 1:
            self.tile = tile

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return output * _tiled(self.gates.masks()[self.index], self.tile).to(output.dtype)


class StreamMask:
    """Forward pre-hook: multiply the input's last dim by gate ``index``'s mask (the residual stream's entry)."""

    tile = 1

    def __init__(self, gates: DMSGates, index: int, tile: int = 1) -> None:
        self.gates, self.index = gates, index
        if tile != 1:
            self.tile = tile

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * _tiled(self.gates.masks()[self.index], self.tile).to(x.dtype), *args[1:])


class MaskedLayerNorm:
    """Replaces an ``nn.LayerNorm``'s ``forward``: statistics over the kept channels only, masked output.

    With mask ``m`` over the last dim: ``mu = sum(m x) / sum(m)``, ``var = sum(m (x - mu)^2) / sum(m)``,
    ``y = m ((x - mu) / sqrt(var + eps) w + b)``. With a hard 0/1 mask this is exactly the LayerNorm of the
    sliced model on the kept channels (and 0 elsewhere); with a soft mask it is its smooth weighted version.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class OneGate:  # what the hook reads: ``gates.masks()[index]``
        ...     def masks(self):
        ...         return [torch.tensor([1.0, 0.0, 1.0, 1.0])]
        >>> norm = nn.LayerNorm(4)
        >>> x = torch.randn(2, 4)
        >>> y = MaskedLayerNorm(OneGate(), 0, norm)(x)
        >>> sliced = nn.functional.layer_norm(x[:, [0, 2, 3]], (3,), norm.weight[[0, 2, 3]], norm.bias[[0, 2, 3]])
        >>> torch.allclose(y[:, [0, 2, 3]], sliced, atol=1e-6), bool((y[:, 1] == 0).all())
        (True, True)
    """

    tile = 1

    def __init__(self, gates: Any, index: int, module: nn.LayerNorm, tile: int = 1) -> None:
        self.gates, self.index, self.module = gates, index, module
        if tile != 1:
            self.tile = tile

    def __call__(self, x: Tensor) -> Tensor:
        norm = self.module
        m = _tiled(self.gates.masks()[self.index], self.tile).to(x.dtype)
        kept = m.sum()
        mean = (x * m).sum(-1, keepdim=True) / kept
        centred = x - mean
        var = (centred * centred * m).sum(-1, keepdim=True) / kept
        y = centred * torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            y = y * norm.weight
        if norm.bias is not None:
            y = y + norm.bias
        return y * m


def _tiled(m: Tensor, tile: int) -> Tensor:
    return m.repeat(tile) if tile > 1 else m


class MaskedMultiheadAttention:
    """Replaces an ``nn.MultiheadAttention``'s ``forward``: its embedding width (input, inner and output channels)
    multiplied by gate ``index``'s mask, tiled ``tile`` times over ``embed_dim`` (channel ``c`` is element
    ``c % n``: with ``tile = num_heads`` and ``n = head_dim``, element ``s`` is dimension ``s`` of every head).

    The query and value rows of ``in_proj_weight``/``in_proj_bias`` and the output rows of ``out_proj`` are masked,
    so a masked dimension adds nothing to the scores (scaled by the supernet's ``head_dim``) nor to the output, and a
    masked output channel is 0. Torch's own ``F.multi_head_attention_forward`` computes the rest (the module's eval
    fast path is not taken). Only packed projections (``_qkv_same_embed_dim``) are handled.
    """

    def __init__(self, gates: Any, index: int, module: nn.MultiheadAttention, tile: int = 1) -> None:
        self.gates, self.index, self.module, self.tile = gates, index, module, tile

    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        mha = self.module
        m = _tiled(self.gates.masks()[self.index], self.tile).to(mha.in_proj_weight.dtype)
        rows = torch.cat([m, torch.ones_like(m), m])  # query and value rows; keys need none
        weight = mha.in_proj_weight * rows[:, None]
        bias = mha.in_proj_bias * rows if mha.in_proj_bias is not None else None
        out_weight = mha.out_proj.weight * m[:, None]
        out_bias = mha.out_proj.bias * m if mha.out_proj.bias is not None else None
        if mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            mha.embed_dim,
            mha.num_heads,
            weight,
            bias,
            mha.bias_k,
            mha.bias_v,
            mha.add_zero_attn,
            mha.dropout,
            out_weight,
            out_bias,
            training=mha.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (out.transpose(0, 1) if mha.batch_first else out), weights


HOOK_TYPES = (InputMask, OutputScale, ResidualScale, OutputMask, StreamMask)
FORWARD_TYPES = (MaskedLinear, MaskedLayerNorm, MaskedMultiheadAttention)  # instance-level forwards DMS installs


class Fold:
    """The :class:`MaskedLinear` of each folded Linear of one attach, created on first use.

    Per forward pass it gathers every folded Linear's column factor (its input masks, repeated over their
    channels, times its scales) and bias scale from the flat mask vector in a few indexing ops, so each
    Linear adds only its two multiplies: per-Linear mask ops (a select, a ``repeat_interleave``, a product)
    and their backward nodes were most of a search step's extra autograd work.
    """

    def __init__(self, gates: DMSGates) -> None:
        self.gates = gates
        self.linears: dict[int, MaskedLinear] = {}
        self._plan: dict[str, Any] | None = None  # index tables, built on first use (after every family's hooks)
        self._factors: tuple[Tensor, list[Tensor | None], list[Tensor | None]] | None = None  # of one mask vector

    def __getstate__(self) -> dict[str, Any]:
        # the factors hold a forward pass's graph, which neither deepcopy nor pickle accept
        return {**self.__dict__, "_plan": None, "_factors": None}

    def __call__(self, linear: nn.Module) -> MaskedLinear:
        return self.linears.setdefault(id(linear), MaskedLinear(self.gates, linear, self))

    def factors(self, masked: MaskedLinear) -> tuple[Tensor | None, Tensor | None]:
        """``(column factor, bias scale)`` of ``masked`` for the current masks (``None`` where it has none)."""
        bank = self.gates.bank
        flat = bank.mask_vector(self.gates.training)
        if self._factors is None or self._factors[0] is not flat:
            self._factors = (flat, *self._gather(flat, bank.sizes))
        slot = masked.__dict__["_slot"]
        return self._factors[1][slot], self._factors[2][slot]

    def _gather(self, flat: Tensor, sizes: list[int]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        plan = self._plan
        if plan is None or plan["device"] != flat.device:
            plan = self._plan = self._make_plan(sizes, flat.device)
        padded = torch.cat([flat, flat.new_ones(1)])  # the last slot: a constant 1 for short factor lists
        columns, scales = None, None
        for k in range(plan["columns"].shape[1]):
            factor = padded[plan["columns"][:, k]]
            columns = factor if columns is None else columns * factor
        for k in range(plan["scales"].shape[1]):
            factor = padded[plan["scales"][:, k]]
            scales = factor if scales is None else scales * factor
        cols = list(columns.split(plan["widths"])) if columns is not None else []
        bias = list(scales.unbind()) if scales is not None else []
        return (
            [cols[i] if has else None for i, has in enumerate(plan["has_columns"])],
            [bias[i] if has else None for i, has in enumerate(plan["has_scales"])],
        )

    def _make_plan(self, sizes: list[int], device: torch.device) -> dict[str, Any]:
        """Per input column of every folded Linear, the flat mask indices whose product is its factor: the
        column masks (element ``c // group``) first, then the scales, as :class:`MaskedLinear` multiplies."""
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        one = sum(sizes)
        rows: list[list[int]] = []
        scale_rows: list[list[int]] = []
        widths: list[int] = []
        has_columns: list[bool] = []
        has_scales: list[bool] = []
        for slot, masked in enumerate(self.linears.values()):
            masked.__dict__["_slot"] = slot
            n = masked.module.weight.shape[1]
            scale_idx = [offsets[index] + element for index, element in masked.scales]
            for c in range(n):
                rows.append([offsets[index] + c // group for index, group in masked.columns] + scale_idx)
            scale_rows.append(scale_idx)
            widths.append(n)
            has_columns.append(bool(masked.columns or masked.scales))
            has_scales.append(bool(masked.scales))

        def table(lists: list[list[int]]) -> Tensor:
            width = max([len(r) for r in lists] + [0])
            padded = [r + [one] * (width - len(r)) for r in lists]
            return torch.tensor(padded, dtype=torch.long, device=device).view(len(lists), width)

        return {
            "device": device,
            "columns": table(rows),
            "scales": table(scale_rows),
            "widths": widths,
            "has_columns": has_columns,
            "has_scales": has_scales,
        }
