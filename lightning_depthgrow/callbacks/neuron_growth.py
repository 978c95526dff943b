r"""
NeuronGrowth
^^^^^^^^^^^^

Grow depth per neuron while a model trains (Guna, Chavan & Gupta 2024): the output neurons at the most negative
splitting-matrix eigenvalue get a zero-initialised residual sub-unit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from ..curvature.splitting import splitting_eigenvalues
from ..events import ArchitectureEvent
from ..growth import Budget, BudgetMode, plan_neurons
from ..growth.neurons import NeuronBranch
from ..growth.schedule import growth_schedule
from ..measure import count_parameters
from ..surgery.neuron_branch import BranchedLinear, neuron_branches
from ..validation import check_bool, check_float, check_int
from . import plumbing
from .base import GrowthCallback
from .curvature_monitor import _training_step_loss

LossFn = Callable[[nn.Module, Any], Tensor]


class NeuronGrowth(GrowthCallback):
    r"""Add residual sub-units ``u + gelu(u)`` to the neurons whose splitting matrix has the most negative eigenvalue.

    At the end of every ``grow_every``-th epoch after ``warmup_epochs`` (right after the epoch's last optimizer
    step, before validation and checkpointing), or with ``at=[f, ...]`` right after the optimizer step at each
    fraction ``f`` of training (mid-epoch if that is where it falls: step-based runs of one long epoch), the callback:

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
        warmup_epochs: epochs trained before the first growth step (``0`` is the same as ``1``). Default ``1``;
            not with ``at``.
        grow_every: after warm-up, grow at the end of every ``grow_every``-th epoch. Default ``1``; not with ``at``.
        min_neurons: a layer is grown only if at least this many of its neurons are among the selected ones.
        layers: ``{linear_path: activation_path}`` (dotted names relative to the LightningModule) of the Linears
            to watch and the activation module applied to each one's output; ``None``: every timm ``Mlp.fc1``.
        nest: also watch the branch projections grown so far (deeper nesting).
        num_batches: how many of the most recent training batches the eigenvalues average over.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``; ``None`` uses ``training_step`` (logging muted).
        seed: base seed of the estimator's dropout masks and Lanczos start vectors.
        at: grow after the optimizer steps at these fractions of training (increasing, each in ``(0, 1)``, e.g.
            the paper's 50-of-300-epoch warm-up then every 30 epochs is ``[1/6, 4/15, 11/30, ...]``;
            :class:`~lightning_depthgrow.growth.FractionSchedule`). ``None``: the epoch schedule
            (``warmup_epochs``, ``grow_every``).

    Example:
        >>> import lightning.pytorch as pl
        >>> growth = NeuronGrowth(step_budget=0.02, warmup_epochs=50, grow_every=30, min_neurons=4)
        >>> trainer = pl.Trainer(max_epochs=300, callbacks=[growth])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)  # doctest: +SKIP
        >>> by_step = NeuronGrowth(step_budget=0.05, final_budget=1.25, at=[0.1, 0.2, 0.3, 0.4, 0.5])
        >>> by_step.at, by_step.warmup_epochs
        ((0.1, 0.2, 0.3, 0.4, 0.5), None)
    """

    def __init__(
        self,
        step_budget: float = 0.02,
        final_budget: float | None = None,
        budget_mode: BudgetMode = "relative",
        scale_by_lr: bool = True,
        warmup_epochs: int | None = None,
        grow_every: int | None = None,
        min_neurons: int = 1,
        layers: Mapping[str, str] | None = None,
        nest: bool = True,
        num_batches: int = 1,
        loss_fn: LossFn | None = None,
        seed: int = 0,
        at: Sequence[float] | None = None,
    ) -> None:
        check_float("step_budget", step_budget, low=0.0)
        schedule = growth_schedule(at, warmup_epochs, grow_every)
        super().__init__(Budget(final_budget, step_budget, "params", budget_mode, scale_by_lr), schedule)
        self.min_neurons = check_int("min_neurons", min_neurons, minimum=1)
        self.num_batches = check_int("num_batches", num_batches, minimum=1)
        if layers is not None and (
            not isinstance(layers, Mapping)
            or not layers
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items())
        ):
            raise ValueError(
                "`layers` must be None (every timm Mlp.fc1) or a non-empty {linear_path: activation_path} dict of "
                f"dotted module names relative to the LightningModule, got {layers!r}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be None or a callable loss_fn(pl_module, batch), got {type(loss_fn)}")
        self.nest = check_bool("nest", nest)
        self.seed = check_int("seed", seed)
        self.layers = None if layers is None else dict(layers)
        self.loss_fn = loss_fn
        #: ``{linear_path: [lambda_min per neuron]}`` of the latest estimate (all-reduced), for inspection.
        self.latest: dict[str, list[float]] = {}
        self._watched: dict[str, str] = {}
        self._batches: deque[tuple[int, Any]] = deque(maxlen=num_batches)

    @property
    def start_params(self) -> int | None:
        """The starting model's parameter count (the base of relative budgets); ``None`` before setup."""
        return None if self.start_size is None else int(self.start_size)

    # ------------------------------------------------------------------ base hooks

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise RuntimeError(
                f"{self.name} computes splitting eigenvalues with training_step's loss, which under manual "
                "optimization would step your optimizers. Pass NeuronGrowth(loss_fn=lambda module, batch: "
                "<scalar loss>)."
            )
        self._watched = self._resolve_layers(pl_module)
        costs = {path: _neuron_cost(pl_module.get_submodule(path)) for path in self._watched}
        start = float(self.start_size or 0.0)
        room = self.budget.room(start, start, lr_scale=1.0)
        cheapest = min(costs, key=costs.__getitem__)
        if costs[cheapest] * self.min_neurons > room:
            raise ValueError(
                f"{self.name}: the budget leaves room for {room:,.0f} parameters per step, but a branch of "
                f"min_neurons={self.min_neurons} neuron(s) on the cheapest layer ({cheapest}) costs "
                f"{costs[cheapest] * self.min_neurons:,} parameters: nothing would ever grow. Raise step_budget / "
                "final_budget or lower min_neurons."
            )

    def observe_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # References only (detached: no graph kept alive), already on the device.
        self._batches.append((batch_idx, apply_to_collection(batch, Tensor, Tensor.detach)))

    def propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        return [
            b.to_event(epoch=trainer.current_epoch, step=trainer.global_step) for b in self.plan(trainer, pl_module)
        ]

    def describe(self, event: ArchitectureEvent) -> str:
        reason = event.reason
        return (
            f"branch on {len(event.spec['neurons'])} neuron(s) of {event.spec['linear']} (lambda_min down to "
            f"{min(reason['eigenvalues']):.4g}); parameters {reason['budget_after']:,}"
        )

    def describe_nothing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        return (
            "no neuron with a negative splitting eigenvalue fits the budget (or no layer reached min_neurons); "
            "not growing."
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._batches.clear()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ layers

    def _resolve_layers(self, pl_module: pl.LightningModule) -> dict[str, str]:
        if self.layers is None:
            from timm.layers import Mlp

            found = {
                f"{name}.fc1" if name else "fc1": f"{name}.act" if name else "act"
                for name, m in pl_module.named_modules()
                if type(m) is Mlp and isinstance(m.fc1, nn.Linear)
            }
            if not found:
                conv1d = [name for name, m in pl_module.named_modules() if type(m).__name__ == "Conv1D"]
                hint = (
                    f" Its MLPs use transformers' Conv1D ({conv1d[0]}, ...: Hugging Face GPT-2), a Linear with a "
                    "transposed weight, which cannot grow neuron branches; only plain nn.Linear layers can."
                    if conv1d
                    else ""
                )
                raise ValueError(
                    f"{self.name}: no timm Mlp (fc1 -> act) found in {type(pl_module).__name__}; pass "
                    "layers={'path.to.linear': 'path.to.its.activation'} (names relative to the LightningModule, "
                    f"each an nn.Linear followed by that activation).{hint}"
                )
            return found
        for linear, act in self.layers.items():
            for path in (linear, act):
                try:
                    pl_module.get_submodule(path)
                except AttributeError as err:
                    raise ValueError(f"{self.name}: layers names {path!r}, which is not a module: {err}") from err
            found = type(pl_module.get_submodule(linear))
            if found not in (nn.Linear, BranchedLinear):
                conv1d = (
                    " (transformers' Conv1D, as in Hugging Face GPT-2's MLP, stores the weight transposed: it is not "
                    "an nn.Linear)"
                    if found.__name__ == "Conv1D"
                    else ""
                )
                raise ValueError(
                    f"{self.name}: layers key {linear!r} is a {found.__name__}{conv1d}; only plain nn.Linear layers "
                    "can grow neuron branches. Name nn.Linear layers in `layers`, or grow this model's depth with "
                    "DepthGrowth instead."
                )
        return dict(self.layers)

    def watched_layers(self, pl_module: nn.Module) -> dict[str, str]:
        """``{linear_path: activation_path}`` of every Linear considered now (with ``nest``, grown branches too)."""
        watched = dict(self._watched)
        if self.nest:
            for path in self._watched:
                watched.update(neuron_branches(pl_module, path))
        return watched

    # ------------------------------------------------------------------ estimate and plan

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[float]]:
        """``lambda_min`` of every watched neuron on the captured batches, averaged over ranks (collective call)."""
        if not self._batches:
            raise RuntimeError(f"{self.name}: no training batch has been captured yet; estimate after a training step.")
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
        flat = plumbing.all_reduce_mean(trainer, flat).cpu()
        result, start = {}, 0
        for name in names:
            size = local[name].numel()
            result[name] = flat[start : start + size].tolist()
            start += size
        self.latest = result
        return result

    def plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[NeuronBranch]:
        """The branches of one growth step (:class:`~lightning_depthgrow.growth.NeuronBranch`), computed on every
        rank from all-reduced numbers; :meth:`change_now` applies rank 0's."""
        start, current, lr = float(self.start_size or 0.0), _count(pl_module), plumbing.lr_scale(trainer)
        costs = {path: _neuron_cost(pl_module.get_submodule(path)) for path in self.watched_layers(pl_module)}
        if self.budget.room(start, current, lr) < min(costs.values()):
            # Skip the estimate (several training steps' worth of compute) when not even one neuron fits.
            return []
        eigenvalues = self.estimate(trainer, pl_module)
        return plan_neurons(
            eigenvalues, costs, self.budget, start=start, current=current, lr_scale=lr, min_neurons=self.min_neurons
        )

    def grow_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """Run one growth step now (every rank must call it); returns the events applied."""
        return self.change_now(trainer, pl_module)


def _count(module: nn.Module) -> int:
    return int(count_parameters(module))


def _neuron_cost(linear: nn.Module) -> int:
    """Parameters one branch neuron adds to ``linear``: a row of ``W_A`` and, with a bias, an entry of ``b_A``."""
    return int(linear.in_features) + (1 if getattr(linear, "bias", None) is not None else 0)
