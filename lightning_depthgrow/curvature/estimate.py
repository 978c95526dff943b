"""``estimate_curvature``: per-block Hessian traces (and top eigenvalues) of a training model, leaving no trace."""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import resolve_blocks
from .estimators import EIGEN_METHODS, MODEL_KEY, TraceEstimate, check_adaptive, hutchinson_trace, top_eigenvalue
from .hvp import BACKENDS, HessianOperator, LossFn, LossFunctionError, _clone_inference_tensors, is_out_of_memory
from .state import estimation_mode, preserve_model_state


class CurvatureEstimationError(RuntimeError):
    """The estimate is not finite (raised only with ``strict=True``) or could not be computed."""


class CurvatureOutOfMemoryError(CurvatureEstimationError):
    """The batches given to a curvature estimate do not fit in memory with the second-order graph."""


class InvalidBatchesError(ValueError):
    """``loss_fn(model, batch)`` fails on the batches given, before any second-order pass is involved."""


# How torch names an op without a second derivative (double backward) or without forward-mode AD.
_NO_SECOND_DERIVATIVE = (
    re.compile(r"derivative for (\S+) is not implemented"),
    re.compile(r"Trying to use forward AD with (\S+) that does not support it"),
)


def _ops_without_second_derivative(errors: Sequence[BaseException]) -> list[str] | None:
    """The ops named by ``errors`` if every error says an op has no (second or forward-mode) derivative."""
    ops: list[str] = []
    for err in errors:
        found = [m.group(1) for pattern in _NO_SECOND_DERIVATIVE for m in [pattern.search(str(err))] if m]
        if not found:
            return None
        ops.extend(found)
    return list(dict.fromkeys(op.rstrip(".,;") for op in ops))


