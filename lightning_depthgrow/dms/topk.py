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

from collections.abc import Callable
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
        self._rank_cache: tuple[tuple[int, int, torch.device], Tensor, bool] | None = None
        self._soft_cache: tuple[tuple, Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # caches hold autograd graphs, which neither deepcopy nor pickle accept
        return {**self.__dict__, "_pending": None, "_rank_cache": None, "_soft_cache": None}

    def _ranked(self) -> tuple[Tensor, bool]:
        """``(normalised rank, all equal)``, recomputed only when the importance buffer changed."""
        key = (id(self.importance), self.importance._version, self.importance.device)
        if self._rank_cache is None or self._rank_cache[0] != key:
            if self.n == 1:
                equal = bool(self.importance[0] == 0)
            else:
                equal = bool(self.importance.max() == self.importance.min())
            self._rank_cache = (key, normalised_rank(self.importance), equal)
        return self._rank_cache[1], self._rank_cache[2]

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
        return self._ranked()[1]

    def soft_mask(self) -> Tensor:
        """``sigmoid(lambda (c' - a))``; all ones (with the same gradient) while all importances are equal."""
        rank, equal = self._ranked()
        soft = torch.sigmoid(self.temperature * (rank - self.ratio_value()))
        if equal:
            return 1.0 + (soft - soft.detach())
        return soft

    def hard_mask(self) -> Tensor:
        """0/1 mask of the kept elements (no gradient)."""
        with torch.no_grad():
            rank, equal = self._ranked()
            if equal:
                return torch.ones_like(self.importance)
            return (rank >= self.ratio_value()).to(self.importance.dtype)

    def straight_through(self) -> Tensor:
        """Forward value of the hard mask, gradient of the soft mask (for resource counts)."""
        soft = self.soft_mask()
        return self.hard_mask() + (soft - soft.detach())

    def mask(self) -> Tensor:
        """Soft mask (recording ``dL/dm``) in training with autograd on; hard mask otherwise."""
        if not (self.training and torch.is_grad_enabled()):
            return self.hard_mask()
        # One mask tensor for every use within a forward pass (a depth mask serves two branches per
        # block): one small graph and one gradient hook, which clears the cache once backward reaches it.
        key = (self.ratio._version, self.importance._version, id(self.importance), id(self.ratio))
        if self._soft_cache is not None and self._soft_cache[0] == key:
            return self._soft_cache[1]
        m = self.soft_mask()
        if not m.requires_grad:
            # Ratio frozen by requires_grad=False: still a leaf that records dL/dm for the importance.
            m = m.detach().requires_grad_()
        m.register_hook(self._accumulate)
        self._soft_cache = (key, m)
        return m

    def _accumulate(self, grad: Tensor) -> None:
        self._soft_cache = None
        grad = grad.detach()
        self._pending = grad.clone() if self._pending is None else self._pending + grad

    def take_pending(self) -> Tensor:
        """The summed ``dL/dm`` since the last call (zeros if none), and reset it."""
        pending = self._pending if self._pending is not None else torch.zeros_like(self.importance)
        self._pending = None
        return pending.to(self.importance.dtype)

    @torch.no_grad()
    def apply_importance(self, grad: Tensor) -> None:
        """``c <- decay c + (1 - decay) (m * grad)^2`` with the current soft mask ``m``."""
        m = torch.sigmoid(self.temperature * (normalised_rank(self.importance) - self.ratio_value()))
        if self.all_equal():
            m = torch.ones_like(m)
        self.importance.mul_(self.decay).add_((1.0 - self.decay) * (m * grad) ** 2)

    def keep_count(self) -> int:
        return int(self.hard_mask().sum().item())

    def kept_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.hard_mask()).flatten()]

    @torch.no_grad()
    def freeze(self) -> None:
        """Hold the ratio at its current value from now on (see :meth:`project_`)."""
        self.frozen_ratio.copy_(self.ratio_value().detach())

    @property
    def frozen(self) -> bool:
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


def update_importance(
    gates: list[TopKGate],
    reduce: Callable[[Tensor], Tensor] | None = None,
    scale: float = 1.0,
) -> bool:
    """Fold the pending ``dL/dm`` of every gate into its importance EMA (one call per optimizer step).

    The gradients of all gates are concatenated, divided by ``scale`` (the AMP loss scale), passed
    through ``reduce`` (e.g. an all-reduce mean across ranks, so every rank holds identical
    importances) and applied only if all are finite (an AMP overflow step is skipped, as the optimizer
    skips it). Returns whether the update was applied.

    Example:
        >>> gate = TopKGate(3, "width").train()
        >>> (gate.mask() * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        >>> update_importance([gate]), gate.importance
        (True, tensor([0.0100, 0.0400, 0.0900]))
    """
    if not gates:
        return False
    pending = [g.take_pending() for g in gates]
    flat = torch.cat(pending) / scale
    if reduce is not None:
        flat = reduce(flat)
    if not bool(torch.isfinite(flat).all()):
        return False
    for gate, grad in zip(gates, flat.split([g.n for g in gates])):
        gate.apply_importance(grad)
    return True
