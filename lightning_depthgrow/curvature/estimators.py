"""Estimators over a symmetric linear operator: Hutchinson block traces and power-iteration eigenvalues.

Small pure functions in the style of curvlinops: they only call ``operator.matmat`` (see
:class:`~lightning_depthgrow.curvature.hvp.LinearOperator`), so the same code runs on a model's Hessian
and on a dense test matrix. ``blocks`` maps a block name to indices into ``operator.param_shapes``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .hvp import LinearOperator, zero_padded

MODEL_KEY = "model"
# Row b holds the eight signs encoded by the bits of byte b (bit set: +1, clear: -1).
_SIGN_TABLE = (torch.arange(256).unsqueeze(1).bitwise_right_shift(torch.arange(8)) & 1).float() * 2 - 1


@dataclass(frozen=True)
class TraceEstimate:
    """Mean of per-probe values ``v^T (Hv)_B``, its standard error, the probe count and the raw values.

    ``values`` is empty for an estimate combined from several ranks (only sums travel). ``phases`` is empty
    except for an adaptive estimate (:func:`hutchinson_trace` with ``adaptive=True``): then it holds one
    ``(sum, sum of squares, count)`` per phase of probes (different probe supports, different variances), and
    ``stderr`` is the stratified standard error over the phases (:meth:`from_phases`).
    """

    mean: float
    stderr: float
    num_probes: int
    values: tuple[float, ...] = ()
    phases: tuple[tuple[float, float, int], ...] = ()

    @classmethod
    def from_values(cls, values: Sequence[float]) -> TraceEstimate:
        """From the individual probe values ``v^T H v`` (mean and standard error of the mean)."""
        total = math.fsum(values)
        total_sq = math.fsum(v * v for v in values)
        return cls.from_sums(total, total_sq, len(values), tuple(values))

    @classmethod
    def from_sums(cls, total: float, total_sq: float, count: float, values: tuple[float, ...] = ()) -> TraceEstimate:
        """From the sum of the probe values, the sum of their squares and their number."""
        n = round(count)
        mean = total / n if n else math.nan
        if n > 1:
            var = max(total_sq - n * mean * mean, 0.0) / (n - 1) if math.isfinite(mean) else math.nan
            stderr = math.sqrt(var / n) if math.isfinite(var) else math.nan
        else:
            stderr = math.nan
        return cls(mean, stderr, n, values)

    @classmethod
    def from_phases(cls, phases: Sequence[Sequence[float]]) -> TraceEstimate:
        """Combine phases of probe values whose variances differ (one list of values per phase): a stratified mean.

        Each phase's values are i.i.d. and unbiased for the same trace, with their own variance ``s_k^2``
        (estimated from that phase's ``n_k`` values). The mean is that of all ``N = sum_k n_k`` values (weights
        ``n_k / N``, fixed by the probe counts, so it is unbiased whatever the variances) and its standard error
        the stratified one, ``sqrt(sum_k n_k s_k^2) / N``: each phase contributes its own variance, not one pooled
        variance. (Inverse-variance weights ``n_k / s_k^2`` would need fewer probes in theory, but with the
        variances estimated from short phases they under-reported the standard error by 18-30 % and biased the
        mean in ``tests/test_curvature_adaptive.py``; the stratified error was within 2-7 % of the spread.) A phase
        with one value (no variance estimate) is left out unless it is the only one. With one phase this is
        :meth:`from_values`.

        Example:
            >>> e = TraceEstimate.from_phases([[0.0, 4.0], [2.0, 4.0, 2.0, 4.0]])  # variances 8 and 4/3
            >>> round(e.mean, 4), round(e.stderr, 4), e.num_probes  # 16 / 6, sqrt(2 * 8 + 4 * 4/3) / 6
            (2.6667, 0.7698, 6)
        """
        lists = [list(map(float, p)) for p in phases if len(p)]
        if len(lists) > 1:
            lists = [p for p in lists if len(p) >= 2] or lists[:1]
        values = tuple(v for p in lists for v in p)
        pooled = cls.from_values(values)
        sums = tuple(_sums(p) for p in lists)
        if len(lists) <= 1:
            return cls(pooled.mean, pooled.stderr, pooled.num_probes, values, sums)
        within = math.fsum(len(p) * statistics.variance(p) for p in lists)  # sum_k n_k s_k^2
        stderr = math.sqrt(within) / len(values) if math.isfinite(within) else math.nan
        return cls(pooled.mean, stderr, len(values), values, sums)

    def sums(self) -> tuple[float, float, int]:
        """``(sum, sum of squares, count)`` of the probe values (exact inverse of :meth:`from_sums`)."""
        n = self.num_probes
        if self.values:
            return math.fsum(self.values), math.fsum(v * v for v in self.values), n
        var = self.stderr**2 * n if n > 1 else 0.0
        return self.mean * n, var * (n - 1) + n * self.mean**2, n


def _sums(values: Sequence[float]) -> tuple[float, float, int]:
    return math.fsum(values), math.fsum(v * v for v in values), len(values)


def check_adaptive(adaptive: bool, rtol: float | None, deflation_rank: int) -> None:
    """Refuse an ``adaptive`` setting the Hutchinson estimator cannot honour (shared by its callers' checks)."""
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
    if adaptive and rtol is None:
        raise ValueError("adaptive=True restricts probes to the blocks that have not reached rtol: pass rtol too")
    if adaptive and deflation_rank:
        raise ValueError("adaptive=True and deflation_rank > 0 cannot be combined; choose one")


def _block_indices(operator: LinearOperator, blocks: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    if blocks is None:
        return {MODEL_KEY: list(range(len(operator.param_shapes)))}
    resolved = {name: list(idx) for name, idx in blocks.items()}
    for name, idx in resolved.items():
        if not idx or any(not 0 <= i < len(operator.param_shapes) for i in idx):
            last = len(operator.param_shapes) - 1
            raise ValueError(f"block {name!r} has indices {idx}; need a non-empty subset of 0..{last}")
    return resolved


def rademacher(
    shapes: Sequence[torch.Size], count: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> list[Tensor]:
    """``count`` Rademacher (+-1) vectors, as a list of ``[count, *shape]`` tensors.

    Drawn probe by probe (all pieces of probe 0, then of probe 1, ...), so probe ``i`` of a generator's
    stream is the same whether it is drawn alone or with others: chunking probes changes no estimate. Drawn
    on the generator's device and then moved, so a CPU generator gives the same probes on any device. The
    tensors are views into one ``[count, total]`` buffer (each piece's rows are contiguous).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> two = rademacher([torch.Size([3])], 2, torch.float32, torch.device("cpu"), g)[0]
        >>> g.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> one = [rademacher([torch.Size([3])], 1, torch.float32, torch.device("cpu"), g)[0] for _ in range(2)]
        >>> torch.equal(two, torch.cat(one)), set(two.unique().tolist()) <= {-1.0, 1.0}
        (True, True)
    """
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    n_bytes = (total + 7) // 8
    # One random byte gives eight signs, looked up in a 256 x 8 table: ~2 ms per probe of 2.7M parameters
    # on one CPU thread, against ~17 ms for drawing every sign with its own random number.
    signs = _SIGN_TABLE.to(dtype=dtype, device=generator.device)
    flat = torch.empty((count, n_bytes * 8), dtype=dtype, device=generator.device)
    for i in range(count):
        raw = torch.empty(n_bytes, dtype=torch.uint8, device=generator.device).random_(generator=generator)
        torch.index_select(signs, 0, raw.int(), out=flat[i].view(n_bytes, 8))
    flat = flat[:, :total].to(device)
    # Views into one [count, total] buffer: no per-parameter copies.
    return [piece.view(count, *shape) for piece, shape in zip(flat.split(sizes, dim=1), shapes)]


def _rowwise_dot(product: Tensor) -> Tensor:
    # [K, *shape] -> [K] float64 sums; reshape, not flatten(1), so that 0-dim parameters ([K]) work too.
    return product.reshape(product.shape[0], -1).sum(1, dtype=torch.float64)


def hutchinson_trace(
    hvp: LinearOperator,
    blocks: Mapping[str, Sequence[int]] | None,
    num_probes: int,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 1,
    check_every: int = 4,
    deflation_rank: int = 0,
    adaptive: bool = False,
    min_phase_probes: int = 16,
) -> dict[str, TraceEstimate]:
    """Per-block Hutchinson traces ``tr(H_BB) ~ mean_k v_k^T (H v_k)_B`` from full-space Rademacher probes.

    Each probe spans every parameter, so one operator application gives all blocks' values at once
    (unbiased: ``E[v^T (H v)_B] = sum_{i in B} H_ii``). Probes are drawn and applied ``chunk_size`` at a
    time and reduced to their per-parameter dot products right away, so only ``chunk_size`` probe and
    product vectors are alive at once (each as large as the parameters). Probe ``i`` does not depend on
    ``chunk_size`` (see :func:`rademacher`), so neither do the values.

    Args:
        hvp: the operator.
        blocks: block name -> parameter indices; ``None`` gives one block ``"model"`` over everything.
        num_probes: probes to use (the maximum when ``rtol`` is set); at least 2 for a standard error.
        rtol: stop early once every block has ``stderr / |mean| < rtol`` (checked every ``check_every``
            probes, rounded up to whole chunks).
        generator: source of the probes (default: a CPU generator seeded with 0).
        chunk_size: probes per operator call (memory: ``2 * chunk_size`` parameter-sized vectors).
        check_every: probes between two ``rtol`` checks.
        deflation_rank: ``k > 0`` (opt-in) deflates the top of the spectrum first, Hutch++-style: a range sketch
            ``Q = orth(H S)`` from ``k`` Gaussian vectors (``k`` products), the exact ``tr(D_B Q Q^T H)`` of every
            block (``k`` more products), then Hutchinson on the rest, ``v^T D_B (I - Q Q^T) H v``. Unbiased for
            any ``Q``; the variance drops when a few eigenvalues dominate ``||H||_F``. Costs ``2k`` products up
            front and keeps ``k`` parameter-sized vectors alive. The standard error is over the probes, given
            ``Q``; ``num_probes`` counts probes only.
        adaptive: (opt-in, needs ``rtol``) restrict later probes to the blocks that still lag. Phase 1 uses
            full-space probes; at each ``rtol`` check after the current phase has ``min_phase_probes`` probes
            (and as many remain), if the blocks whose standard error is still above ``rtol * |mean|`` span fewer
            parameters than the current probes, a new phase starts with probes zero outside those blocks. A
            block's values from such a probe are ``v_B^T (H_S v_S)_B``, still unbiased for ``tr(H_BB)`` but
            without the coupling to the blocks left out (most of a block's probe variance in a ViT), and the
            product needs only ``torch.autograd.grad(g_S . v_S, params_S)`` (operators with a
            ``matmat_subset`` method; otherwise a full product of the zero-padded vector). Blocks left out keep
            their estimate. Each block's mean is that of all its values, its standard error the stratified one over
            the phases (:meth:`TraceEstimate.from_phases`; per-phase statistics in ``TraceEstimate.phases``).
        min_phase_probes: with ``adaptive``, the fewest probes of a phase before the next may start (each phase's
            variance is estimated from its own probes; fewer make the weights noisy).

    Example:
        >>> from lightning_depthgrow.curvature import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])), [(1,), (2,)])
        >>> est = hutchinson_trace(op, {"a": [0], "b": [1]}, num_probes=4)
        >>> est["a"].mean, est["b"].mean, est["b"].stderr  # exact for a diagonal matrix
        (1.0, 5.0, 0.0)
    """
    if num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 to report a standard error, got {num_probes}")
    if rtol is not None and rtol <= 0:
        raise ValueError(f"rtol must be positive or None, got {rtol}")
    if chunk_size < 1 or check_every < 1:
        raise ValueError(f"chunk_size and check_every must be >= 1, got {chunk_size} and {check_every}")
    if isinstance(deflation_rank, bool) or not isinstance(deflation_rank, int) or deflation_rank < 0:
        raise ValueError(f"deflation_rank must be an int >= 0, got {deflation_rank!r}")
    check_adaptive(adaptive, rtol, deflation_rank)
    if isinstance(min_phase_probes, bool) or not isinstance(min_phase_probes, int) or min_phase_probes < 2:
        raise ValueError(f"min_phase_probes must be an int >= 2, got {min_phase_probes!r}")
    index = _block_indices(hvp, blocks)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    basis, exact = _deflation(hvp, deflation_rank, chunk_size, generator) if deflation_rank else (None, None)
    # values[name][k]: the block's probe values in phase k (one phase unless adaptive).
    values: dict[str, list[list[float]]] = {name: [[]] for name in index}
    support = list(range(len(hvp.param_shapes)))  # parameters the probes span (phase 1: all)
    active = list(index)  # blocks that receive values in the current phase
    rows = dict(index)  # per active block: its parameters' positions in `support`
    done, next_check, phase_done = 0, check_every, 0
    while done < num_probes:
        k = min(chunk_size, num_probes - done)
        restricted = len(support) < len(hvp.param_shapes)
        probes = rademacher([hvp.param_shapes[i] for i in support], k, hvp.dtype, hvp.device, generator)
        products = _apply_on(hvp, probes, support) if restricted else hvp.matmat(probes)
        if basis is not None:  # (I - Q Q^T) H v
            coefficients = sum(p.reshape(k, -1) @ q.reshape(q.shape[0], -1).T for p, q in zip(products, basis))
            products = [
                p - (coefficients @ q.reshape(q.shape[0], -1)).reshape(p.shape) for p, q in zip(products, basis)
            ]
        # Per-parameter v^T Hv for each probe, summed in float64. The products are ours: multiply in place
        # rather than allocate another parameter-sized temporary; they die with this iteration.
        dots = torch.stack([_rowwise_dot(h.mul_(v)) for v, h in zip(probes, products)])
        if exact is not None:
            dots = dots + exact.unsqueeze(1)
        del probes, products
        for name in active:
            values[name][-1].extend(dots[rows[name]].sum(0).tolist())
        done += k
        phase_done += k
        if rtol is not None and done >= next_check:
            next_check = done + check_every
            if done >= num_probes:
                break
            lagging = [name for name in active if not _converged(values[name], rtol)]
            if not lagging:  # blocks outside `active` converged before they were left out
                break
            if adaptive and phase_done >= min_phase_probes and num_probes - done >= min_phase_probes:
                narrower = sorted({i for name in lagging for i in index[name]})
                if len(narrower) < len(support):
                    support, active, phase_done = narrower, lagging, 0
                    position = {param: r for r, param in enumerate(support)}
                    rows = {name: [position[i] for i in index[name]] for name in active}
                    for name in active:
                        values[name].append([])
    if not adaptive:
        return {name: TraceEstimate.from_values(v[0]) for name, v in values.items()}
    return {name: TraceEstimate.from_phases(v) for name, v in values.items()}


def _apply_on(hvp: LinearOperator, vectors: list[Tensor], support: list[int]) -> list[Tensor]:
    """``(H v)_S`` for vectors given on the parameters ``support`` (zero elsewhere)."""
    subset = getattr(hvp, "matmat_subset", None)
    if subset is not None:
        return subset(vectors, support)
    products = hvp.matmat(zero_padded(vectors, support, hvp.param_shapes))
    return [products[i] for i in support]


def _deflation(
    hvp: LinearOperator, rank: int, chunk_size: int, generator: torch.Generator
) -> tuple[list[Tensor], Tensor]:
    """An orthonormal basis ``Q`` of ``range(H S)`` (``[rank, *shape]`` pieces) and, per parameter, the exact
    ``sum_i <Q_i, (H Q_i)>`` restricted to that parameter (so that a block's sum is ``tr(D_B Q Q^T H)``)."""

    def apply(vectors: list[Tensor]) -> list[Tensor]:
        count = vectors[0].shape[0]
        pieces = [hvp.matmat([v[start : start + chunk_size] for v in vectors]) for start in range(0, count, chunk_size)]
        return [torch.cat(parts) for parts in zip(*pieces)]

    sketch = [
        torch.randn((rank, *s), generator=generator, device=generator.device).to(hvp.device, hvp.dtype)
        for s in hvp.param_shapes
    ]
    basis = apply(sketch)
    del sketch
    # Orthonormalise through the Gram matrix, twice (float32), dropping null directions. (Any Q keeps the estimator
    # unbiased: tr(D_B Q Q^T H) + E[v^T D_B (I - Q Q^T) H v] = tr(D_B H); orthonormality only lowers the variance.)
    for _ in range(2):
        gram = sum(y.reshape(y.shape[0], -1).double() @ y.reshape(y.shape[0], -1).double().T for y in basis)
        w, u = torch.linalg.eigh(gram)
        keep = w > 1e-10 * w.max().clamp_min(0) if w.numel() and w.max() > 0 else torch.zeros_like(w, dtype=torch.bool)
        transform = (u[:, keep] / w[keep].sqrt()).T.to(hvp.dtype)
        basis = [(transform @ y.reshape(y.shape[0], -1)).reshape(-1, *y.shape[1:]) for y in basis]
    if basis[0].shape[0] == 0:
        return basis, torch.zeros(len(basis), dtype=torch.float64, device=hvp.device)
    products = apply([q.clone() for q in basis])
    exact = torch.stack([_rowwise_dot(q * h).sum() for q, h in zip(basis, products)])
    return basis, exact


def _converged(phases: list[list[float]], rtol: float) -> bool:
    est = TraceEstimate.from_phases(phases)  # one phase: from_values
    if est.stderr == 0.0:
        return True
    return math.isfinite(est.stderr) and est.stderr < rtol * abs(est.mean)


EIGEN_METHODS = ("lanczos", "power")


def top_eigenvalue(
    hvp: LinearOperator,
    blocks: Mapping[str, Sequence[int]] | None = None,
    num_iters: int = 50,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    method: str = "lanczos",
    iterations: dict[str, int] | None = None,
) -> dict[str, float]:
    """Dominant eigenvalue of the whole operator (key ``"model"``) and of each block's diagonal block.

    "Dominant" means largest in *magnitude*, returned with its sign (as PyHessian's power iteration), so a
    Hessian dominated by negative curvature gives a negative number. The block-restricted operator ``H_BB``
    is applied by zeroing the vector outside the block and reading the product inside it. All vectors (whole
    model and every block) go through the operator together, each stopping on its own.

    ``method="lanczos"`` (default): Lanczos without reorthogonalisation (three vectors per key alive), from a
    Gaussian start. After each product the Ritz value of largest magnitude of the tridiagonal matrix is the
    estimate; a key stops once that Ritz pair's residual ``||H x - theta x||`` (read off the tridiagonal
    matrix, no extra product) is at most ``tol * |theta|``. For a symmetric operator some eigenvalue lies
    within the residual of ``theta``, so ``tol`` bounds the relative error, also on close spectra where the
    change of a power-iteration estimate between two steps is small long before it is accurate.

    ``method="power"``: power iteration stopping when the Rayleigh quotient changes by less than ``tol``
    (relative) between two iterations, as PyHessian's ``eigenvalues``; kept for comparison.

    Args:
        hvp: the operator.
        blocks: block name -> parameter indices; ``None``: only the whole operator.
        num_iters: at most this many products per key.
        tol: relative residual (Lanczos) or relative change (power) at which a key stops.
        generator: source of the start vectors (default: a CPU generator seeded with 0).
        method: ``"lanczos"`` or ``"power"``.
        iterations: if given, filled with the number of products each key used.

    Example:
        >>> from lightning_depthgrow.curvature import DenseOperator
        >>> A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, -5.0]])
        >>> eig = top_eigenvalue(DenseOperator(A, [(2,), (1,)]), {"a": [0], "b": [1]})
        >>> round(eig["model"], 4), round(eig["a"], 4), round(eig["b"], 4)
        (-5.0, 3.0, -5.0)
    """
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if method not in EIGEN_METHODS:
        raise ValueError(f"method must be one of {EIGEN_METHODS}, got {method!r}")
    index = {MODEL_KEY: list(range(len(hvp.param_shapes)))}
    index.update(_block_indices(hvp, blocks) if blocks is not None else {})
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    names = list(index)
    # mask[k, j] = 1 if parameter j belongs to vector k's block.
    mask = torch.zeros(len(names), len(hvp.param_shapes), dtype=hvp.dtype, device=hvp.device)
    for k, name in enumerate(names):
        mask[k, index[name]] = 1
    gauss = [
        torch.randn((len(names), *s), generator=generator, device=generator.device).to(hvp.device, hvp.dtype)
        for s in hvp.param_shapes
    ]
    run = _lanczos if method == "lanczos" else _power
    estimate, used = run(hvp, mask, _restrict(gauss, mask), num_iters, tol)
    if iterations is not None:
        iterations.update({name: used[k] for k, name in enumerate(names)})
    return {name: estimate[k] for k, name in enumerate(names)}


def _expand(x: Tensor, like: Tensor) -> Tensor:
    return x.view(-1, *([1] * (like.dim() - 1)))


def _restrict(vectors: list[Tensor], mask: Tensor) -> list[Tensor]:
    # Row k of every piece is zeroed outside key k's block.
    return [v * _expand(mask[:, j], v) for j, v in enumerate(vectors)]


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Row-wise inner products of two lists of ``[K, *shape]`` tensors, in float64."""
    return sum(_rowwise_dot(x * y) for x, y in zip(a, b))


def _scale(vectors: list[Tensor], factor: Tensor) -> list[Tensor]:
    return [v * _expand(factor.to(v.dtype), v) for v in vectors]


def _lanczos(
    hvp: LinearOperator, mask: Tensor, start: list[Tensor], num_iters: int, tol: float
) -> tuple[list[float], list[int]]:
    n = mask.shape[0]
    norm = _dot(start, start).sqrt()
    q = _scale(start, torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)))
    q_prev = [torch.zeros_like(v) for v in q]
    beta_prev = torch.zeros(n, dtype=torch.float64, device=norm.device)
    alphas: list[list[float]] = [[] for _ in range(n)]
    betas: list[list[float]] = [[] for _ in range(n)]
    estimate, used = [math.nan] * n, [0] * n
    active = [k for k in range(n) if norm[k].item() > 0]
    for k in range(n):
        if k not in active:
            estimate[k] = 0.0  # an empty block (or a zero start): the restricted operator is 0
    eps = torch.finfo(hvp.dtype).eps
    for _ in range(num_iters):
        if not active:
            break
        rows = torch.tensor(active, device=hvp.device)
        current = [v[rows] for v in q]
        w = _restrict(hvp.matmat(current), mask[rows])
        alpha = _dot(current, w)
        w = [x - _expand(alpha.to(x.dtype), x) * c for x, c in zip(w, current)]
        w = [x - _expand(beta_prev[rows].to(x.dtype), x) * p[rows] for x, p in zip(w, q_prev)]
        # One local re-orthogonalisation against the current vector: cheap, and keeps alpha accurate.
        fix = _dot(current, w)
        w = [x - _expand(fix.to(x.dtype), x) * c for x, c in zip(w, current)]
        alpha = alpha + fix
        beta = _dot(w, w).sqrt()
        still_active = []
        for pos, k in enumerate(active):
            used[k] += 1
            a, b = alpha[pos].item(), beta[pos].item()
            alphas[k].append(a)
            if not (math.isfinite(a) and math.isfinite(b)):
                estimate[k] = math.nan
                continue
            theta, residual, scale = _top_ritz(alphas[k], betas[k], b)
            estimate[k] = theta
            breakdown = b <= 10 * eps * max(scale, 1e-30)  # an invariant subspace: theta is exact
            if not (breakdown or residual <= tol * abs(theta)):
                still_active.append(k)
            betas[k].append(b)
        inverse = torch.where(beta > 0, 1.0 / beta, torch.zeros_like(beta))
        w = _scale(w, inverse)
        for j in range(len(q)):
            q_prev[j][rows] = q[j][rows]
            q[j][rows] = w[j]
        beta_prev[rows] = beta
        active = still_active
    return estimate, used


def _top_ritz(alphas: list[float], betas: list[float], beta_next: float) -> tuple[float, float, float]:
    """Ritz value of largest magnitude of the Lanczos tridiagonal, its residual norm and the spectrum scale."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    top = int(values.abs().argmax())
    theta = values[top].item()
    residual = abs(beta_next * vectors[-1, top].item())
    return theta, residual, values.abs().max().item()


def _power(
    hvp: LinearOperator, mask: Tensor, start: list[Tensor], num_iters: int, tol: float
) -> tuple[list[float], list[int]]:
    n = mask.shape[0]
    norm = _dot(start, start).sqrt()
    vectors = _scale(start, torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)))
    estimate, used = [math.nan] * n, [0] * n
    active = list(range(n))
    for _ in range(num_iters):
        rows = torch.tensor(active, device=hvp.device)
        current = [v[rows] for v in vectors]
        products = _restrict(hvp.matmat(current), mask[rows])
        rayleigh = _dot(current, products).cpu()
        norm = _dot(products, products).sqrt()
        new_vectors = _scale(products, torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)))
        still_active = []
        for pos, k in enumerate(active):
            used[k] += 1
            previous, value = estimate[k], rayleigh[pos].item()
            estimate[k] = value
            converged = (
                norm[pos].item() == 0.0
                or not math.isfinite(value)
                or (math.isfinite(previous) and abs(value - previous) <= tol * abs(value))
            )
            if not converged:
                still_active.append(k)
        for v, nv in zip(vectors, new_vectors):
            v[rows] = nv
        active = still_active
        if not active:
            break
    return estimate, used
