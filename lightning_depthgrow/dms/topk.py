"""Differentiable top-k over one structural choice (DMS, Liu et al. 2024, section 3).

A :class:`TopKGate` owns the N elements of one choice (hidden units of an MLP, heads of an attention
layer, blocks of a stage). Each element has an importance ``c_i``: not learned by SGD but an
exponential moving average of its Taylor score, ``c_i <- 0.99 c_i + 0.01 (m_i * dL/dm_i)^2``. The
importances are rank-normalised and compared with one learnable pruning ratio ``a``:

    c'_i = (#{j : c_i > c_j} + 1/2) / N          (ties broken by index)
    m_i  = sigmoid(lambda * (c'_i - a))           (soft mask, training)
    hard_i = [c'_i >= a]                          (hard mask, evaluation and export)

The half-rank offset makes the hard mask keep exactly ``k = round((1 - a) N)`` elements, and makes
``m_i >= 0.5`` agree with it. With the paper's ``#{...}/N`` the two disagree by one element whenever
``a N`` is not an integer (the authors' code has this off-by-one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

WIDTH, HEADS, DEPTH = "width", "heads", "depth"
KINDS = (WIDTH, HEADS, DEPTH)


def default_temperature(kind: str, n: int) -> float:
    """The paper's fixed (not annealed) temperature: ``N`` for width, ``4 N`` for heads and depth."""
    if kind not in KINDS:
        raise ValueError(f"unknown gate kind {kind!r}; expected one of {KINDS}")
    return float(n if kind == WIDTH else 4 * n)


def normalised_rank(importance: Tensor) -> Tensor:
    """``(#{j : c_i > c_j} + 1/2) / N`` with ties broken by index (lower index ranks lower).

    Example:
        >>> normalised_rank(torch.tensor([0.3, 0.1, 0.2, 0.1]))
        tensor([0.8750, 0.1250, 0.6250, 0.3750])
    """
    n = importance.numel()
    order = torch.argsort(importance, stable=True)
    rank = torch.empty(n, dtype=importance.dtype, device=importance.device)
    rank[order] = torch.arange(n, dtype=importance.dtype, device=importance.device)
    return (rank + 0.5) / n


