"""Soft FLOPs and parameter counts as differentiable functions of the DMS masks.

The FLOPs come from torch's own :class:`torch.utils.flop_counter.FlopCounterMode`, run once on the
model (math attention kernel, so fused kernels are counted as their matmuls): every module's *own*
FLOPs (its count minus its sub-modules'). Each count is then a *term*: that number times the kept
fraction of every gate the module's family declares on its inputs, outputs or heads
(:meth:`~lightning_depthgrow.dms.sites.DMSFamily.resource_roles`), times the mask of the block that
contains it. Whatever the counter counts (HF ``Conv1D``'s addmm, Eva's attention, any matmul in a
forward) is in the total; only how it scales comes from the families. Counts use the
straight-through estimator: the forward value is the hard count (what export keeps), the gradient
that of the soft masks.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..measure import count_flops
from .gates import CONTAINER, DMSGates
from .sites import ROLES, family_for_site
from .topk import DEPTH, HEADS, WIDTH

Factor = tuple  # ("frac", gate) or ("elem", gate, index)


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
        """Count ``model``'s FLOPs once (eval, no grad, FlopCounterMode) and derive the terms from its gates."""
        gates = model._modules.get(CONTAINER)
        specs = gates.specs if isinstance(gates, DMSGates) else []
        roles, block_elem, shares = _factor_maps(model, specs)
        flops = _own_flops(model, example_input)
        res = cls()
        seen: set[int] = set()
        for name, module in model.named_modules():
            if name == CONTAINER or name.startswith(CONTAINER + "."):
                continue
            elem = _enclosing(name, block_elem)
            role = roles.get(name, {})
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:  # tied weights count once, as count_parameters does
                    continue
                seen.add(id(p))
                if "norm" in role:
                    factors = [role["norm"]]
                else:
                    # a weight's columns are the inputs (``nn.MultiheadAttention``'s packed ``in_proj_weight`` too)
                    weight = pname == "weight" or pname.endswith("_weight")
                    factors = [role.get("out")] + ([role.get("in")] if weight else [])
                res._add([*factors, elem], 0.0, float(p.numel()))
            if flops.get(name) and name in shares:
                for share, names in shares[name]:
                    res._add([*(role.get(r) for r in names), elem], share * float(flops[name]), 0.0)
            elif flops.get(name):
                res._add([role.get("in"), role.get("out"), role.get("heads"), elem], float(flops[name]), 0.0)
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
        bank = gates.bank
        flat = bank.hard() if hard else bank.straight_through()
        table = self._table(gates, flat.device)
        values = self._factor_values(table, flat.double())
        term = table["counts"][:, {"flops": 0, "params": 1}[resource]]
        for k in range(table["factors"].shape[1]):
            term = term * values[table["factors"][:, k]]
        return term.sum()

    def count_and_mask_gradient(self, gates: DMSGates, resource: str = "flops") -> tuple[Tensor, Tensor]:
        """The hard count and its straight-through gradient with respect to the flat mask, in closed form.

        The same numbers as ``evaluate(gates, resource)`` and autograd through it down to the flat mask
        (:meth:`~lightning_depthgrow.dms.topk.GateBank.straight_through`), without building a graph: every term
        is a product of factors, so its derivative by one factor is the count times the others (float64).
        :meth:`~lightning_depthgrow.dms.topk.GateBank.ratio_gradient` carries it on to the ratios. The search
        does this once per step, where an autograd pass over the count and the mask graph cost ten times more.

        Example:
            >>> import timm
            >>> from lightning_depthgrow.dms import attach_gates
            >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
            >>> gates = attach_gates(vit)
            >>> res = ResourceModel.build(vit, torch.zeros(1, 3, 32, 32))
            >>> count, mask_grad = res.count_and_mask_gradient(gates)
            >>> float(count) == res.full_flops, tuple(mask_grad.shape) == (sum(gates.bank.sizes),)
            (True, True)
        """
        bank = gates.bank
        flat = bank.hard()
        table = self._table(gates, flat.device)
        values = self._factor_values(table, flat.double())
        counts = table["counts"][:, {"flops": 0, "params": 1}[resource]]
        factors = table["factors"]
        width = factors.shape[1]
        picked = [values[factors[:, k]] for k in range(width)]
        term = counts
        for k in range(width):
            term = term * picked[k]
        # d count / d values: for each factor slot, the count times the other factors of its term
        others = []
        for k in range(width):
            rest = counts
            for j in range(width):
                if j != k:
                    rest = rest * picked[j]
            others.append(rest)
        d_values = torch.zeros_like(values).index_add_(0, factors.t().reshape(-1), torch.cat(others))
        n_gates = len(bank.sizes)
        d_flat = d_values[n_gates : n_gates + flat.numel()] + (d_values[:n_gates] / table["sizes"])[table["owner"]]
        return term.sum(), d_flat

    def _factor_values(self, table: dict[str, Tensor], flat: Tensor) -> Tensor:
        """Every factor a term can index: each gate's kept fraction, each element's mask, a constant 1."""
        fractions = torch.zeros(table["sizes"].numel(), dtype=flat.dtype, device=flat.device)
        fractions = fractions.index_add(0, table["owner"], flat) / table["sizes"]
        return torch.cat([fractions, flat, torch.ones(1, dtype=flat.dtype, device=flat.device)])

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
                # ranked from 1: an importance of 0 leaves a one-element gate unranked (kept whatever its ratio)
                g.importance.copy_(torch.arange(1, g.n + 1, dtype=g.importance.dtype, device=g.importance.device))
                g.ratio.fill_(g.max_ratio)
        yield
    finally:
        with torch.no_grad():
            for g, ratio, importance in saved:
                g.ratio.copy_(ratio)
                g.importance.copy_(importance)


