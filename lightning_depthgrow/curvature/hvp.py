"""Hessian-vector products over a model, a loss and a list of batches.

The operator is ``H = mean_b  d^2/dθ^2 loss_fn(model, batches[b])`` restricted to a set of parameters θ,
applied to a *batch* of K vectors at once (each a list of tensors shaped ``[K, *param.shape]``). The
estimators in :mod:`.estimators` only see this interface (``param_shapes``, ``dtype``, ``device``,
``matmat``), so they can be tested against a dense matrix (:class:`DenseOperator`).

Two backends compute the same numbers:

``"double_backward"``
    One forward and one ``create_graph`` backward per batch; the gradient graph is then reused for
    every probe (``retain_graph``): each probe costs one second backward pass. By default probes go
    through one at a time (``probe_chunk=1``): on CPU that was faster than batching them with
    ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the second backward) and needs no
    per-probe copies of activations (see ``benchmarks/bench_curvature.py``). ``probe_chunk > 1`` batches
    (one at a time anyway if an op has no batching rule). The graph of the most recent batch stays
    cached between calls, so with a single batch every probe and power iteration reuses one graph.
``"forward_over_reverse"``
    ``torch.func.jvp(torch.func.grad(f), (θ,), (v,))`` with ``f`` the loss as a function of the
    parameters (``torch.func.functional_call``), vmapped over up to ``probe_chunk`` probes (default 8;
    one at a time if vmap fails). Every call re-runs the forward and first backward pass, once per vmapped
    chunk, so batching matters more here: a single probe costs about three training steps.

Dropout and drop-path: the forward pass of batch ``b`` always runs right after
``torch.manual_seed(seed + b)`` (inside a forked RNG, so the caller's RNG state is untouched); every
probe therefore sees the same masks, and in the forward-over-reverse backend vmap uses
``randomness="same"``. The loss differentiated is exactly
``torch.manual_seed(seed + b); loss_fn(model, batches[b])``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .state import estimation_mode

LossFn = Callable[[nn.Module, Any], Tensor]
BACKENDS = ("double_backward", "forward_over_reverse")
# Probes per batched pass when the caller does not say, chosen by measurement on CPU (bench_curvature.py):
# a looped second backward beat the vmapped one and keeps one probe's activations alive instead of K;
# forward-over-reverse recomputes the primal pass per call, so it wants several probes per call.
DEFAULT_PROBE_CHUNK = {"double_backward": 1, "forward_over_reverse": 8}


class LossFunctionError(TypeError):
    """``loss_fn`` returned something that is not a scalar tensor attached to the parameters."""


class LinearOperator(Protocol):
    """A symmetric linear map over a list of parameter-shaped tensors, applied to K vectors at once."""

    param_shapes: list[torch.Size]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: list[Tensor]) -> list[Tensor]:
        """``vectors[j]`` has shape ``[K, *param_shapes[j]]``; returns the products in the same layout."""
        ...


class DenseOperator:
    """A dense symmetric matrix seen as a :class:`LinearOperator` over pieces of given shapes.

    Useful to test estimators against exact numbers, and to inspect a small Hessian.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> op = DenseOperator(A, [(1,), (2,)])
        >>> [v.tolist() for v in op.matmat([torch.ones(1, 1), torch.ones(1, 2)])]
        [[[1.0]], [[2.0, 3.0]]]
    """

    def __init__(self, matrix: Tensor, shapes: Sequence[Sequence[int]]) -> None:
        self.param_shapes = [torch.Size(s) for s in shapes]
        sizes = [s.numel() for s in self.param_shapes]
        if matrix.shape != (sum(sizes), sum(sizes)):
            raise ValueError(f"matrix of shape {tuple(matrix.shape)} does not match shapes totalling {sum(sizes)}")
        self.matrix, self._sizes = matrix, sizes
        self.dtype, self.device = matrix.dtype, matrix.device

    def matmat(self, vectors: list[Tensor]) -> list[Tensor]:
        """``H V`` for ``K`` vectors at once: ``vectors[j]`` is ``[K, *shapes[j]]``, like the result."""
        k = vectors[0].shape[0]
        flat = torch.cat([v.reshape(k, -1) for v in vectors], dim=1)
        out = flat @ self.matrix.T
        return [o.reshape(k, *s) for o, s in zip(out.split(self._sizes, dim=1), self.param_shapes)]

    def matmat_subset(self, vectors: list[Tensor], indices: Sequence[int]) -> list[Tensor]:
        """``(H V)_S`` for vectors zero outside the pieces ``S = indices``: ``vectors[j]`` is piece ``indices[j]``.

        Example:
            >>> op = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]), [(1,), (1,)])
            >>> op.matmat_subset([torch.ones(1, 1)], [1])[0].tolist()  # H_11 * 1
            [[3.0]]
        """
        k = vectors[0].shape[0]
        offsets = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        rows = torch.cat([torch.arange(offsets[i], offsets[i] + self._sizes[i]) for i in indices])
        flat = torch.cat([v.reshape(k, -1) for v in vectors], dim=1)
        out = flat @ self.matrix[rows][:, rows].T
        sizes = [self._sizes[i] for i in indices]
        return [o.reshape(k, *self.param_shapes[i]) for o, i in zip(out.split(sizes, dim=1), indices)]


def zero_padded(vectors: list[Tensor], indices: Sequence[int], shapes: Sequence[Sequence[int]]) -> list[Tensor]:
    """K vectors given on the parameters ``indices`` (``vectors[j]`` on parameter ``indices[j]``), as full vectors
    over every parameter of ``shapes`` with zeros elsewhere.

    Example:
        >>> [v.tolist() for v in zero_padded([torch.ones(1, 2)], [1], [(1,), (2,)])]
        [[[0.0]], [[1.0, 1.0]]]
    """
    k, like = vectors[0].shape[0], vectors[0]
    full = [like.new_zeros(k, *shape) for shape in shapes]
    for i, v in zip(indices, vectors):
        full[i] = v
    return full


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA OOM or the CPU allocator's)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _clone_inference_tensors(batch: Any) -> Any:
    # Batches collected under torch.inference_mode cannot be saved for backward; plain copies can.
    if isinstance(batch, Tensor):
        if not batch.is_inference():
            return batch
        with torch.inference_mode(False):
            return batch.clone()
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_clone_inference_tensors(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _clone_inference_tensors(v) for k, v in batch.items()}
    return batch


def check_loss(loss: Any) -> Tensor:
    """Raise :class:`LossFunctionError` unless ``loss`` is a scalar floating-point tensor."""
    if not isinstance(loss, Tensor):
        raise LossFunctionError(
            f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__}. If your step returns a "
            "dict or tuple, return only the loss, e.g. lambda model, batch: step(model, batch)['loss']."
        )
    if loss.numel() != 1:
        raise LossFunctionError(
            f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}. Reduce it to the loss that "
            "training minimises, e.g. F.cross_entropy(..., reduction='mean') or loss.mean()."
        )
    if not loss.is_floating_point():
        raise LossFunctionError(f"loss_fn returned a {loss.dtype} tensor; it must be floating point.")
    return loss.reshape(())


class _LossModule(nn.Module):
    """``model`` plus ``loss_fn`` as one module, so torch.func.functional_call can swap its parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return check_loss(self.loss_fn(self.model, batch))


