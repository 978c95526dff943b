"""Soft FLOPs and parameter counts as differentiable functions of the DMS masks.

One forward pass records every ``nn.Linear``/``nn.Conv*`` call and every timm ``Attention`` call
(their FLOPs follow from shapes: ``2 * out_elements * in_channels/groups * kernel`` for a layer,
``4 B H T^2 D`` for attention, the convention of :class:`torch.utils.flop_counter.FlopCounterMode`).
Each count is then a *term*: its full size times the kept fraction of every gate on its input and
output channels (a linear layer scales with kept-in x kept-out, attention with kept heads), times the
mask of the block that contains it. Counts use the straight-through estimator: the forward value is
the hard count (what export keeps), the gradient that of the soft masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .gates import CONTAINER, DMSGates

Factor = tuple  # ("frac", gate) or ("elem", gate, index)

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layer_flops(module: nn.Module, output: Tensor) -> int:
    if isinstance(module, nn.Linear):
        return 2 * (output.numel() // module.out_features) * module.in_features * module.out_features
    kernel = int(torch.tensor(module.kernel_size).prod())
    return 2 * output.numel() * (module.in_channels // module.groups) * kernel


@dataclass
class ResourceModel:
    """Analytic FLOPs and parameters of a gated model, as sums of terms over gate factors.

    Build it with :meth:`build`; evaluate with :meth:`evaluate`. ``full_flops``/``full_params`` are
    the ungated model's counts (the gate container's own parameters excluded).

    Example:
        >>> import timm
        >>> from lightning_depthgrow.dms import attach_gates
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> gates = attach_gates(vit)
        >>> res = ResourceModel.build(vit, torch.zeros(1, 3, 32, 32))
        >>> float(res.evaluate(gates, "params")) == res.full_params
        True
    """

    terms: dict[tuple[Factor, ...], list[float]] = field(default_factory=dict)  # factors -> [flops, params]
    full_flops: float = 0.0
    full_params: float = 0.0
    # index tables of evaluate(), built on first use for one gate layout and device
    _table_key: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _table_value: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, model: nn.Module, example_input: Any) -> ResourceModel:
        """Record one forward pass of ``model`` (eval, no grad) and derive the terms from its gates."""
        gates = model._modules.get(CONTAINER)
        specs = gates.specs if isinstance(gates, DMSGates) else []
        in_gate, out_gate, norm_gate, head_gate, block_elem = _factor_maps(model, specs)
        flops = _record_flops(model, example_input)
        res = cls()
        for name, module in model.named_modules():
            if name == CONTAINER or name.startswith(CONTAINER + "."):
                continue
            elem = _enclosing(name, block_elem)
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, _LAYERS):
                    factors = [out_gate.get(name)] + ([in_gate.get(name)] if pname == "weight" else [])
                else:
                    factors = [norm_gate.get(name)]
                res._add([*factors, elem], 0.0, float(p.numel()))
            for kind, count in flops.get(name, []):
                if kind == "layer":
                    factors = [in_gate.get(name), out_gate.get(name)]
                else:
                    factors = [head_gate.get(name)]
                res._add([*factors, elem], float(count), 0.0)
        res.full_flops = sum(v[0] for v in res.terms.values())
        res.full_params = sum(v[1] for v in res.terms.values())
        return res

    def _add(self, factors: list[Factor | None], flops: float, params: float) -> None:
        key = tuple(sorted(f for f in factors if f is not None))
        entry = self.terms.setdefault(key, [0.0, 0.0])
        entry[0] += flops
        entry[1] += params

    def evaluate(self, gates: DMSGates, resource: str = "flops", hard: bool = False) -> Tensor:
        """FLOPs or parameters under the gates' masks: straight-through counts, or exact hard counts.

        Vectorised over the terms: the factor values (each gate's kept fraction, each block's mask)
        form one vector, and each term multiplies its count by the factors it indexes (float64, in the
        same left-to-right order for hard and straight-through values, so they agree exactly).
        """
        column = {"flops": 0, "params": 1}[resource]
        bank = gates.bank
        flat = bank.hard() if hard else bank.straight_through()
        table = self._table(gates, flat.device)
        flat = flat.double()
        fractions = torch.zeros(len(bank.sizes), dtype=flat.dtype, device=flat.device)
        fractions = fractions.index_add(0, table["owner"], flat) / table["sizes"]
        values = torch.cat([fractions, flat, torch.ones(1, dtype=flat.dtype, device=flat.device)])
        term = table["counts"][:, column]
        for k in range(table["factors"].shape[1]):
            term = term * values[table["factors"][:, k]]
        return term.sum()

    def _table(self, gates: DMSGates, device: torch.device) -> dict[str, Tensor]:
        """Index tables of the terms for ``gates`` (built once per gate layout and device)."""
        key = (tuple(gates.gates), device)
        if self._table_key != key:
            names, sizes = list(gates.gates), gates.bank.sizes
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            one = len(sizes) + sum(sizes)  # index of the constant 1 that pads short factor lists
            rows = []
            for factors in self.terms:
                idx = [
                    names.index(f[1]) if f[0] == "frac" else len(sizes) + offsets[names.index(f[1])] + f[2]
                    for f in factors
                ]
                rows.append(idx)
            width = max([len(r) for r in rows] + [1])
            self._table_key = key
            self._table_value = {
                "factors": torch.tensor(
                    [r + [one] * (width - len(r)) for r in rows], dtype=torch.long, device=device
                ).view(len(rows), width),
                "counts": torch.tensor(list(self.terms.values()), dtype=torch.float64, device=device).view(-1, 2),
                "owner": gates.bank.layout()["owner"].to(device),
                "sizes": torch.tensor(sizes, dtype=torch.float64, device=device),
            }
        return self._table_value

    def full(self, resource: str = "flops") -> float:
        """The supernet's FLOPs or parameters (``resource`` is ``"flops"`` or ``"params"``)."""
        return self.full_flops if resource == "flops" else self.full_params

    def minimum(self, gates: DMSGates, resource: str = "flops") -> float:
        """The count with every gate at its smallest allowed keep (the most a search can remove)."""
        with _ratios_at_max(gates):
            return float(self.evaluate(gates, resource, hard=True))