def _factor_maps(
    model: nn.Module, specs: list[dict]
) -> tuple[dict[str, dict[str, Factor]], dict[str, Factor], dict[str, list[tuple[float, tuple[str, ...]]]]]:
    """``({module path: {role: gate factor}}, {block path: depth element factor}, {module path: FLOP shares})``
    from the gate specs."""
    roles: dict[str, dict[str, Factor]] = {}
    block_elem: dict[str, Factor] = {}
    shares: dict[str, list[tuple[float, tuple[str, ...]]]] = {}
    for s in specs:
        if s["site"] == "depth":
            keys = list(model.get_submodule(s["stack"])._modules)  # "3", or "encoder_layer_3" (torchvision)
            for j, i in enumerate(s["blocks"]):
                block_elem[f"{s['stack']}.{keys[i]}"] = ("elem", s["name"], j)
            continue
        for role, path in family_for_site(s["site"]).resource_roles(model, s):
            if role not in ROLES:
                raise ValueError(f"unknown resource role {role!r} for gate {s['name']}; expected one of {ROLES}")
            roles.setdefault(path, {})[role] = ("frac", s["name"])
        shares.update(family_for_site(s["site"]).flop_shares(model, s))
    return roles, block_elem, shares


def _enclosing(name: str, block_elem: dict[str, Factor]) -> Factor | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        factor = block_elem.get(".".join(parts[:end]))
        if factor is not None:
            return factor
    return None


def _own_flops(model: nn.Module, example_input: Any) -> dict[str, int]:
    """``{module path: FLOPs of the module itself, without its sub-modules}`` for one forward pass."""
    inclusive = count_flops(model, example_input).per_module
    own = dict(inclusive)
    for name, count in inclusive.items():
        if not name:
            continue
        parent = name
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in inclusive:
                own[parent] -= count
                break
    return own


