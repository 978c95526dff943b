r"""
CurvatureMonitor
^^^^^^^^^^^^^^^^

Estimate the loss curvature of every residual block while a model trains, on batches it has already seen.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from ..curvature import (
    CurvatureEstimate,
    CurvatureEstimationError,
    LossFunctionError,
    empirical_fisher_trace,
    estimate_curvature,
    resolve_blocks,
)
from ..curvature.hvp import BACKENDS
from ._common import check_strategy_supported

LossFn = Callable[[nn.Module, Any], Tensor]

# The logged numbers are identical on every rank after the all-reduce in CurvatureMonitor._combine, so
# Lightning's advice to log them with sync_dist=True (one more all-reduce per key, changing nothing) does not
# apply. Silenced for this callback's keys only.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('curvature/", category=PossibleUserWarning
)

_BACKENDS = ("auto", *BACKENDS)
QUANTITIES = ("hessian", "empirical_fisher")


class CurvatureMonitor(Callback):
    r"""Estimate per-block Hessian traces (and optionally top eigenvalues) every ``every_n_epochs`` epochs.

    The monitor keeps references to the last ``num_batches`` training batches as they pass (no extra data
    loading) and, at the end of every ``every_n_epochs``-th training epoch, runs Hutchinson's estimator on them
    with :func:`lightning_depthgrow.curvature.estimate_curvature`. The loss is, by default, the module's own
    ``training_step(batch, batch_idx)`` (its ``self.log`` calls muted), so the curvature is that of the loss
    the model actually trains on; pass ``loss_fn`` under manual optimization or when ``training_step`` has
    other side effects (metric updates). The estimate runs on the unwrapped ``LightningModule`` (never the DDP
    wrapper), in fp32 with autocast off, and leaves parameters, buffers, gradients, train/eval modes and RNG
    states exactly as they were.

    Under DDP every rank estimates on its own batches with its own probe vectors (probe seed
    ``seed + len(history) * world_size + global_rank``); the ranks' estimates are combined by one SUM
    all-reduce of :meth:`CurvatureEstimate.pack`, so every rank holds identical numbers afterwards. Probe
    vectors are never communicated.

    Results are exposed as :attr:`latest` (a :class:`CurvatureEstimate`; ``None`` before this process's first
    estimate, also after a resume) and :attr:`history` (one plain dict per estimate,
    ``{"epoch", "step", **estimate.to_dict()}``, saved in checkpoints). With ``log=True`` the scheduled
    estimates are logged from ``on_train_epoch_end`` through ``pl_module.log_dict(..., sync_dist=False)``
    (values are already identical on all ranks; Lightning sends them to every logger from rank 0 and puts them
    in ``trainer.callback_metrics``) under the keys ``curvature/trace/<block>``,
    ``curvature/trace_stderr/<block>``, ``curvature/trace_per_param/<block>`` and, with ``top_eigen=True``,
    ``curvature/top_eigenvalue/<block>``.

    Other callbacks read :attr:`latest` (put the monitor before them in ``callbacks=[...]`` when both act in
    ``on_train_epoch_end``), or call :meth:`estimate_now` for a fresh estimate. Under DDP,
    :meth:`estimate_now` is a collective call: every rank must call it.

    Args:
        every_n_epochs: estimate at the end of every ``every_n_epochs``-th training epoch (1 = every epoch).
        num_batches: how many of the most recent training batches to estimate on.
        num_probes: Rademacher probe vectors per rank and estimate, at least 2 (the maximum when ``rtol`` is
            set).
        rtol: stop adding probes once every block's standard error is below ``rtol * |trace|``; ``None``
            always uses ``num_probes``.
        top_eigen: also estimate each block's largest Hessian eigenvalue by power iteration.
        blocks: ``{name: [parameter or module names]}`` or a list of module names (names relative to the
            ``LightningModule``, e.g. ``"model.blocks.0"``); ``None`` discovers the model's residual blocks
            anew at every estimate, so blocks added during training are included.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``; ``None`` uses ``training_step``.
        backend: how Hessian-vector products are computed: ``"auto"`` (double backward, falling back to
            forward-over-reverse), ``"double_backward"`` or ``"forward_over_reverse"``.
        strict: raise when an estimate is not finite instead of warning and continuing.
        log: log the scheduled estimates through ``pl_module.log``.
        seed: base seed of the probe vectors.
        quantity: ``"hessian"`` (default): Hutchinson traces of the Hessian. ``"empirical_fisher"`` (opt-in, a
            *different quantity*): the trace of the empirical Fisher ``(1/N) sum_n ||g_n||^2`` per block, from
            per-sample gradients, exact for the captured samples and never negative, at about the cost of one
            backward pass (see :func:`~lightning_depthgrow.curvature.empirical_fisher_trace`; ``num_probes``,
            ``rtol``, ``top_eigen`` and ``backend`` do not apply; its ``stderr`` is over samples). Refused for
            models with BatchNorm in train mode.
        adaptive: (opt-in, needs ``rtol``) once some blocks have reached ``rtol``, probe only the blocks that still
            lag (see :func:`~lightning_depthgrow.curvature.hutchinson_trace`): in the benchmark's real runs,
            per-block traces at 10 % relative standard error in 0.44 ± 0.20 of PyHessian's time on a 4-block ViT
            (default: 1.03 ± 0.17; docs/curvature_estimators.md). Refused in
            ``setup`` under multi-process training (the ranks' phases cannot be pooled).

    Raises:
        ValueError: if an argument is out of its accepted range (``blocks`` names are checked against the
            module in ``setup``).
        TypeError: if ``loss_fn`` is not callable.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
        >>> monitor = CurvatureMonitor(every_n_epochs=2, num_batches=2, num_probes=8)
        >>> trainer = pl.Trainer(max_epochs=4, callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> monitor.latest.trace_per_param  # doctest: +SKIP
        {'model.blocks.0': 0.0123, 'model.blocks.1': 0.0045}
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_batches: int = 1,
        num_probes: int = 8,
        rtol: float | None = None,
        top_eigen: bool = False,
        blocks: Any = None,
        loss_fn: LossFn | None = None,
        backend: str = "auto",
        strict: bool = False,
        log: bool = True,
        seed: int = 0,
        quantity: str = "hessian",
        adaptive: bool = False,
    ) -> None:
        _check_positive_int("every_n_epochs", every_n_epochs)
        _check_positive_int("num_batches", num_batches)
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 2:
            raise ValueError(
                f"`num_probes` must be an int >= 2 (a standard error needs two probes), got {num_probes!r}."
            )
        if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0):
            raise ValueError(f"`rtol` must be None or a positive float, got {rtol!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` must be None (use training_step) or a callable `loss_fn(pl_module, batch) -> Tensor`, "
                f"got {type(loss_fn).__name__}."
            )
        if backend not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}.")
        for name, value in (("top_eigen", top_eigen), ("strict", strict), ("log", log), ("adaptive", adaptive)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        if blocks is not None and (isinstance(blocks, str) or not isinstance(blocks, (Sequence, Mapping))):
            raise ValueError(
                "`blocks` must be None (discover the model's blocks) or a sequence/mapping of blocks as accepted "
                f"by estimate_curvature, got {blocks!r}."
            )

        if quantity not in QUANTITIES:
            raise ValueError(f"`quantity` must be one of {QUANTITIES}, got {quantity!r}.")
        if quantity == "empirical_fisher" and top_eigen:
            raise ValueError(
                "`top_eigen=True` needs the Hessian: eigenvalues are not estimated for quantity='empirical_fisher'."
            )
        if adaptive and (rtol is None or quantity != "hessian"):
            raise ValueError(
                "`adaptive=True` restricts Hutchinson probes to the blocks that have not reached `rtol`: it needs "
                f"`rtol` and quantity='hessian', got rtol={rtol!r}, quantity={quantity!r}."
            )
        self.adaptive = adaptive
        self.quantity = quantity
        self.every_n_epochs = every_n_epochs
        self.num_batches = num_batches
        self.num_probes = num_probes
        self.rtol = rtol
        self.top_eigen = top_eigen
        self.blocks = blocks
        self.loss_fn = loss_fn
        self.backend = backend
        self.strict = strict
        self.log_estimates = log
        self.seed = seed

        self.latest: CurvatureEstimate | None = None
        self.history: list[dict[str, Any]] = []
        # (batch_idx, batch) of the most recent training batches: references only, already on the device.
        self._batches: deque[tuple[int, Any]] = deque(maxlen=num_batches)

    @property
    @override
    def state_key(self) -> str:
        """Key of this monitor's state in a checkpoint; includes its settings so that several monitors can coexist."""
        settings: dict[str, Any] = dict(
            every_n_epochs=self.every_n_epochs,
            num_batches=self.num_batches,
            seed=self.seed,
            loss_fn=getattr(self.loss_fn, "__qualname__", None),
        )
        if self.quantity != "hessian":  # the default leaves the keys of existing checkpoints unchanged
            settings["quantity"] = self.quantity
        return self._generate_state_key(**settings)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Fail at the start of fit, not after a whole epoch: sharded parameters cannot be differentiated
        # block by block on one rank, and a wrong block name is a typo.
        check_strategy_supported(trainer, "CurvatureMonitor")
        if self.adaptive and trainer.world_size > 1:
            raise ValueError(
                "CurvatureMonitor(adaptive=True) cannot run under multi-process training: each rank would choose its "
                "own probe phases, whose different variances the ranks' single SUM all-reduce cannot combine. Use "
                "adaptive=False under DDP (every rank's probes then pool)."
            )
        # Also warns now, not after an epoch, when the model has no registered block structure.
        resolve_blocks(pl_module, self.blocks)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Let go of the captured batches (device memory) once fitting is over.
        self._batches.clear()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Detach so that no autograd graph is kept alive by the reference; no copy, no device move.
        self._batches.append((batch_idx, apply_to_collection(batch, Tensor, Tensor.detach)))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if not self._batches:
            rank_zero_warn(
                f"CurvatureMonitor: no training batch was seen in epoch {trainer.current_epoch}; skipping the "
                "curvature estimate."
            )
            return
        if self.latest is not None and self.history and self.history[-1].get("step") == trainer.global_step:
            # Another callback (DepthGrowth's placement) already estimated at this step, on this epoch's last
            # weights: that estimate is this epoch's, so curvature is not estimated twice in a growth epoch.
            estimate = self.latest
        else:
            estimate = self.estimate_now(trainer, pl_module)
        if self.log_estimates:
            self._log(pl_module, estimate)

    def estimate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CurvatureEstimate:
        """Estimate on the captured batches now, combine across ranks, record it in :attr:`latest` and
        :attr:`history`, and return it.

        A collective call under DDP: every rank must call it. Does not log; the monitor's own scheduled
        estimates are logged from ``on_train_epoch_end``.

        Example::

            >>> monitor = next(c for c in trainer.callbacks if isinstance(c, CurvatureMonitor))  # doctest: +SKIP
            >>> monitor.estimate_now(trainer, pl_module).trace_per_param  # doctest: +SKIP

        Raises:
            RuntimeError: if no training batch has been captured yet.
            CurvatureEstimationError: (a ``RuntimeError``) if ``strict=True`` and the estimate is not finite.
            LossFunctionError: (a ``TypeError``) if ``training_step`` returns something other than a scalar
                loss tensor or a dict with a scalar ``"loss"``.
        """
        if not self._batches:
            raise RuntimeError(
                "CurvatureMonitor.estimate_now needs at least one captured training batch: call it after the "
                "first training step (e.g. from on_train_batch_end or later)."
            )
        if self.loss_fn is None:
            # training_step also wants the batch index: hand it along with each batch.
            loss_fn, batches = _training_step_loss(pl_module), list(self._batches)
        else:
            loss_fn, batches = self.loss_fn, [batch for _, batch in self._batches]
        world_size = trainer.world_size
        seed = self.seed + len(self.history) * world_size + trainer.global_rank

        # estimate_curvature runs in fp32 with autocast off and gradients on, whatever hook calls this. Its own
        # warning about an op without a second derivative is repeated below with the epoch and step.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Curvature estimate marked invalid", category=UserWarning)
            local = self._estimate_local(pl_module, loss_fn, batches, seed)
        estimate = self._combine(trainer, local) if world_size > 1 else local

        if not estimate.valid:
            status = "could not be computed" if estimate.backend == "none" else "is not finite"
            message = (
                f"CurvatureMonitor: the curvature estimate at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step} {status} ({estimate.invalid_reason})."
            )
            if self.strict:
                raise CurvatureEstimationError(
                    message + " Set strict=False to record it as invalid and continue training."
                )
            rank_zero_warn(message + " It is recorded with valid=False; training continues.")
        self.latest = estimate
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **estimate.to_dict()})
        return estimate

    def _estimate_local(
        self, pl_module: pl.LightningModule, loss_fn: LossFn, batches: list[Any], seed: int
    ) -> CurvatureEstimate:
        if self.quantity == "empirical_fisher":
            if self.loss_fn is None:  # per-sample slicing applies to the batch, not to (batch_idx, batch)
                step_loss = loss_fn
                loss_fn, batches = (lambda module, batch: step_loss(module, (0, batch))), [b for _, b in batches]
            return _fisher_estimate(pl_module, loss_fn, batches, self.blocks)
        return estimate_curvature(
            pl_module,
            loss_fn,
            batches,
            blocks=self.blocks,
            num_probes=self.num_probes,
            rtol=self.rtol,
            adaptive=self.adaptive,
            top_eigen=self.top_eigen,
            backend=self.backend,
            seed=seed,
            # Raising on one rank only would leave the others waiting in the all-reduce below: decide on
            # the combined estimate instead, identically on every rank.
            strict=False,
            batch_labels=[f"training batch_idx {i}" for i, _ in self._batches],
        )

    @staticmethod
    def _combine(trainer: pl.Trainer, local: CurvatureEstimate) -> CurvatureEstimate:
        """Every rank's estimate merged into one, by a single SUM all-reduce of the packed numbers."""
        # A fresh tensor on the device the process group communicates from (NCCL needs CUDA tensors).
        packed = local.pack().to(trainer.strategy.root_device)
        summed = trainer.strategy.reduce(packed, reduce_op="sum")
        return CurvatureEstimate.unpack(summed.cpu(), like=local, world_size=trainer.world_size)

    def _log(self, pl_module: pl.LightningModule, estimate: CurvatureEstimate) -> None:
        metrics: dict[str, float] = {}
        per_param = estimate.trace_per_param
        for block, trace in estimate.traces.items():
            metrics[f"curvature/trace/{block}"] = float(trace.mean)
            metrics[f"curvature/trace_stderr/{block}"] = float(trace.stderr)
            metrics[f"curvature/trace_per_param/{block}"] = float(per_param[block])
        for block, eigenvalue in estimate.top_eigenvalues.items():
            metrics[f"curvature/top_eigenvalue/{block}"] = float(eigenvalue)
        # The values are identical on every rank already (see _combine): no sync_dist.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        # A resumed run's readers (DepthGrowth placement) see the last estimate, as the uninterrupted run did.
        self.latest = CurvatureEstimate.from_dict(self.history[-1]) if self.history else None
        if self.history:
            rank_zero_info(f"CurvatureMonitor: restored {len(self.history)} curvature estimate(s) from the checkpoint")