@contextmanager
def _ratios_at_max(gates: DMSGates) -> Iterator[None]:
    saved = [(g, g.ratio.detach().clone(), g.importance.clone()) for g in gates.gates.values()]
    try:
        with torch.no_grad():
            for g in gates.gates.values():
                g.importance.copy_(torch.arange(g.n, dtype=g.importance.dtype, device=g.importance.device))
                g.ratio.fill_(g.max_ratio)
        yield
    finally:
        with torch.no_grad():
            for g, ratio, importance in saved:
                g.ratio.copy_(ratio)
                g.importance.copy_(importance)


def _factor_maps(model: nn.Module, specs: list[dict]) -> tuple[dict, dict, dict, dict, dict]:
    in_gate: dict[str, Factor] = {}
    out_gate: dict[str, Factor] = {}
    norm_gate: dict[str, Factor] = {}
    head_gate: dict[str, Factor] = {}
    block_elem: dict[str, Factor] = {}
    for s in specs:
        frac: Factor = ("frac", s["name"])
        if s["site"] == "vit_mlp":
            out_gate[s["block"] + ".mlp.fc1"] = frac
            in_gate[s["block"] + ".mlp.fc2"] = frac
        elif s["site"] == "vit_heads":
            attn = s["block"] + ".attn"
            out_gate[attn + ".qkv"] = frac
            out_gate[attn + ".gate"] = frac
            in_gate[attn + ".proj"] = frac
            head_gate[attn] = frac
        elif s["site"] == "conv_width":
            out_gate[f"{s['block']}.{s['producer']}"] = frac
            norm_gate[f"{s['block']}.{s['norm']}"] = frac
            in_gate[f"{s['block']}.{s['consumer']}"] = frac
        elif s["site"] == "depth":
            for j, i in enumerate(s["blocks"]):
                block_elem[f"{s['stack']}.{i}"] = ("elem", s["name"], j)
    return in_gate, out_gate, norm_gate, head_gate, block_elem


def _enclosing(name: str, block_elem: dict[str, Factor]) -> Factor | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        factor = block_elem.get(".".join(parts[:end]))
        if factor is not None:
            return factor
    return None


def _attention_types() -> tuple[type, ...]:
    try:
        from timm.layers import Attention
    except ImportError:
        return ()
    return (Attention,)


def _record_flops(model: nn.Module, example_input: Any) -> dict[str, list]:
    """``{module name: [("layer" | "attention", flops), ...]}`` for one eval forward pass."""
    records: dict[str, list] = {}
    handles = []
    attention = _attention_types()

    def layer_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            records.setdefault(name, []).append(("layer", _layer_flops(module, output)))

        return hook

    def attention_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            b, t, _ = args[0].shape
            records.setdefault(name, []).append(("attention", 4 * b * module.num_heads * t * t * module.head_dim))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _LAYERS):
            handles.append(module.register_forward_hook(layer_hook(name)))
        elif attention and type(module) in attention:
            handles.append(module.register_forward_pre_hook(attention_hook(name)))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return records


@torch.no_grad()
def fit_to_budget(gates: DMSGates, resources: ResourceModel, budget: float, resource: str = "flops") -> int:
    """Drop width elements one at a time until the hard count is within ``budget``; returns how many.

    The search ends near its target but may sit just above it (the resource loss is zero below the
    target, so the task loss pushes back up). Each round removes the least important kept element of
    the relatively widest width gate by raising that gate's ratio by one element. Deterministic, so
    every rank reaches the same masks.
    """
    removed = 0
    while float(resources.evaluate(gates, resource, hard=True)) > budget:
        candidates = [g for g in gates.gate_list() if g.kind == "width" and g.keep_count() > g.min_keep]
        if not candidates:
            break
        gate = max(candidates, key=lambda g: g.keep_count() / g.n)
        k = gate.keep_count() - 1
        # keep count is n - ceil(a n - 1/2): a = (n - k + 1/4) / n keeps exactly k
        gate.ratio.fill_((gate.n - k + 0.25) / gate.n)
        if gate.frozen:
            gate.frozen_ratio.fill_(gate.ratio.item())
        removed += 1
    return removed