@dataclass
class CurvatureEstimate:
    """Per-block curvature of the loss at the current parameters.

    Attributes:
        traces: block -> Hutchinson estimate of ``tr(H_BB)``.
        num_params: block -> number of scalar parameters.
        top_eigenvalues: dominant Hessian eigenvalue (signed, largest magnitude) of the whole model under
            ``"model"`` and of each block's diagonal block; empty unless requested.
        valid: ``False`` when a probe or eigenvalue was NaN/Inf; ``invalid_reason`` says where.
        backend: the Hessian-vector-product backend that produced the numbers.
        seconds: wall time of the estimate.
    """

    traces: dict[str, TraceEstimate]
    num_params: dict[str, int]
    top_eigenvalues: dict[str, float] = field(default_factory=dict)
    valid: bool = True
    invalid_reason: str = ""
    backend: str = ""
    seconds: float = 0.0

    @property
    def trace_per_param(self) -> dict[str, float]:
        """``tr(H_BB) / |B|``: average curvature per parameter, comparable across blocks of different size."""
        return {b: t.mean / self.num_params[b] for b, t in self.traces.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN and Inf become ``None``)."""

        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        def trace(t: TraceEstimate) -> dict[str, Any]:
            out: dict[str, Any] = {"mean": num(t.mean), "stderr": num(t.stderr), "num_probes": t.num_probes}
            if t.phases:  # adaptive estimates: probes per phase
                out["phase_probes"] = [count for _, _, count in t.phases]
            return out

        return {
            "traces": {b: trace(t) for b, t in self.traces.items()},
            "trace_per_param": {b: num(v) for b, v in self.trace_per_param.items()},
            "num_params": dict(self.num_params),
            "top_eigenvalues": {k: num(v) for k, v in self.top_eigenvalues.items()},
            "valid": self.valid,
            "invalid_reason": self.invalid_reason,
            "backend": self.backend,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurvatureEstimate:
        """Inverse of :meth:`to_dict` (``None`` back to NaN; raw probe values are not kept).

        Example:
            >>> e = CurvatureEstimate({"b": TraceEstimate.from_values([1.0, 3.0])}, {"b": 2}, {"model": 2.5})
            >>> CurvatureEstimate.from_dict(e.to_dict()).to_dict() == e.to_dict()
            True
        """

        def num(x: float | None) -> float:
            return math.nan if x is None else float(x)

        traces = {
            b: TraceEstimate(num(t["mean"]), num(t["stderr"]), int(t["num_probes"])) for b, t in data["traces"].items()
        }
        return cls(
            traces,
            {b: int(n) for b, n in data["num_params"].items()},
            {k: num(v) for k, v in data.get("top_eigenvalues", {}).items()},
            bool(data.get("valid", True)),
            str(data.get("invalid_reason", "")),
            str(data.get("backend", "")),
            float(data.get("seconds", 0.0)),
        )

    def pack(self) -> Tensor:
        """Everything that combines across ranks, as a 1-D float64 tensor to SUM-all-reduce.

        Layout: ``[invalid flag, seconds, (sum, sum of squares, count) per block in ``traces`` order,
        eigenvalues in ``top_eigenvalues`` order]``. Every rank must have estimated the same blocks.

        Raises:
            ValueError: for an adaptive estimate (``adaptive=True``): its probes come in phases of different
                variances, chosen by each rank's own convergence checks, which one pooled sum cannot combine.
        """
        if any(trace.phases for trace in self.traces.values()):
            raise ValueError(
                "an adaptive estimate (estimate_curvature(..., adaptive=True)) cannot be combined across ranks: "
                "its probes come in phases of different variances chosen by this rank's own convergence checks, "
                "which the pooled all-reduce of pack()/unpack() would mix. Under DDP use adaptive=False (every "
                "rank's probes then pool), or estimate adaptively on one process."
            )
        values: list[float] = [0.0 if self.valid else 1.0, self.seconds]
        for trace in self.traces.values():
            values.extend(trace.sums())
        values.extend(self.top_eigenvalues.values())
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def unpack(cls, packed: Tensor, like: CurvatureEstimate, world_size: int) -> CurvatureEstimate:
        """Combine a SUM-all-reduced :meth:`pack`: traces pool every rank's probes, eigenvalues are averaged.

        Example:
            >>> a = CurvatureEstimate({"b": TraceEstimate.from_values([1.0, 3.0])}, {"b": 2})
            >>> c = CurvatureEstimate({"b": TraceEstimate.from_values([5.0, 7.0])}, {"b": 2})
            >>> CurvatureEstimate.unpack(a.pack() + c.pack(), like=a, world_size=2).traces["b"].mean
            4.0
        """
        expected = 2 + 3 * len(like.traces) + len(like.top_eigenvalues)
        flat = packed.detach().to("cpu", torch.float64).flatten().tolist()
        if len(flat) != expected:
            raise ValueError(
                f"packed tensor has {len(flat)} entries but `like` needs {expected}; every rank must estimate the "
                "same blocks with the same top_eigen setting."
            )
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        invalid_ranks = round(flat[0])
        traces = {}
        for i, block in enumerate(like.traces):
            total, total_sq, count = flat[2 + 3 * i : 5 + 3 * i]
            traces[block] = TraceEstimate.from_sums(total, total_sq, count)
        offset = 2 + 3 * len(like.traces)
        eigen = {k: flat[offset + i] / world_size for i, k in enumerate(like.top_eigenvalues)}
        reason = ""
        if invalid_ranks:
            reason = f"invalid on {invalid_ranks} of {world_size} ranks"
            reason += f" (this rank: {like.invalid_reason})" if like.invalid_reason else ""
        return cls(traces, dict(like.num_params), eigen, not invalid_ranks, reason, like.backend, flat[1] / world_size)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel support neither double backward nor torch.func: work on the wrapped module.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def estimate_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    blocks: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    num_probes: int = 8,
    rtol: float | None = None,
    top_eigen: bool = False,
    eig_iters: int = 50,
    backend: str = "auto",
    seed: int = 0,
    strict: bool = False,
    eig_tol: float = 1e-3,
    probe_chunk: int | None = None,
    eig_method: str = "lanczos",
    batch_labels: Sequence[Any] | None = None,
    deflation_rank: int = 0,
    adaptive: bool = False,
) -> CurvatureEstimate:
    """Per-block Hessian traces of ``mean_b loss_fn(model, batches[b])``, leaving the model as it was.

    The Hessian is that of the loss exactly as training computes it in the model's current modes, with
    three controlled differences that do not change its value: fp32 without autocast, the math attention
    kernel, and BatchNorm in train mode normalising with batch statistics without updating its running
    statistics. Dropout/drop-path masks are fixed per batch (``torch.manual_seed(seed + b)``), so every
    probe sees the same function. Parameters, buffers, modes, ``.grad`` and RNG state are restored
    bitwise afterwards (:func:`preserve_model_state`). A DDP-wrapped model is unwrapped: call this on
    every rank and combine with :meth:`CurvatureEstimate.pack` / :meth:`CurvatureEstimate.unpack`.

    Args:
        model: the model (DDP/DataParallel wrappers are unwrapped).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, the training loss.
        batches: batches the Hessian averages over. One larger batch is cheaper than several small ones:
            the double-backward graph of one batch is reused by every probe and power iteration.
        blocks: ``None`` (:func:`discover_blocks`), ``{name: [parameter or module names]}`` or a list of
            module names. Probes span the union of all blocks' parameters.
        num_probes: Hutchinson probes (the maximum when ``rtol`` is set), at least 2.
        rtol: stop early once every block's ``stderr / |mean| < rtol``.
        top_eigen: also estimate the dominant eigenvalue of the whole model and of every block.
        eig_iters, eig_tol: at most ``eig_iters`` products per eigenvalue; stop once the Ritz pair's
            relative residual is below ``eig_tol`` (``eig_method="lanczos"``, the default: within 1% on
            close spectra such as ``|l2/l1| = 0.9`` in ~12 products) or, with ``eig_method="power"``,
            once the power-iteration estimate changes by less than ``eig_tol`` (as PyHessian).
        backend: ``"auto"`` (double backward; forward-over-reverse if that fails), ``"double_backward"`` or
            ``"forward_over_reverse"``.
        seed: seeds the probes and the dropout masks; same seed, same estimate.
        strict: raise :class:`CurvatureEstimationError` instead of returning ``valid=False`` on NaN/Inf or
            when an op of the model has no second derivative (e.g. ``hardsigmoid``; with ``strict=False``
            a ``UserWarning`` names the op and the estimate comes back with ``valid=False``).
        probe_chunk: probes drawn and pushed through the operator together. ``None``: the backend's
            default (1 for double backward, which reuses one gradient graph for every probe; 8 for
            forward-over-reverse, which re-runs the forward pass per call). Each probe in flight costs
            two parameter-sized vectors plus, when batched, a copy of the activations.
        eig_method: ``"lanczos"`` or ``"power"`` (see :func:`top_eigenvalue`).
        deflation_rank: opt-in Hutch++-style variance reduction (see :func:`hutchinson_trace`): ``2 *
            deflation_rank`` extra products and ``deflation_rank`` parameter-sized vectors of memory.
        adaptive: opt-in, needs ``rtol``: once some blocks have converged, later probes are zero outside the
            blocks that still lag (see :func:`hutchinson_trace`), which removes their coupling to the others
            from the variance and makes each product cheaper; each block's mean is that of all its probe values,
            its standard error the stratified one over the phases. Not combinable across DDP ranks
            (:meth:`CurvatureEstimate.pack` refuses it).
        batch_labels: how reports name the batches (default ``"batch <position in batches>"``);
            :class:`~lightning_depthgrow.callbacks.CurvatureMonitor` passes ``"training batch_idx <i>"``.

    Raises:
        LossFunctionError: ``loss_fn`` does not return a scalar tensor attached to the parameters.
        InvalidBatchesError: ``loss_fn(model, batches[0])`` itself fails (e.g. one batch was passed where
            a list of batches is expected).
        CurvatureOutOfMemoryError: the batches do not fit; pass fewer or smaller batches.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
        >>> loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        >>> est = estimate_curvature(net, loss_fn, data, num_probes=16)
        >>> sorted(est.traces), est.valid, est.backend
        (['0', '2'], True, 'double_backward')
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto', 'double_backward' or 'forward_over_reverse', got {backend!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 2:
        raise ValueError(f"num_probes must be an int >= 2 (a standard error needs two probes), got {num_probes!r}")
    if eig_method not in EIGEN_METHODS:
        raise ValueError(f"eig_method must be one of {EIGEN_METHODS}, got {eig_method!r}")
    check_adaptive(adaptive, rtol, deflation_rank)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> scalar Tensor")
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise InvalidBatchesError(
            f"batches must be a list of batches (each passed to loss_fn as is), got one {type(batches).__name__}; "
            "to estimate on a single batch pass [batch]."
        )
    start = time.perf_counter()
    model = _unwrap(model)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one batch (e.g. a few recent training batches).")
    labels = [f"batch {i}" for i in range(len(batches))] if batch_labels is None else list(batch_labels)
    if len(labels) != len(batches):
        raise ValueError(f"batch_labels has {len(labels)} entries for {len(batches)} batches")
    groups = resolve_blocks(model, blocks)
    names = list(dict.fromkeys(n for members in groups.values() for n in members))
    position = {n: i for i, n in enumerate(names)}
    index = {block: [position[n] for n in members] for block, members in groups.items()}
    params = dict(model.named_parameters())
    num_params = {block: sum(params[n].numel() for n in members) for block, members in groups.items()}

    candidates = BACKENDS if backend == "auto" else (backend,)
    failures: list[str] = []
    errors: list[BaseException] = []
    result = None
    # Outside inference mode, or the saved copies and probes would be inference tensors autograd rejects.
    with torch.inference_mode(False), preserve_model_state(model, parameters=False):
        for name in candidates:
            try:
                result = _estimate(
                    model,
                    loss_fn,
                    batches,
                    names,
                    index,
                    num_probes,
                    rtol,
                    top_eigen,
                    eig_iters,
                    eig_tol,
                    name,
                    seed,
                    probe_chunk,
                    eig_method,
                    labels,
                    deflation_rank,
                    adaptive,
                )
                break
            except LossFunctionError:
                raise
            except Exception as err:
                if not isinstance(err, (RuntimeError, NotImplementedError)):
                    # Not an autograd failure: blame the inputs if the plain loss fails too, else re-raise.
                    _check_plain_loss(model, loss_fn, batches, seed)
                    raise
                if is_out_of_memory(err):
                    raise CurvatureOutOfMemoryError(
                        f"Out of memory while estimating curvature on {len(batches)} batch(es): the second-order "
                        "graph needs roughly twice a training step's activation memory per batch, plus "
                        f"probe_chunk={probe_chunk or 'default'} probes at once. Pass fewer or smaller batches, "
                        "or lower probe_chunk."
                    ) from err
                failures.append(f"{name}: {type(err).__name__}: {err}")
                errors.append(err)
        if result is None:
            # Blame the inputs before the backends: does the plain loss even run?
            _check_plain_loss(model, loss_fn, batches, seed)
    if result is None:
        ops = _ops_without_second_derivative(errors)
        if ops is None:
            raise CurvatureEstimationError(
                "No Hessian-vector-product backend worked for this model: " + " | ".join(failures)
            )
        reason = (
            f"the model uses {', '.join(ops)}, which has no second derivative in torch (an activation such as "
            "F.hardsigmoid called outside an nn.Hardsigmoid module, or an op without double backward and forward-mode "
            "AD), so no Hessian-vector product can be computed"
        )
        if strict:
            raise CurvatureEstimationError(
                f"Curvature estimate impossible: {reason}. Replace the op (e.g. act_layer='silu' instead of a hard "
                "activation) or pass strict=False to get an estimate marked invalid. Errors: " + " | ".join(failures)
            )
        warnings.warn(
            f"Curvature estimate marked invalid: {reason}. Replace the op to get curvature estimates.",
            UserWarning,
            stacklevel=2,
        )
        nan_traces = {block: TraceEstimate(math.nan, math.nan, 0) for block in index}
        eigen = {key: math.nan for key in [MODEL_KEY, *index]} if top_eigen else {}
        result = (nan_traces, eigen, reason)
        name = "none"
    traces, eigen, reason = result
    estimate = CurvatureEstimate(traces, num_params, eigen, not reason, reason, name, time.perf_counter() - start)
    if reason and strict:
        raise CurvatureEstimationError(f"Curvature estimate is not finite: {reason}")
    return estimate