@dataclass
class BudgetFit:
    """What :func:`fit_architecture` chose: keep counts per gate and the count they give.

    Attributes:
        keep: elements kept per gate name.
        value: the hard count (FLOPs or parameters) of that architecture.
        budget: the count asked for.
        searched: the hard count of the searched architecture (before fitting).
        changed: elements whose keep changed, summed over gates (``sum |k - k_searched|``).
        depth_changed: blocks added back or removed, summed over depth gates.
        within: whether ``value`` is within the tolerance of ``budget`` (either side).
    """

    keep: dict[str, int]
    value: float
    budget: float
    searched: float
    changed: int
    depth_changed: int
    within: bool

    @property
    def deviation(self) -> float:
        """``value / budget - 1`` (negative: below the budget)."""
        return self.value / self.budget - 1.0


def _set_keep(gate: Any, k: int) -> None:
    # the hard mask keeps exactly k elements at a = (n - k + 1/4) / n (ranks sit at (i + 1/2) / n)
    gate.ratio.fill_((gate.n - k + 0.25) / gate.n)
    if gate.frozen:
        gate.frozen_ratio.fill_(gate.ratio.item())


@torch.no_grad()
def fit_architecture(
    gates: DMSGates, resources: ResourceModel, budget: float, resource: str = "flops", tolerance: float = 0.05
) -> BudgetFit:
    """Choose depth and width jointly so the hard count lands within ``tolerance`` of ``budget``, either side.

    A search ends near its target, but depth moves in coarse steps (one block of four is 25% of a
    ViT), so its hard count can sit well below or above. Starting from the searched keep counts, each
    candidate fixes the depth gates (the searched depth first, then depths further from it) and scales
    every width gate's searched keep count by one common factor ``s`` (the searched *relative* widths
    stay), found by bisection so the count comes closest to ``budget``; if widths alone cannot get
    there, heads are scaled with them. Elements are added or removed in importance order (the gates'
    ranking), so the most important ones stay. The chosen candidate is the one within tolerance that
    changes depth least, then does not touch heads, then scales widths least; if none is within
    tolerance, the closest. The gates' ratios are set to it (and their frozen values, if frozen).
    Deterministic, so every rank reaches the same masks. Gates whose importances are all equal (never
    updated) keep what they keep.

    Example:
        >>> import timm
        >>> from lightning_depthgrow.dms import attach_gates, set_importance
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4)
        >>> gates = attach_gates(vit)
        >>> set_importance(gates, {n: torch.arange(g.n, dtype=torch.float) + 1 for n, g in gates.gates.items()})
        >>> res = ResourceModel.build(vit, torch.zeros(1, 3, 32, 32))
        >>> fit = fit_architecture(gates, res, 0.4 * res.full_flops)
        >>> fit.within, abs(float(res.evaluate(gates, hard=True)) / (0.4 * res.full_flops) - 1) <= 0.05
        (True, True)
    """
    if not budget > 0:
        raise ValueError(f"budget must be positive, got {budget}")
    names = list(gates.gates)
    by_name = gates.gates
    searched_keep = {n: g.keep_count() for n, g in by_name.items()}
    free = {n for n, g in by_name.items() if not g.all_equal()}
    lowest = {n: max(g.min_keep, 0 if g.kind == DEPTH else 1) for n, g in by_name.items()}

    def cost(keep: dict[str, int]) -> float:
        for n in free:
            _set_keep(by_name[n], keep[n])
        return float(resources.evaluate(gates, resource, hard=True))

    searched = cost(searched_keep)
    depth_names = [n for n in names if n in free and by_name[n].kind == DEPTH]
    fills = [[n for n in names if n in free and by_name[n].kind == WIDTH]]
    head_names = [n for n in names if n in free and by_name[n].kind == HEADS]
    if head_names:
        fills.append(fills[0] + head_names)

    def scaled(base: dict[str, int], fill: list[str], s: float) -> dict[str, int]:
        out = dict(base)
        for n in fill:
            out[n] = min(by_name[n].n, max(lowest[n], round(s * base[n])))
        return out

    def best_scale(base: dict[str, int], fill: list[str]) -> tuple[dict[str, int], float, float]:
        """The keep counts (and their cost, and ``s``) whose cost is closest to the budget."""
        if not fill:
            return base, cost(base), 1.0
        top = max(by_name[n].n / max(base[n], 1) for n in fill) + 1.0
        lo, hi = 0.0, top
        c_lo, c_hi = cost(scaled(base, fill, lo)), cost(scaled(base, fill, hi))
        if c_lo >= budget:
            return scaled(base, fill, lo), c_lo, lo
        if c_hi <= budget:
            return scaled(base, fill, hi), c_hi, hi
        for _ in range(40):  # invariant: cost(lo) <= budget < cost(hi)
            mid = 0.5 * (lo + hi)
            c = cost(scaled(base, fill, mid))
            if c <= budget:
                lo, c_lo = mid, c
            else:
                hi, c_hi = mid, c
        if budget - c_lo <= c_hi - budget:
            return scaled(base, fill, lo), c_lo, lo
        return scaled(base, fill, hi), c_hi, hi

    # depth choices ordered by how far they move from the searched depth
    ranges = [range(lowest[n], by_name[n].n + 1) for n in depth_names]
    if math.prod(len(r) for r in ranges) > 512:  # many stacks: stay within two blocks of the searched depth
        ranges = [
            range(max(r.start, searched_keep[n] - 2), min(r.stop, searched_keep[n] + 3))
            for n, r in zip(depth_names, ranges)
        ]
    choices = [dict(zip(depth_names, ks)) for ks in itertools.product(*ranges)]
    choices.sort(key=lambda d: (sum(abs(d[n] - searched_keep[n]) for n in depth_names), sorted(d.items())))

    best: tuple[tuple, dict[str, int], float] | None = None
    found_at: int | None = None
    for choice in choices:
        moved = sum(abs(choice[n] - searched_keep[n]) for n in depth_names)
        if found_at is not None and moved > found_at:
            break  # a nearer depth already lands within tolerance
        for uses_heads, fill in enumerate(fills):
            keep, c, s = best_scale({**searched_keep, **choice}, fill)
            within = abs(c / budget - 1.0) <= tolerance
            key = (0, moved, uses_heads, abs(math.log(max(s, 1e-9)))) if within else (1, abs(c / budget - 1.0))
            if best is None or key < best[0]:
                best = (key, keep, c)
            if within:
                found_at = moved
                break  # widths alone suffice for this depth: do not touch heads

    assert best is not None
    _, keep, value = best
    cost(keep)
    return BudgetFit(
        keep=keep,
        value=value,
        budget=budget,
        searched=searched,
        changed=sum(abs(keep[n] - searched_keep[n]) for n in names),
        depth_changed=sum(abs(keep[n] - searched_keep[n]) for n in depth_names),
        within=abs(value / budget - 1.0) <= tolerance,
    )


def fit_to_budget(
    gates: DMSGates, resources: ResourceModel, budget: float, resource: str = "flops", tolerance: float = 0.05
) -> int:
    """Set the gates so the exported model lands within ``tolerance`` of ``budget``; returns elements changed.

    :func:`fit_architecture` does the work (depth and width chosen jointly, either side of the budget);
    when no architecture the gates can express lands within tolerance, this warns with the achieved
    ratio and keeps the closest one.
    """
    fit = fit_architecture(gates, resources, budget, resource, tolerance)
    if not fit.within:
        warnings.warn(
            f"DMS export: the closest architecture the gates allow has {fit.value:.4g} {resource}, "
            f"{fit.deviation:+.1%} off the budget {budget:.4g} (tolerance {tolerance:.0%}): the ungated layers "
            "alone, or every gate at its limit, decide the count. Gate more of the model or change the target.",
            stacklevel=2,
        )
    return fit.changed