class HessianOperator:
    """Hessian of ``mean_b loss_fn(model, batches[b])`` w.r.t. the named parameters, as a :class:`LinearOperator`.

    Args:
        model: the (unwrapped, not DDP) module. Its parameters are only read.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: the batches the Hessian averages over (each is passed to ``loss_fn`` as is).
        param_names: names from ``model.named_parameters()``; default all with ``requires_grad``.
        backend: ``"double_backward"`` or ``"forward_over_reverse"`` (see the module docstring).
        seed: dropout/drop-path masks of batch ``b`` are those drawn after ``torch.manual_seed(seed + b)``.
        probe_chunk: at most this many vectors go through one batched pass (bounds memory); ``None``
            picks the backend's default (:data:`DEFAULT_PROBE_CHUNK`).

    Use as a context manager (or call :meth:`close`) to free the cached graph. Run it inside
    :func:`~lightning_depthgrow.curvature.preserve_model_state` when the model must be left untouched.

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> loss_fn = lambda m, b: (m(b) ** 2).mean()
        >>> with HessianOperator(net, loss_fn, [torch.eye(3)]) as op:
        ...     hv = op.matmat([torch.ones(1, 1, 3), torch.zeros(1, 1)])
        >>> [round(x, 4) for x in hv[0].flatten().tolist()]  # H_ww = 2/3 * I for this loss and batch
        [0.6667, 0.6667, 0.6667]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        param_names: Sequence[str] | None = None,
        backend: str = "double_backward",
        seed: int = 0,
        probe_chunk: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        named = dict(model.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        missing = [n for n in param_names if n not in named]
        if missing:
            raise ValueError(f"Unknown parameter names {missing[:5]}; use names from model.named_parameters().")
        self.model, self.loss_fn, self.backend, self.seed = model, loss_fn, backend, seed
        self.batches = [_clone_inference_tensors(b) for b in batches]
        if not self.batches:
            raise ValueError("batches is empty; pass at least one batch to estimate curvature on.")
        self.param_names = list(param_names)
        self.params = [named[n] for n in self.param_names]
        if not self.params:
            raise ValueError("No parameters to differentiate with respect to.")
        self.param_shapes = [p.shape for p in self.params]
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.probe_chunk = DEFAULT_PROBE_CHUNK[backend] if probe_chunk is None else max(1, int(probe_chunk))
        self._cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        self._graph: tuple[int, list[Tensor | None]] | None = None
        self._batched_ok = True

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the cached gradient graph."""
        self._graph = None

    def matmat(self, vectors: list[Tensor]) -> list[Tensor]:
        """Apply the Hessian to K vectors; ``vectors[j]`` has shape ``[K, *param_shapes[j]]``."""
        return self._apply(vectors, None)

    def matmat_subset(self, vectors: list[Tensor], indices: Sequence[int]) -> list[Tensor]:
        """``(H V)_S`` for K vectors that are zero outside the parameters ``S = indices``.

        ``vectors[j]`` (shape ``[K, *param_shapes[indices[j]]]``) is the vector's piece on parameter
        ``indices[j]``; the result has the same layout. With the double-backward backend the second backward is
        ``torch.autograd.grad(g_S . v_S, params_S)``: autograd only walks the part of the graph between
        ``params_S`` and their gradients, so a product restricted to late blocks costs less than a full one.
        (Forward-over-reverse computes the full product of the zero-padded vector.)
        """
        indices = list(indices)
        if len(indices) != len(vectors) or any(not 0 <= i < len(self.params) for i in indices):
            raise ValueError(f"need one vector per index in 0..{len(self.params) - 1}, got indices {indices}")
        return self._apply(vectors, indices)

    def _apply(self, vectors: list[Tensor], indices: list[int] | None) -> list[Tensor]:
        k = vectors[0].shape[0]
        starts = range(0, k, self.probe_chunk)
        out: list[list[Tensor]] = []  # per chunk, per parameter
        with estimation_mode(self.model):
            for b in range(len(self.batches)):
                for c, start in enumerate(starts):
                    chunk = [v[start : start + self.probe_chunk] for v in vectors]
                    if self.backend == "double_backward":
                        products = self._double_backward(b, chunk, indices)
                    elif indices is None:
                        products = self._forward_over_reverse(b, chunk)
                    else:  # the full product of the zero-padded vector, read on the subset
                        full_products = self._forward_over_reverse(b, zero_padded(chunk, indices, self.param_shapes))
                        products = [full_products[j] for j in indices]
                    products = [torch.zeros_like(v) if h is None else h.detach() for v, h in zip(chunk, products)]
                    if b == 0:
                        out.append(products)
                    else:  # out of place: a product may alias a vector autograd passed straight through
                        out[c] = [o + h for o, h in zip(out[c], products)]
        # One chunk and one batch (the common case) are returned as computed: no parameter-sized copy.
        result = out[0] if len(out) == 1 else [torch.cat(pieces) for pieces in zip(*out)]
        if len(self.batches) > 1:
            result = [r / len(self.batches) for r in result]
        return result

    def batch_losses(self) -> list[float]:
        """The loss of every batch, with the same dropout masks the products use (no graph kept)."""
        with estimation_mode(self.model), torch.no_grad():
            return [float(self._loss(b)) for b in range(len(self.batches))]

    @contextlib.contextmanager
    def _seeded(self, b: int) -> Iterator[None]:
        # Same dropout masks for every pass over batch b; the caller's RNG streams are left as they were.
        with torch.random.fork_rng(devices=self._cuda_devices):
            torch.manual_seed(self.seed + b)
            yield

    def _loss(self, b: int) -> Tensor:
        with self._seeded(b):
            return check_loss(self.loss_fn(self.model, self.batches[b]))

    def _gradient_graph(self, b: int) -> list[Tensor | None]:
        if self._graph is not None and self._graph[0] == b:
            return self._graph[1]
        self._graph = None  # free the previous batch's graph before building the next
        loss = self._loss(b)
        if not loss.requires_grad:
            raise LossFunctionError(
                "loss_fn returned a tensor that does not depend on the parameters (no grad_fn). Do not "
                "compute the loss under torch.no_grad() or detach it."
            )
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self._graph = (b, list(grads))
        return self._graph[1]

    def _double_backward(self, b: int, vectors: list[Tensor], indices: list[int] | None = None) -> list[Tensor | None]:
        grads = self._gradient_graph(b)
        # indices: the vectors are zero outside these parameters, and only the product on them is wanted.
        positions = list(range(len(self.params))) if indices is None else indices
        grads = [grads[i] for i in positions]
        inputs = [self.params[i] for i in positions]
        live = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:  # the loss is at most linear in every parameter: H = 0
            return [None] * len(vectors)
        outputs = [grads[j] for j in live]
        k = vectors[0].shape[0]
        if self._batched_ok and k > 1:
            try:
                with warnings.catch_warnings():
                    # vmap's per-op slow fallback still gives correct numbers; do not flood the user's log.
                    warnings.filterwarnings("ignore", message=".*performance drop.*")
                    return list(
                        torch.autograd.grad(
                            outputs,
                            inputs,
                            grad_outputs=[vectors[j] for j in live],
                            retain_graph=True,
                            allow_unused=True,
                            is_grads_batched=True,
                        )
                    )
            except RuntimeError as err:
                if is_out_of_memory(err):
                    raise
                self._batched_ok = False  # some op cannot be vmapped: one probe at a time from now on
        products = [
            torch.autograd.grad(
                outputs, inputs, grad_outputs=[vectors[j][i] for j in live], retain_graph=True, allow_unused=True
            )
            for i in range(k)
        ]
        if k == 1:  # the default: a view, not a copy
            return [None if h is None else h.unsqueeze(0) for h in products[0]]
        return [
            None if products[0][p] is None else torch.stack([prod[p] for prod in products]) for p in range(len(inputs))
        ]

    def _forward_over_reverse(self, b: int, vectors: list[Tensor]) -> list[Tensor | None]:
        from torch.func import functional_call, grad, jvp, vmap

        wrapper = _LossModule(self.model, self.loss_fn)
        keys = [f"model.{n}" for n in self.param_names]
        primals = {key: p.detach() for key, p in zip(keys, self.params)}
        batch = self.batches[b]

        def gradient(theta: dict[str, Tensor]) -> dict[str, Tensor]:
            return grad(lambda t: functional_call(wrapper, t, (batch,)))(theta)

        def hvp(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(gradient, (primals,), (tangent,))[1]

        tangents = {key: v for key, v in zip(keys, vectors)}
        if self._batched_ok and vectors[0].shape[0] > 1:
            try:
                with self._seeded(b), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*performance drop.*")
                    result = vmap(hvp, randomness="same")(tangents)
                return [result[key] for key in keys]
            except (RuntimeError, NotImplementedError) as err:
                if is_out_of_memory(err):
                    raise
                self._batched_ok = False
        rows = []
        for i in range(vectors[0].shape[0]):
            with self._seeded(b):
                rows.append(hvp({key: v[i] for key, v in tangents.items()}))
        return [torch.stack([r[key] for r in rows]) for key in keys]