def _looks_like_one_batch(batches: list[Any]) -> bool:
    # A (inputs, targets) pair turned into a list: every element a tensor with the same leading size.
    sizes = {b.shape[0] if b.dim() else None for b in batches if isinstance(b, Tensor)}
    return all(isinstance(b, Tensor) for b in batches) and len(batches) > 1 and len(sizes) == 1


def _check_plain_loss(model: nn.Module, loss_fn: LossFn, batches: list[Any], seed: int) -> None:
    """Raise :class:`InvalidBatchesError` if ``loss_fn(model, batches[0])`` fails without any second order."""
    try:
        with estimation_mode(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loss_fn(model, _clone_inference_tensors(batches[0]))
    except LossFunctionError:
        raise
    except Exception as err:  # any failure of the user's own forward is reported as such
        hint = ""
        if _looks_like_one_batch(batches):
            hint = (
                f" `batches` looks like ONE batch of {len(batches)} tensors (e.g. (inputs, targets)): batches is a "
                "list of batches, each passed to loss_fn as is; pass [batch]."
            )
        raise InvalidBatchesError(
            f"loss_fn(model, batches[0]) fails on its own, before any Hessian-vector product: "
            f"{type(err).__name__}: {err}.{hint}"
        ) from err


def _estimate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Any],
    names: list[str],
    index: dict[str, list[int]],
    num_probes: int,
    rtol: float | None,
    top_eigen: bool,
    eig_iters: int,
    eig_tol: float,
    backend: str,
    seed: int,
    probe_chunk: int | None,
    eig_method: str = "lanczos",
    labels: Sequence[Any] | None = None,
    deflation_rank: int = 0,
    adaptive: bool = False,
) -> tuple[dict[str, TraceEstimate], dict[str, float], str]:
    generator = torch.Generator().manual_seed(seed)
    with HessianOperator(model, loss_fn, batches, names, backend, seed, probe_chunk) as op:
        traces = hutchinson_trace(
            op,
            index,
            num_probes,
            rtol=rtol,
            generator=generator,
            chunk_size=op.probe_chunk,
            deflation_rank=deflation_rank,
            adaptive=adaptive,
        )
        eigen = top_eigenvalue(op, index, eig_iters, eig_tol, generator, method=eig_method) if top_eigen else {}
        bad = [b for b, t in traces.items() if not all(math.isfinite(v) for v in t.values)]
        bad += [k for k, v in eigen.items() if not math.isfinite(v) and k not in bad]
        if not bad:
            return traces, eigen, ""
        losses = op.batch_losses()
    labels = [f"batch {i}" for i in range(len(batches))] if labels is None else list(labels)
    bad_losses = [str(labels[i]) for i, v in enumerate(losses) if not math.isfinite(v)]
    reason = f"non-finite Hessian-vector products in block(s) {bad}"
    if bad_losses:
        reason += f"; the loss itself is not finite on {', '.join(bad_losses)}"
    elif MODEL_KEY in bad and len(bad) == 1:
        reason += " (whole-model power iteration)"
    return traces, eigen, reason