def _fisher_estimate(
    pl_module: pl.LightningModule, loss_fn: LossFn, batches: list[Any], blocks: Any
) -> CurvatureEstimate:
    """The empirical Fisher trace per block as a :class:`CurvatureEstimate` (no eigenvalues)."""
    start = time.perf_counter()
    traces = empirical_fisher_trace(pl_module, loss_fn, batches, blocks=blocks)
    params = dict(pl_module.named_parameters())
    groups = resolve_blocks(pl_module, blocks)
    num_params = {b: sum(params[n].numel() for n in members) for b, members in groups.items()}
    bad = [b for b, t in traces.items() if not all(math.isfinite(v) for v in t.values)]
    reason = f"non-finite per-sample gradients in block(s) {bad}" if bad else ""
    return CurvatureEstimate(traces, num_params, {}, not bad, reason, "empirical_fisher", time.perf_counter() - start)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")


def _training_step_loss(pl_module: pl.LightningModule) -> Callable[[nn.Module, tuple[int, Any]], Tensor]:
    """The loss of ``pl_module.training_step`` on a captured ``(batch_idx, batch)``, with logging muted."""
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            "CurvatureMonitor cannot use training_step as the loss under manual optimization (it would step the "
            "optimizers). Pass `loss_fn=lambda module, batch: ...` returning the scalar loss."
        )

    def loss(module: nn.Module, indexed_batch: tuple[int, Any]) -> Tensor:
        batch_idx, batch = indexed_batch
        with _muted_logging(pl_module):
            output = pl_module.training_step(batch, batch_idx)
        if isinstance(output, Mapping) and "loss" in output:
            output = output["loss"]
        if not isinstance(output, Tensor) or output.numel() != 1:
            raise LossFunctionError(
                "CurvatureMonitor uses training_step's return value as the loss and needs a scalar Tensor or a dict "
                f"with a scalar 'loss', but training_step returned {_describe(output)}. Pass "
                "`loss_fn=lambda module, batch: ...` returning the scalar loss."
            )
        return output.reshape(())

    return loss


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    return repr(value) if value is None else f"a {type(value).__name__}"


@contextlib.contextmanager
def _muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Make ``self.log``/``self.log_dict`` no-ops on this instance only, then restore the class's methods.

    Logging from ``training_step`` while a callback hook runs would record a spurious training metric (or
    fail Lightning's check of which hooks may log per step).
    """
    shadowed = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    pl_module.log = _no_op  # type: ignore[method-assign]
    pl_module.log_dict = _no_op  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in shadowed:
                setattr(pl_module, name, shadowed[name])
            else:
                delattr(pl_module, name)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None
