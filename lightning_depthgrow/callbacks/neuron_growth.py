r"""
NeuronGrowth
^^^^^^^^^^^^

Grow depth per neuron while a model trains (Guna, Chavan & Gupta 2024): the output neurons at the most negative
splitting-matrix eigenvalue get a zero-initialised residual sub-unit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from ..curvature.splitting import splitting_eigenvalues
from ..events import ArchitectureEvent
from ..surgery.neuron_branch import BranchedLinear, neuron_branches
from . import _common
from .curvature_monitor import _training_step_loss

BudgetMode = Literal["relative", "absolute"]
LossFn = Callable[[nn.Module, Any], Tensor]
_WHO = "NeuronGrowth"


class NeuronGrowth(Callback):
    r"""Add residual sub-units ``u + gelu(u)`` to the neurons whose splitting matrix has the most negative eigenvalue.

    At the end of every ``grow_every``-th epoch after ``warmup_epochs`` (right after the epoch's last optimizer
    step, before validation and checkpointing), the callback:

    1. computes, for every output neuron of every watched Linear, ``lambda_min`` of its splitting matrix
       (:func:`lightning_depthgrow.curvature.splitting_eigenvalues`) on the last ``num_batches`` training batches,
       on the unwrapped module, in fp32, leaving weights, buffers, gradients, modes and RNG as they were;
    2. averages the numbers over ranks (mean of each rank's ``lambda_min``, one all-reduce);
    3. ranks all neurons with ``lambda_min < 0`` across layers, most negative first, and takes them while their
       parameters fit the step budget (a neuron of a Linear with ``in`` inputs costs ``in`` (+1 with a bias));
    4. keeps the layers with at least ``min_neurons`` selected neurons and gives each of them one branch on its
       selected neurons (:func:`lightning_depthgrow.surgery.neuron_branch.add_neuron_branch`, event kind
       ``"neuron_branch"``), rank 0's plan being broadcast so every rank applies the same change.

    Watched layers are the given ``layers`` (default: every timm ``Mlp``'s ``fc1``, whose output feeds its
    ``act``) and, with ``nest=True``, every branch projection grown inside them, so a sub-unit can be selected
    again and its neurons nest deeper. Optimizers (new parameters join their twin's param group), LR schedulers
    and DDP are brought in line; checkpoints store the event log and resume replays it.

    Args:
        step_budget: the most parameters added per growth step: a fraction of the starting model's parameter
            count (``budget_mode="relative"``, e.g. ``0.02``) or an absolute count.
        final_budget: the most parameters the model may reach (a multiple of the starting count, or absolute);
            ``None``: no limit beyond the per-step budget.
        budget_mode: how ``step_budget`` and ``final_budget`` are read: ``"relative"`` or ``"absolute"``.
        scale_by_lr: scale the step budget by current lr / initial lr of the first param group (the paper's rule:
            growth shrinks along the learning-rate schedule).
        warmup_epochs: epochs trained before the first growth step (``0`` is the same as ``1``).
        grow_every: after warm-up, grow at the end of every ``grow_every``-th epoch.
        min_neurons: a layer is grown only if at least this many of its neurons are among the selected ones.
        layers: ``{linear_path: activation_path}`` (dotted names relative to the LightningModule) of the Linears
            to watch and the activation module applied to each one's output; ``None``: every timm ``Mlp.fc1``.
        nest: also watch the branch projections grown so far (deeper nesting).
        num_batches: how many of the most recent training batches the eigenvalues average over.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``; ``None`` uses ``training_step`` (logging muted).
        seed: base seed of the estimator's dropout masks and Lanczos start vectors.

    Example:
        >>> import lightning.pytorch as pl
        >>> growth = NeuronGrowth(step_budget=0.02, warmup_epochs=50, grow_every=30, min_neurons=4)
        >>> trainer = pl.Trainer(max_epochs=300, callbacks=[growth])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        step_budget: float = 0.02,
        final_budget: float | None = None,
        budget_mode: BudgetMode = "relative",
        scale_by_lr: bool = True,
        warmup_epochs: int = 1,
        grow_every: int = 1,
        min_neurons: int = 1,
        layers: Mapping[str, str] | None = None,
        nest: bool = True,
        num_batches: int = 1,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if budget_mode not in ("relative", "absolute"):
            raise ValueError(f"budget_mode must be 'relative' or 'absolute', got {budget_mode!r}")
        if not _positive_number(step_budget):
            raise ValueError(f"step_budget must be a positive number, got {step_budget!r}")
        if final_budget is not None and not _positive_number(final_budget):
            raise ValueError(f"final_budget must be a positive number or None, got {final_budget!r}")
        if final_budget is not None and budget_mode == "relative" and final_budget < 1.0:
            raise ValueError(
                f"final_budget={final_budget} with budget_mode='relative' is smaller than the starting model (1.0); "
                "growth only adds. Use e.g. final_budget=1.5 for 1.5 times the starting parameter count."
            )
        for name, value, low in (
            ("warmup_epochs", warmup_epochs, 0),
            ("grow_every", grow_every, 1),
            ("min_neurons", min_neurons, 1),
            ("num_batches", num_batches, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if layers is not None and (
            not isinstance(layers, Mapping)
            or not layers
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items())
        ):
            raise ValueError(
                "layers must be None (every timm Mlp.fc1) or a non-empty {linear_path: activation_path} dict of "
                f"dotted module names relative to the LightningModule, got {layers!r}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be None or a callable loss_fn(pl_module, batch), got {type(loss_fn)}")
        for name, value in (("scale_by_lr", scale_by_lr), ("nest", nest)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.step_budget = float(step_budget)
        self.final_budget = None if final_budget is None else float(final_budget)
        self.budget_mode: BudgetMode = budget_mode
        self.scale_by_lr = scale_by_lr
        self.warmup_epochs = warmup_epochs
        self.grow_every = grow_every
        self.min_neurons = min_neurons
        self.layers = None if layers is None else dict(layers)
        self.nest = nest
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.seed = seed
        # Resumable state.
        self.start_params: int | None = None
        self.growth_steps = 0
        self.last_growth_epoch = -1
        #: ``{linear_path: [lambda_min per neuron]}`` of the latest estimate (all-reduced), for inspection.
        self.latest: dict[str, list[float]] = {}
        self._watched: dict[str, str] = {}
        self._batches: deque[tuple[int, Any]] = deque(maxlen=num_batches)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not _common.setup_for_fit(trainer, pl_module, stage, _WHO):
            return
        if self.start_params is None:
            # Before a resumed checkpoint's events are replayed: relative budgets refer to the starting model.
            self.start_params = _count(pl_module)
        _common.restore_architecture(trainer, pl_module)
        self._watched = self._resolve_layers(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # References only (detached: no graph kept alive), already on the device.
        self._batches.append((batch_idx, apply_to_collection(batch, Tensor, Tensor.detach)))
        if _common.is_last_training_batch(trainer, batch_idx) and self._is_growth_epoch(trainer):
            self.grow_now(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        _common.save_event_log(checkpoint, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._batches.clear()
        _common.guard_spawn_results(trainer, pl_module, _WHO)

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_params": self.start_params,
            "growth_steps": self.growth_steps,
            "last_growth_epoch": self.last_growth_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_params = state_dict["start_params"]
        self.growth_steps = int(state_dict["growth_steps"])
        self.last_growth_epoch = int(state_dict["last_growth_epoch"])

    # ------------------------------------------------------------------ schedule, layers, budget

    def _is_growth_epoch(self, trainer: pl.Trainer) -> bool:
        return _common.is_growth_epoch(trainer, self.warmup_epochs, self.grow_every, self.last_growth_epoch)

    def _resolve_layers(self, pl_module: pl.LightningModule) -> dict[str, str]:
        if self.layers is None:
            from timm.layers import Mlp

            found = {
                f"{name}.fc1" if name else "fc1": f"{name}.act" if name else "act"
                for name, m in pl_module.named_modules()
                if type(m) is Mlp and isinstance(m.fc1, nn.Linear)
            }
            if not found:
                raise ValueError(
                    f"{_WHO}: no timm Mlp (fc1 -> act) found in {type(pl_module).__name__}; pass "
                    "layers={'path.to.linear': 'path.to.its.activation'} (names relative to the LightningModule)."
                )
            return found
        for linear, act in self.layers.items():
            for path in (linear, act):
                try:
                    pl_module.get_submodule(path)
                except AttributeError as err:
                    raise ValueError(f"{_WHO}: layers names {path!r}, which is not a module: {err}") from err
            found = type(pl_module.get_submodule(linear))
            if found not in (nn.Linear, BranchedLinear):
                raise ValueError(
                    f"{_WHO}: layers key {linear!r} is a {found.__name__}; only plain nn.Linear layers can grow "
                    "neuron branches."
                )
        return dict(self.layers)

    def watched_layers(self, pl_module: nn.Module) -> dict[str, str]:
        """``{linear_path: activation_path}`` of every Linear considered now (with ``nest``, grown branches too)."""
        watched = dict(self._watched)
        if self.nest:
            for path in self._watched:
                watched.update(neuron_branches(pl_module, path))
        return watched

    def _step_limit(self, trainer: pl.Trainer) -> tuple[float, float]:
        """``(parameters allowed this step, lr scale)``."""
        base = self.step_budget if self.budget_mode == "absolute" else self.step_budget * float(self.start_params or 0)
        scale = _common.lr_scale(trainer) if self.scale_by_lr else 1.0
        return base * scale, scale

    def _final_limit(self) -> float:
        if self.final_budget is None:
            return math.inf
        if self.budget_mode == "absolute":
            return self.final_budget
        return self.final_budget * float(self.start_params or 0)

    # ------------------------------------------------------------------ estimate and plan

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[float]]:
        """``lambda_min`` of every watched neuron on the captured batches, averaged over ranks (collective call)."""
        if not self._batches:
            raise RuntimeError(f"{_WHO}: no training batch has been captured yet; estimate after a training step.")
        watched = self.watched_layers(pl_module)
        if self.loss_fn is None:
            loss_fn, batches = _training_step_loss(pl_module), list(self._batches)
        else:
            loss_fn, batches = self.loss_fn, [batch for _, batch in self._batches]
        local = splitting_eigenvalues(
            pl_module,
            loss_fn,
            batches,
            layers={path: (path, act) for path, act in watched.items()},
            seed=self.seed + self.growth_steps,
        )
        # Every rank holds the same architecture, so the same layer order and sizes: one flat all-reduce.
        names = list(watched)
        flat = torch.cat([local[n].float().reshape(-1) for n in names]).to(trainer.strategy.root_device)
        flat = _common.all_reduce_mean(trainer, flat).cpu()
        result, start = {}, 0
        for name in names:
            size = local[name].numel()
            result[name] = flat[start : start + size].tolist()
            start += size
        self.latest = result
        return result

    def plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """The branches of one growth step: ``[{"linear", "neurons", "params", "reason"}, ...]`` (JSON types).

        Computed on every rank from all-reduced numbers; :meth:`grow_now` uses rank 0's.
        """
        current = _count(pl_module)
        step_limit, lr_scale = self._step_limit(trainer)
        final_limit = self._final_limit()
        room = min(step_limit, final_limit - current)
        watched = self.watched_layers(pl_module)
        costs = {path: _neuron_cost(pl_module.get_submodule(path)) for path in watched}
        if room < min(costs.values()):
            # Skip the estimate (several training steps' worth of compute) when not even one neuron fits.
            return []
        eigenvalues = self.estimate(trainer, pl_module)
        order = {path: k for k, path in enumerate(watched)}
        negative = sorted(
            (
                (value, path, i)
                for path, values in eigenvalues.items()
                for i, value in enumerate(values)
                if math.isfinite(value) and value < 0
            ),
            key=lambda e: (e[0], order[e[1]], e[2]),
        )
        selected: dict[str, list[int]] = {}
        used = 0
        for _, path, i in negative:
            if used + costs[path] <= room:
                selected.setdefault(path, []).append(i)
                used += costs[path]
        qualified = {path: sorted(idx) for path, idx in selected.items() if len(idx) >= self.min_neurons}
        threshold = max((eigenvalues[p][i] for p, idx in qualified.items() for i in idx), default=None)
        plans, added = [], 0
        for path in sorted(qualified, key=order.__getitem__):
            neurons = qualified[path]
            params = costs[path] * len(neurons)
            values = eigenvalues[path]
            reason = {
                "criterion": "splitting_min_eigenvalue",
                "linear": path,
                "eigenvalues": [values[i] for i in neurons],
                "layer_min_eigenvalue": min(values),
                "layer_negative": sum(v < 0 for v in values),
                "threshold": threshold,
                "min_neurons": self.min_neurons,
                "budget_before": current + added,
                "budget_after": current + added + params,
                "step_limit": step_limit,
                "final_limit": None if math.isinf(final_limit) else final_limit,
                "lr_scale": lr_scale,
            }
            added += params
            plans.append({"linear": path, "neurons": neurons, "params": params, "reason": reason})
        return plans

    # ------------------------------------------------------------------ growth

    def grow_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """Run one growth step now (every rank must call it); returns the events applied."""
        plans = _common.broadcast(trainer, self.plan(trainer, pl_module))
        self.last_growth_epoch = trainer.current_epoch
        if not plans:
            rank_zero_info(
                f"{_WHO}: epoch {trainer.current_epoch}: no neuron with a negative splitting eigenvalue fits the "
                "budget (or no layer reached min_neurons); not growing."
            )
            return []
        events = []
        for plan in plans:
            event = ArchitectureEvent(
                "neuron_branch",
                {"linear": plan["linear"], "neurons": plan["neurons"]},
                epoch=trainer.current_epoch,
                step=trainer.global_step,
                reason=plan["reason"],
            )
            start = time.perf_counter()
            _common.apply_and_sync(trainer, pl_module, event)
            event.cost = {"params": plan["params"], "seconds": time.perf_counter() - start}
            events.append(event)
            rank_zero_info(
                f"{_WHO}: epoch {trainer.current_epoch}: branch on {len(plan['neurons'])} neuron(s) of "
                f"{plan['linear']} (lambda_min down to {min(plan['reason']['eigenvalues']):.4g}); parameters "
                f"{plan['reason']['budget_after']:,}"
            )
        self.growth_steps += 1
        return events


def _count(module: nn.Module) -> int:
    from ..measure import count_parameters

    return int(count_parameters(module))


def _neuron_cost(linear: nn.Module) -> int:
    """Parameters one branch neuron adds to ``linear``: a row of ``W_A`` and, with a bias, an entry of ``b_A``."""
    return int(linear.in_features) + (1 if getattr(linear, "bias", None) is not None else 0)


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