class TopKGate(nn.Module):
    """Soft/hard top-k mask over ``n`` elements with an importance EMA and a learnable ratio.

    In training mode (with autograd on) :meth:`mask` returns the soft mask and registers a hook that
    accumulates ``dL/dm`` into a pending sum; :meth:`apply_importance` folds a (reduced) gradient into
    the EMA. In eval mode it returns the hard 0/1 mask that export keeps. While all importances are
    equal (at the start) the mask is all ones; the ratio still receives a gradient through it.
    The arithmetic lives in :class:`GateBank` (which computes many gates in one go); a lone gate is a
    bank of one.

    Args:
        n: number of elements.
        kind: ``"width"``, ``"heads"`` or ``"depth"``.
        temperature: ``lambda`` of the sigmoid (default: :func:`default_temperature`).
        min_keep: elements that always stay (the ratio is capped so that ``k >= min_keep``).
        decay: EMA decay of the importance (0.99 in the paper).

    Example:
        >>> gate = TopKGate(4, "width")
        >>> gate.keep_count()
        4
        >>> with torch.no_grad():
        ...     _ = gate.importance.copy_(torch.tensor([0.4, 0.1, 0.3, 0.2])), gate.ratio.fill_(0.5)
        >>> gate.eval().mask(), gate.keep_count()
        (tensor([1., 0., 1., 0.]), 2)
    """

    def __init__(
        self, n: int, kind: str, temperature: float | None = None, min_keep: int = 1, decay: float = 0.99
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"a gate needs at least one element, got n={n}")
        if not 0 <= min_keep <= n:
            raise ValueError(f"min_keep must be in [0, {n}], got {min_keep}")
        self.n, self.kind, self.min_keep, self.decay = n, kind, min_keep, decay
        self.temperature = default_temperature(kind, n) if temperature is None else float(temperature)
        self.ratio = nn.Parameter(torch.zeros(()))
        self.register_buffer("importance", torch.zeros(n))
        # NaN while free; the ratio it is held at once frozen (a buffer, so checkpoints carry it).
        self.register_buffer("frozen_ratio", torch.full((), float("nan")))
        self._pending: Tensor | None = None
        self._bank: GateBank | None = None

    def __getstate__(self) -> dict[str, Any]:
        # the bank caches autograd graphs, which neither deepcopy nor pickle accept
        return {**self.__dict__, "_pending": None, "_bank": None}

    @property
    def bank(self) -> GateBank:
        """A one-gate :class:`GateBank` (built on first use) for this gate used on its own."""
        if self._bank is None:
            self._bank = GateBank([self])
        return self._bank

    @property
    def max_ratio(self) -> float:
        """Largest ratio that still keeps ``min_keep`` elements (a quarter rank below the boundary)."""
        return min(1.0, (self.n - self.min_keep + 0.25) / self.n)

    def ratio_value(self) -> Tensor:
        """The pruning ratio ``a`` in ``[0, max_ratio]``.

        Clamped with a straight-through gradient: ``torch.clamp`` has zero gradient at the bounds, and
        ``a = 0`` (keep all) is where every search starts. :meth:`project_` keeps the raw value in range.
        """
        return self.ratio + (self.ratio.clamp(0.0, self.max_ratio) - self.ratio).detach()

    def all_equal(self) -> bool:
        """No ranking information yet: all importances equal (a single element: never updated)."""
        return self.bank.ranked()[2][0]

    def soft_mask(self) -> Tensor:
        """``sigmoid(lambda (c' - a))``; all ones (with the same gradient) while all importances are equal."""
        return self.bank.soft()

    def hard_mask(self) -> Tensor:
        """0/1 mask of the kept elements (no gradient)."""
        return self.bank.hard()

    def straight_through(self) -> Tensor:
        """Forward value of the hard mask, gradient of the soft mask (for resource counts)."""
        return self.bank.straight_through()

    def mask(self) -> Tensor:
        """Soft mask (recording ``dL/dm``) in training with autograd on; hard mask otherwise."""
        return self.bank.masks(self.training)[0]

    def take_pending(self) -> Tensor:
        """The summed ``dL/dm`` since the last call (zeros if none), and reset it."""
        pending = self._pending if self._pending is not None else torch.zeros_like(self.importance)
        self._pending = None
        return pending.to(self.importance.dtype)

    def apply_importance(self, grad: Tensor) -> None:
        """``c <- decay c + (1 - decay) (m * grad)^2`` with the current soft mask ``m``."""
        self.bank.apply_importance(grad)

    def keep_count(self) -> int:
        """How many elements the hard mask keeps."""
        return int(self.hard_mask().sum().item())

    def kept_indices(self) -> list[int]:
        """Indices of the elements the hard mask keeps, ascending."""
        return [int(i) for i in torch.nonzero(self.hard_mask()).flatten()]

    @torch.no_grad()
    def freeze(self) -> None:
        """Hold the ratio at its current value from now on (see :meth:`project_`)."""
        self.frozen_ratio.copy_(self.ratio_value().detach())

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` has been called (the ratio no longer moves)."""
        return not bool(torch.isnan(self.frozen_ratio))

    @torch.no_grad()
    def project_(self) -> None:
        """Put the raw ratio back into ``[0, max_ratio]`` (or at its frozen value); call after each step."""
        if self.frozen:
            self.ratio.copy_(self.frozen_ratio)
        else:
            self.ratio.clamp_(0.0, self.max_ratio)

    def extra_repr(self) -> str:
        return f"n={self.n}, kind={self.kind}, temperature={self.temperature:g}, min_keep={self.min_keep}"


class GateBank:
    """The masks of several gates computed as one flat vector: a handful of tensor ops per step, whatever
    the number of gates (per-gate Python loops of tiny ops dominated the search overhead).

    Caches keep the hot path short, each keyed on the identity and version counter of every importance
    buffer and ratio parameter (an in-place update, a checkpoint load or a ``.to()`` invalidates it):

    - the normalised ranks, recomputed only when an importance changed (once per optimizer step; the
      importance update computes them right away from the new values);
    - the soft mask of a forward pass, kept until its backward, so all hooks of that pass and the resource
      count share one soft mask. The task loss sees it through a view that carries the single ``dL/dm``
      hook; the resource count uses the soft mask itself, so its gradient never enters the importances;
    - the soft mask's values and the clamped ratios per element, which the hard mask, the importance update
      (the same step's ``m``) and evaluation reuse while nothing changed;
    - ``dL/dm`` summed over the backward passes of a step as one flat vector (each gate's pending sum is a
      view of it), so the importance update takes it without one copy per gate.

    Example:
        >>> a, b = TopKGate(2, "width"), TopKGate(3, "depth")
        >>> bank = GateBank([a, b])
        >>> [m.tolist() for m in bank.masks(training=False)]
        [[1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, gates: Sequence[TopKGate]) -> None:
        if not gates:
            raise ValueError("a GateBank needs at least one gate")
        self.gates = list(gates)
        self.sizes = [g.n for g in self.gates]
        # The gates' own parameter and buffer dicts: reading ``ratio`` and ``importance`` through them skips
        # ``nn.Module.__getattr__``, which the cache checks of every hook call would otherwise pay per gate.
        self._params = [g._parameters for g in self.gates]
        self._buffers = [g._buffers for g in self.gates]
        self._layout: dict[str, Tensor] = {}
        self._layout_device: torch.device | None = None
        self._rank_cache: tuple[tuple, Tensor, Tensor, list[bool]] | None = None
        self._task_cache: tuple[tuple, list[Tensor], Tensor, Tensor] | None = None  # (key, parts, soft, task)
        # (state, clamped ratio per element, soft mask, its sigmoid before the all-equal gates' ones), no gradient
        self._values: tuple[tuple, Tensor, Tensor | None, Tensor | None] | None = None
        self._hard_parts: tuple[tuple, list[Tensor], Tensor] | None = None  # (state, parts, flat hard mask)
        self._pending: tuple[Tensor, list[Tensor]] | None = None  # (flat dL/dm, the views the gates hold)
        self._distinct: tuple[tuple, tuple[list[Tensor], list[int], list[int]]] | None = None  # (ids, distinct)

    def __getstate__(self) -> dict[str, Any]:
        caches = ("_rank_cache", "_task_cache", "_values", "_hard_parts", "_pending", "_distinct")
        return {**self.__dict__, **dict.fromkeys(caches)}

    def importances(self) -> list[Tensor]:
        """The gates' importance buffers, in gate order."""
        return [b["importance"] for b in self._buffers]

    def ratios(self) -> list[Tensor]:
        """The gates' ratio parameters, in gate order."""
        return [p["ratio"] for p in self._params]

    def distinct_ratios(self) -> tuple[list[Tensor], list[int], list[int]]:
        """``(ratios, owner, first)``: each ratio parameter once (gates tied by
        :func:`~lightning_depthgrow.dms.tie_specs` share one), the index into ``ratios`` of every gate's, and the
        first gate of each. Without ties, ``ratios()``, ``0..n-1`` and ``0..n-1``.

        Example:
            >>> a, b = TopKGate(2, "width"), TopKGate(2, "width")
            >>> b.ratio = a.ratio
            >>> ratios, owner, first = GateBank([a, b]).distinct_ratios()
            >>> len(ratios), owner, first
            (1, [0, 0], [0])
        """
        current = self.ratios()
        key = tuple(map(id, current))
        if self._distinct is None or self._distinct[0] != key:
            ratios: list[Tensor] = []
            seen: dict[int, int] = {}
            owner, first = [], []
            for i, p in enumerate(current):
                if id(p) not in seen:
                    seen[id(p)] = len(ratios)
                    ratios.append(p)
                    first.append(i)
                owner.append(seen[id(p)])
            self._distinct = (key, (ratios, owner, first))
        return self._distinct[1]

    def distinct_gradient(self, grad: Tensor) -> Tensor:
        """A per-gate ratio gradient (:meth:`ratio_gradient`) summed onto :meth:`distinct_ratios` (tied gates add)."""
        ratios, owner, _ = self.distinct_ratios()
        if len(ratios) == len(owner):
            return grad
        index = torch.tensor(owner, device=grad.device)
        return grad.new_zeros(len(ratios)).index_add_(0, index, grad)

    def frozen_ratios(self) -> list[Tensor]:
        """The gates' ``frozen_ratio`` buffers (NaN while free), in gate order."""
        return [b["frozen_ratio"] for b in self._buffers]

    def _importance_key(self) -> tuple:
        tensors = self.importances()
        return (*map(id, tensors), *[t._version for t in tensors])

    def _state_key(self) -> tuple:
        """Identity and version of every importance and ratio: changes whenever a mask may change."""
        tensors = self.importances() + self.ratios()
        return (*map(id, tensors), *[t._version for t in tensors])

    def layout(self) -> dict[str, Tensor]:
        """Per-element constants (owner gate, offset, size, temperature, decay) on the gates' device."""
        device = self._buffers[0]["importance"].device
        if self._layout_device != device:
            sizes = torch.tensor(self.sizes, device=device)
            owner = torch.repeat_interleave(torch.arange(len(self.gates), device=device), sizes)
            offsets = torch.cumsum(sizes, 0) - sizes
            temperature = torch.tensor([g.temperature for g in self.gates], device=device)
            decay = torch.tensor([g.decay for g in self.gates], device=device)
            self._layout = {
                "owner": owner,
                "offset": offsets[owner],
                "size": sizes[owner].float(),
                "temperature": temperature[owner],
                "decay": decay[owner],
                "max_ratio": torch.tensor([g.max_ratio for g in self.gates], device=device),
                "single": torch.tensor([n == 1 for n in self.sizes], device=device),
            }
            self._layout_device = device
        return self._layout

    def ranked(self) -> tuple[Tensor, Tensor, list[bool]]:
        """``(normalised ranks, per-element all-equal flag, per-gate all-equal)``, cached on the importances."""
        key = self._importance_key()
        if self._rank_cache is None or self._rank_cache[0] != key:
            imps = self.importances()
            self._rank_cache = self._rank(torch.cat(imps) if len(imps) > 1 else imps[0], key)
        return self._rank_cache[1], self._rank_cache[2], self._rank_cache[3]

    def _rank(self, imp: Tensor, key: tuple) -> tuple[tuple, Tensor, Tensor, list[bool]]:
        lay = self.layout()
        # sort by importance, then (stably) by gate: ties keep index order, as normalised_rank does
        order = torch.argsort(imp, stable=True)
        order = order[torch.argsort(lay["owner"][order], stable=True)]
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device)
        rank = ((position - lay["offset"]).to(imp.dtype) + 0.5) / lay["size"].to(imp.dtype)
        n_gates = len(self.gates)
        high = imp.new_full((n_gates,), -torch.inf).scatter_reduce(0, lay["owner"], imp, "amax")
        low = imp.new_full((n_gates,), torch.inf).scatter_reduce(0, lay["owner"], imp, "amin")
        # a single element is "equal" (no ranking) until its importance moves off zero
        equal_gate = torch.where(lay["single"], high == 0, high == low)
        return key, rank, equal_gate[lay["owner"]], equal_gate.tolist()

    def ratio_values(self) -> Tensor:
        """Every gate's :meth:`TopKGate.ratio_value` as one vector (same straight-through clamp)."""
        ratios = self.ratios()
        a = torch.stack(ratios) if len(ratios) > 1 else ratios[0].view(1)
        return a + (torch.minimum(a.clamp(min=0.0), self.layout()["max_ratio"]) - a).detach()

    def _soft_key(self) -> tuple:
        return self._state_key(), torch.is_grad_enabled()

    def soft(self) -> Tensor:
        """Flat soft mask ``sigmoid(lambda (c' - a))``; exactly 1 (with the same gradient) on all-equal gates.

        Within a training step (after the forward pass's :meth:`masks`, before backward) this is the very
        tensor the masks view, so the resource count adds no second mask graph.
        """
        key = self._soft_key()
        if self._task_cache is not None and self._task_cache[0] == key:
            return self._task_cache[2]
        return self._soft(key[0])

    def _soft(self, state: tuple) -> Tensor:
        rank, equal, equal_gate = self.ranked()
        lay = self.layout()
        a = self.ratio_values()[lay["owner"]]
        sigmoid = torch.sigmoid(lay["temperature"] * (rank - a))
        # Mask values below sqrt(smallest normal) count for nothing next to the others, but their products with
        # weights and gradients fall into the denormal range, where CPU arithmetic runs a hundred times slower
        # (a 6-block DeiT-T-width search step took 4x a plain one): their forward value is 0, their gradient stays.
        tiny = sigmoid.detach() < torch.finfo(sigmoid.dtype).tiny ** 0.5
        soft = sigmoid - torch.where(tiny, sigmoid.detach(), 0.0)
        if any(equal_gate):
            soft = torch.where(equal, 1.0 + (sigmoid - sigmoid.detach()), soft)
        self._values = (state, a.detach(), soft.detach(), sigmoid.detach())
        return soft

    def _clamped_ratios(self, state: tuple) -> Tensor:
        """The clamped ratio of each element's gate (no gradient), reused while ``state`` holds."""
        if self._values is None or self._values[0] != state:
            with torch.no_grad():
                self._values = (state, self.ratio_values()[self.layout()["owner"]], None, None)
        return self._values[1]

    def hard(self) -> Tensor:
        """Flat 0/1 mask of the kept elements (no gradient)."""
        with torch.no_grad():
            rank, equal, _ = self.ranked()
            a = self._clamped_ratios(self._state_key())
            return ((rank >= a) | equal).to(rank.dtype)

    def _soft_values(self) -> tuple[Tensor, Tensor]:
        """``(soft mask, sigmoid)`` values now (no gradient): the forward pass's own while nothing changed since."""
        state = self._state_key()
        if self._values is None or self._values[0] != state or self._values[2] is None:
            with torch.no_grad():
                self._soft(state)
        return self._values[2], self._values[3]

    def ratio_gradient(self, mask_grad: Tensor) -> Tensor:
        """Gradient with respect to every gate's ratio of ``(mask_grad * soft).sum()``, in closed form.

        What autograd gives through :meth:`soft` (or :meth:`straight_through`) and :meth:`ratio_values`:
        ``d soft_i / d a = -lambda_i soft_i (1 - soft_i)`` (the all-equal gates' constant mask and the
        clamp pass the same gradient), summed over each gate's elements; one vector in gate order.

        Example:
            >>> a, b = TopKGate(2, "width"), TopKGate(3, "depth")
            >>> bank = GateBank([a, b])
            >>> closed = bank.ratio_gradient(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
            >>> (bank.soft() * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
            >>> torch.allclose(closed, torch.stack([a.ratio.grad, b.ratio.grad]))
            True
        """
        sigmoid = self._soft_values()[1]
        lay = self.layout()
        per_element = mask_grad.to(sigmoid.dtype) * (1.0 - sigmoid) * sigmoid * lay["temperature"]
        grad = torch.zeros(len(self.gates), dtype=sigmoid.dtype, device=sigmoid.device)
        return grad.index_add_(0, lay["owner"], per_element).neg_()

    def straight_through(self) -> Tensor:
        """Flat forward value of the hard mask with the gradient of the (shared) soft mask."""
        soft = self.soft()
        return self.hard() + (soft - soft.detach())

    def masks(self, training: bool = True) -> list[Tensor]:
        """Per-gate masks for the model: soft ones recording ``dL/dm`` (training with autograd), hard otherwise.

        One mask tensor serves every use within a forward pass (a depth mask serves two branches per
        block); its hook fires once backward has summed all uses, and clears the cache. The hard masks
        are kept while no importance or ratio changes (every hook of an evaluation pass reads them).
        """
        return self._current(training)[0]

    def mask_vector(self, training: bool = True) -> Tensor:
        """The flat tensor the :meth:`masks` are views of (the same object for every call of a forward pass)."""
        return self._current(training)[1]

    def _current(self, training: bool) -> tuple[list[Tensor], Tensor]:
        if not (training and torch.is_grad_enabled()):
            state = self._state_key()
            if self._hard_parts is None or self._hard_parts[0] != state:
                hard = self.hard()
                self._hard_parts = (state, list(hard.split(self.sizes)), hard)
            return self._hard_parts[1], self._hard_parts[2]
        key = self._soft_key()
        if self._task_cache is not None and self._task_cache[0] == key:
            return self._task_cache[1], self._task_cache[3]
        soft = self._soft(key[0])
        # a view: its hook sees the task loss only, not the resource count that uses ``soft`` directly
        task = soft.view_as(soft) if soft.requires_grad else soft.detach().requires_grad_()
        task.register_hook(self._accumulate)
        parts = list(task.split(self.sizes))
        self._task_cache = (key, parts, soft, task)
        return parts, task

    def _held_pending(self) -> Tensor | None:
        """The flat pending ``dL/dm`` if every gate still holds exactly this bank's view of it."""
        if self._pending is None:
            return None
        flat, views = self._pending
        if all(g.__dict__.get("_pending") is v for g, v in zip(self.gates, views)):
            return flat
        return None

    def _hold_pending(self, flat: Tensor | None) -> None:
        views = list(flat.split(self.sizes)) if flat is not None else [None] * len(self.gates)
        self._pending = (flat, views) if flat is not None else None
        for gate, view in zip(self.gates, views):
            gate.__dict__["_pending"] = view

    def _accumulate(self, grad: Tensor) -> None:
        self._task_cache = None
        grad = grad.detach()
        held = self._held_pending()
        if held is not None:
            flat = held + grad
        elif all(g.__dict__.get("_pending") is None for g in self.gates):
            flat = grad.clone()
        else:  # some gate holds a sum from elsewhere (used on its own): add to each
            flat = torch.cat([g.take_pending() for g in self.gates]) + grad
        self._hold_pending(flat)

    def take_pending(self) -> Tensor:
        """Every gate's summed ``dL/dm`` since the last call (zeros where none), flat in gate order; resets them."""
        flat = self._held_pending()
        dtype = self._buffers[0]["importance"].dtype
        if flat is None:
            flat = torch.cat([g.take_pending() for g in self.gates])
        self._hold_pending(None)
        return flat.to(dtype)

    @torch.no_grad()
    def apply_importance(self, grad: Tensor) -> None:
        """``c <- decay c + (1 - decay) (m * grad)^2`` for every gate, ``grad`` flat in gate order.

        ``m`` is the current soft mask: the forward pass's own values while no importance or ratio changed
        since (the step's update, before the optimizer moves the ratios), else computed afresh.
        """
        m = self._soft_values()[0]
        lay = self.layout()
        imps = self.importances()
        imp = torch.cat(imps) if len(imps) > 1 else imps[0]
        new = imp * lay["decay"] + (1.0 - lay["decay"]) * (m * grad.to(imp.dtype)) ** 2
        torch._foreach_copy_(imps, list(new.split(self.sizes)))
        self._rank_cache = self._rank(new, self._importance_key())


def update_importance(
    gates: Sequence[TopKGate] | GateBank,
    reduce: Callable[[Tensor], Tensor] | None = None,
    scale: float = 1.0,
) -> bool:
    """Fold the pending ``dL/dm`` of every gate into its importance EMA (one call per optimizer step).

    The gradients of all gates are concatenated, divided by ``scale`` (the AMP loss scale), passed
    through ``reduce`` (e.g. an all-reduce mean across ranks, so every rank holds identical
    importances) and applied only if all are finite (an AMP overflow step is skipped, as the optimizer
    skips it). Returns whether the update was applied. Pass a :class:`GateBank` (``DMSGates.bank``)
    to update all gates in one batched computation.

    Example:
        >>> gate = TopKGate(3, "width").train()
        >>> (gate.mask() * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        >>> update_importance([gate]), gate.importance
        (True, tensor([0.0100, 0.0400, 0.0900]))
    """
    bank = gates if isinstance(gates, GateBank) else GateBank(list(gates)) if gates else None
    if bank is None:
        return False
    flat = bank.take_pending()
    if scale != 1.0:
        flat = flat / scale
    if reduce is not None:
        flat = reduce(flat)
    if not bool(torch.isfinite(flat).all()):
        return False
    bank.apply_importance(flat)
    return True
