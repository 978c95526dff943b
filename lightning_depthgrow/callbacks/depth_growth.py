"""Grow a model's depth while it trains: insert identity-initialised residual blocks on a schedule.

The callback only gathers the numbers (block costs, curvature) and decides *when*; *where* is decided by the
pure planner :func:`lightning_depthgrow.growth.plan_depth`, and the surgery is the ``"insert_block"`` event kind
(:func:`lightning_depthgrow.surgery.growth.insert_identity_block`), so a checkpoint's event log replays the same
change on resume and in :func:`lightning_depthgrow.load_grown`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation, rank_zero_warn

from ..adapters.registry import UnsupportedModelError, require_block_stacks
from ..events import ArchitectureEvent, apply_event
from ..growth import BlockCost, Budget, BudgetMetric, BudgetMode, Placement, Schedule, StackLayout
from ..growth.depth import PLACEMENTS, fits_any_insertion, plan_depth, stack_layouts
from ..measure import block_costs, count_flops, count_parameters, first_sample
from ..surgery.growth import FunctionNotPreservedError, check_growable, remove_block, verify_insertions
from ..validation import check_choice, check_int, check_optional
from . import plumbing
from .base import GrowthCallback
from .curvature_monitor import CurvatureMonitor


class DepthGrowth(GrowthCallback):
    """Insert function-preserving residual blocks during training until a parameter/FLOP budget is reached.

    Growth happens right after the optimizer step of the last training batch of a growth epoch, i.e. before
    that epoch's validation and checkpoint, so a checkpoint always holds the architecture its weights
    belong to. Each growth step adds up to ``blocks_per_step`` blocks (or as many as fit ``step_budget``),
    never more than ``max_per_stack`` per block stack, and never beyond ``final_budget``.

    Args:
        final_budget: the size at which growth stops: a multiple of the starting model's size
            (``budget_mode="relative"``, e.g. ``2.0``) or an absolute count (``budget_mode="absolute"``).
            A block is only added if the model still fits afterwards.
        budget_metric: ``"params"`` (parameters of the whole LightningModule) or ``"flops"`` (forward FLOPs
            per sample, counted on the first sample of ``example_input``, default ``pl_module.example_input_array``).
        budget_mode: how ``final_budget`` and ``step_budget`` are read: ``"relative"`` to the starting size,
            or ``"absolute"`` counts.
        warmup_epochs: epochs trained before the first growth step (the first growth happens at the end of
            epoch ``warmup_epochs``; ``0`` is the same as ``1``).
        grow_every: after warm-up, grow at the end of every ``grow_every``-th epoch.
        blocks_per_step: the most blocks added per growth step (``None``: no count limit, only
            ``step_budget``).
        step_budget: the most size added per growth step (relative or absolute like ``final_budget``);
            ``None``: no size limit per step.
        scale_by_lr: scale ``step_budget`` by the current lr / the initial lr of the first param group
            (the paper's rule: growth shrinks along the learning-rate schedule). Needs ``step_budget``.
        placement: ``"curvature"`` inserts after the blocks with the highest Hessian trace per parameter;
            ``"uniform"`` keeps depth as even as possible (across stacks and between the starting blocks);
            ``"last"`` appends at the end of each stack. The latter two are baselines.
        max_per_stack: the most blocks added to one stack in one growth step (``None``: no limit).
        curvature_monitor: the :class:`~lightning_depthgrow.callbacks.curvature_monitor.CurvatureMonitor` to
            estimate curvature with. ``None``: the one in ``trainer.callbacks`` if any, else one built by this
            callback with default settings. A monitor given here but not put in ``trainer.callbacks`` is private:
            this callback feeds it batches and saves its state (e.g. ``CurvatureMonitor(num_probes=4, log=False)``
            for cheaper estimates). Only used with ``placement="curvature"``.
        example_input: input for FLOP counting and for verifying insertions; default
            ``pl_module.example_input_array``. With an example input, setup makes one verified trial insertion per
            stack (:func:`~lightning_depthgrow.surgery.check_growable`, undone again) and every growth step is
            verified on it (:func:`~lightning_depthgrow.surgery.verify_insertions`): a step whose insertions would
            change the model's outputs, or leave a block that does not run, is refused with
            :class:`~lightning_depthgrow.surgery.FunctionNotPreservedError` and the module and optimizers are left
            exactly as they were. Without one, only the adapters' structural checks run.
        seed: base seed of the new blocks' initialisation (the event of step ``k`` uses ``seed + k``-derived
            seeds, so every rank and every replay builds identical blocks).
        monitor: deprecated name of ``curvature_monitor`` (``monitor`` reads as a metric key elsewhere in
            Lightning); removed in the next release.

    Example:
        >>> import lightning.pytorch as pl
        >>> growth = DepthGrowth(final_budget=2.0, warmup_epochs=1, grow_every=1, placement="curvature")
        >>> trainer = pl.Trainer(max_epochs=6, callbacks=[growth])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        final_budget: float = 2.0,
        budget_metric: BudgetMetric = "params",
        budget_mode: BudgetMode = "relative",
        warmup_epochs: int = 1,
        grow_every: int = 1,
        blocks_per_step: int | None = 1,
        step_budget: float | None = None,
        scale_by_lr: bool = False,
        placement: Placement = "curvature",
        max_per_stack: int | None = 1,
        curvature_monitor: CurvatureMonitor | None = None,
        example_input: torch.Tensor | None = None,
        seed: int = 0,
        monitor: CurvatureMonitor | None = None,
    ) -> None:
        if final_budget is None:
            raise TypeError(
                "`final_budget` must be a positive number (a multiple of the start, or absolute), got None."
            )
        super().__init__(
            Budget(final_budget, step_budget, budget_metric, budget_mode, scale_by_lr),
            Schedule(warmup_epochs, grow_every),
        )
        self.blocks_per_step = check_optional(blocks_per_step, check_int, "blocks_per_step", minimum=1)
        self.max_per_stack = check_optional(max_per_stack, check_int, "max_per_stack", minimum=1)
        if blocks_per_step is None and step_budget is None:
            raise ValueError("Give blocks_per_step, step_budget or both; else one step could take the whole budget.")
        self.placement: Placement = check_choice("placement", placement, PLACEMENTS)
        if monitor is not None:
            rank_zero_deprecation(
                "DepthGrowth(monitor=...) is deprecated and will be removed in the next release: use "
                "DepthGrowth(curvature_monitor=...) (Lightning reads `monitor` as a metric key)."
            )
            if curvature_monitor is not None and curvature_monitor is not monitor:
                raise ValueError("Give the CurvatureMonitor once, as curvature_monitor=..., not also as monitor=.")
            curvature_monitor = monitor
        if curvature_monitor is not None and not isinstance(curvature_monitor, CurvatureMonitor):
            raise TypeError(
                f"`curvature_monitor` must be a CurvatureMonitor or None, got {type(curvature_monitor).__name__}."
            )
        self.example_input = example_input
        self.seed = check_int("seed", seed)
        self._given_monitor = curvature_monitor
        self._monitor: CurvatureMonitor | None = None  # the monitor in use, found or built in setup
        self._drives_monitor = False  # True when it is not in trainer.callbacks: we feed it and save its state
        self._growable: set[str] | None = None  # paths of the stacks check_growable accepted in setup

    @property
    def curvature_monitor(self) -> CurvatureMonitor | None:
        """The monitor placement uses (given, found in ``trainer.callbacks`` or built in ``setup``), else ``None``.

        ``ArchitectureLogger`` reads it to record the estimates of a monitor this callback drives privately.
        """
        return self._monitor if self._monitor is not None else self._given_monitor

    # ------------------------------------------------------------------ base hooks

    def measure(self, pl_module: pl.LightningModule) -> float:
        if self.budget.metric == "params":
            return float(count_parameters(pl_module))
        return float(count_flops(pl_module, self._example_input(pl_module)).total)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stacks = require_block_stacks(pl_module)
        self._growable = self._check_growable(pl_module)
        layouts = self._layouts(pl_module)
        if not layouts:
            raise ValueError(
                f"{self.name}: the block stacks {[(s.path, len(s)) for s in stacks]} contain no shape-preserving "
                "block to copy, so no identity block can be inserted. Register an adapter whose "
                "is_shape_preserving accepts at least one block per stack."
            )
        current, limit = self.measure(pl_module), self.final_limit()
        if limit < current:
            raise ValueError(
                f"{self.name}: final_budget gives a limit of {limit:,.0f} {self.budget.metric}, below the model's "
                f"current {current:,.0f}; growth only adds. Raise final_budget (budget_mode={self.budget.mode!r})."
            )
        self._check_some_block_fits(pl_module, layouts)
        if self.placement == "curvature":
            self._setup_monitor(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.events_so_far(pl_module):
            _check_groups_not_per_block(trainer, pl_module, self.name, self._layouts(pl_module))

    def change_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any = None
    ) -> list[ArchitectureEvent]:
        with self._verifying(pl_module):
            return super().change_now(trainer, pl_module, outputs)

    def verify_events(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, events: list[ArchitectureEvent]
    ) -> None:
        """Try a step of several insertions on the module, verified, and undo it again before applying it.

        Each insertion is verified (and undone on failure) when it is applied; trying the whole step first means
        a refused later insertion cannot leave an earlier one applied with the optimizers already synced.
        """
        inserts = [e for e in events if e.kind == "insert_block"]
        if len(inserts) < 2 or self._verification_input(pl_module) is None:
            return
        applied: list[ArchitectureEvent] = []
        try:
            for event in inserts:
                apply_event(pl_module, event)
                applied.append(event)
        finally:
            for event in reversed(applied):
                remove_block(pl_module, event.spec["stack"], int(event.spec["index"]) + 1)

    def observe_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._drives_monitor:
            self._monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        events = []
        for k, insertion in enumerate(self.plan(trainer, pl_module)):
            seed = self.seed * 1_000_003 + self.growth_steps * 1_009 + k
            events.append(insertion.to_event(seed, epoch=trainer.current_epoch, step=trainer.global_step))
        return events

    def describe(self, event: ArchitectureEvent) -> str:
        reason = event.reason
        runners_up = ", ".join(f"{r['block']} {r['score']:.4g}" for r in reason["runners_up"]) or "none"
        return (
            f"inserted a block after {reason['block']} ({reason['score_name']} {reason['score']:.4g}; runners-up "
            f"{runners_up}); {reason['budget_metric']} {reason['budget_after']:,.0f} / {reason['budget_limit']:,.0f}"
        )

    def describe_nothing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        step_limit = self.budget.step_limit(self.start_size or 0.0, plumbing.lr_scale(trainer))
        scale = self.budget.lr_factor(plumbing.lr_scale(trainer))
        step = "" if math.isinf(step_limit) else f", step limit {step_limit:,.0f} (lr scale {scale:.3g})"
        return (
            f"no block fits ({self.measure(pl_module):,.0f} of {self.final_limit():,.0f} {self.budget.metric} "
            f"used{step}); not growing."
        )

    def extra_state(self) -> dict[str, Any]:
        # The private monitor's history seeds its probes: restoring it keeps resumed placements identical.
        return {"monitor": self._monitor.state_dict() if self._drives_monitor else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self._drives_monitor and state.get("monitor") is not None:
            self._monitor.load_state_dict(state["monitor"])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._drives_monitor:
            self._monitor.teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------ budget

    def final_limit(self) -> float:
        """The final budget as an absolute count of ``budget_metric``."""
        if self.start_size is None and self.budget.mode == "relative":
            raise RuntimeError(f"{self.name}: the starting size is only known after setup.")
        return self.budget.final_limit(self.start_size or 0.0)

    def _verification_input(self, pl_module: pl.LightningModule) -> Any:
        """The input insertions are verified on: ``example_input``, else ``pl_module.example_input_array``."""
        return self.example_input if self.example_input is not None else pl_module.example_input_array

    @contextlib.contextmanager
    def _verifying(self, pl_module: pl.LightningModule) -> Iterator[None]:
        example = self._verification_input(pl_module)
        with verify_insertions(example) if example is not None else contextlib.nullcontext():
            yield

    def _check_growable(self, pl_module: pl.LightningModule) -> set[str]:
        """Paths of the stacks that can grow (:func:`~lightning_depthgrow.surgery.check_growable`); raise if none.

        The structural checks (the adapters' refusals: post-LayerNorm blocks, a non-ReLU activation after the
        residual add, no shape-preserving block, ...) run first; with an example input, one verified trial
        insertion per stack follows (undone again).
        """
        try:
            verdicts = check_growable(pl_module)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{self.name}: {err}") from err
        example = self._verification_input(pl_module)
        if example is not None:
            try:
                verdicts = check_growable(pl_module, example)
            except UnsupportedModelError as err:
                raise FunctionNotPreservedError(
                    f"{self.name}: a trial insertion on the example input failed for every stack, the module is "
                    f"unchanged. {err}"
                ) from err
        refused = {path: reason for path, reason in verdicts.items() if reason is not None}
        if refused:
            rank_zero_warn(
                f"{self.name}: not growing block stack(s) {sorted(refused)}: "
                + " ".join(str(reason) for reason in refused.values())
            )
        return {path for path, reason in verdicts.items() if reason is None}

    def _layouts(self, pl_module: pl.LightningModule, events: Any = ()) -> list[StackLayout]:
        """The layouts of the stacks that may grow (those ``setup`` found growable)."""
        layouts = stack_layouts(pl_module, events)
        if self._growable is None:
            return layouts
        return [layout for layout in layouts if layout.path in self._growable]

    def _example_input(self, pl_module: pl.LightningModule) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            raise ValueError(
                f"{self.name}(budget_metric='flops') needs an example input: set pl_module.example_input_array or "
                "pass example_input=..."
            )
        if isinstance(example, torch.Tensor):
            example = example.to(pl_module.device)
        return first_sample(example)

    def _block_costs(self, pl_module: pl.LightningModule, layouts: list[StackLayout]) -> dict[str, BlockCost]:
        """``{block_name: BlockCost}`` of every block of the growable stacks (FLOPs 0 without an example input)."""
        flops: dict[str, Any] = {}
        if self.budget.metric == "flops" or self.example_input is not None or pl_module.example_input_array is not None:
            flops = block_costs(pl_module, self._example_input(pl_module))
        costs = {}
        for layout in layouts:
            stack = pl_module.get_submodule(layout.path) if layout.path else pl_module
            for i, block in enumerate(stack.children()):
                name = layout.block_name(i)
                costs[name] = BlockCost(int(count_parameters(block)), int(flops.get(name, {}).get("flops", 0)))
        return costs

    def _check_some_block_fits(self, pl_module: pl.LightningModule, layouts: list[StackLayout]) -> None:
        """Refuse a budget in which not even the smallest block would ever fit (growth would silently never run)."""
        costs = self._block_costs(pl_module, layouts)
        metric = self.budget.metric
        templates = {layout.block_name(t) for layout in layouts for t in layout.templates}
        smallest = min(templates, key=lambda name: costs[name].of(metric))
        size = costs[smallest].of(metric)
        start = float(self.start_size or 0.0)
        room = self.budget.room(start, start, lr_scale=1.0)
        if size > room:
            need = (
                f"final_budget >= {(start + size) / start:.4g}"
                if self.budget.mode == "relative"
                else (f"final_budget >= {start + size:,.0f}")
            )
            raise ValueError(
                f"{self.name}: the budget leaves room for {room:,.0f} {metric} of growth, but the smallest block "
                f"that could be inserted ({smallest}) has {size:,.0f} {metric}: no block would ever be added. "
                f"Raise the budget ({need}, and step_budget to at least that block's size if set)."
            )

    # ------------------------------------------------------------------ placement

    def _setup_monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        in_trainer = [cb for cb in trainer.callbacks if isinstance(cb, CurvatureMonitor)]
        monitor = self._given_monitor or (in_trainer[0] if in_trainer else None)
        self._drives_monitor = monitor is None or all(cb is not monitor for cb in trainer.callbacks)
        self._monitor = monitor if monitor is not None else CurvatureMonitor(log=False)
        if not pl_module.automatic_optimization and self._monitor.loss_fn is None:
            raise RuntimeError(
                f"{self.name}(placement='curvature') estimates curvature with training_step's loss, which under "
                "manual optimization would step your optimizers. Pass curvature_monitor=CurvatureMonitor(loss_fn="
                "lambda module, batch: <scalar loss>, log=False), or use placement='uniform'."
            )
        if self._drives_monitor:
            self._monitor.setup(trainer, pl_module, "fit")

    def _curvature(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, layouts: list[StackLayout]
    ) -> dict[str, float] | None:
        """Hessian trace per parameter of every block, identical on all ranks (the monitor all-reduces); ``None``
        (with a warning naming the cause) when the estimate is not valid.

        A monitor in ``trainer.callbacks`` that estimated at the end of the previous epoch, on the architecture
        the model has now, already measured the weights this epoch started from: its estimate is reused, so a
        growth epoch costs one estimate, not two (issue 9.20). Otherwise (a private monitor, the first epoch, an
        architecture changed since) the monitor estimates now, on the weights being grown.
        """
        monitor = self._monitor
        estimate = monitor.latest if self._monitor_estimate_is_current(trainer, layouts) else None
        if estimate is None:
            estimate = monitor.estimate_now(trainer, pl_module)
        if not estimate.valid:
            rank_zero_warn(
                f"{self.name}: the curvature estimate at epoch {trainer.current_epoch} is not valid "
                f"({estimate.invalid_reason or 'no reason given'}); this growth step places blocks uniformly "
                "instead of by curvature."
            )
            return None
        return {str(k): float(v) for k, v in estimate.trace_per_param.items()}

    def _monitor_estimate_is_current(self, trainer: pl.Trainer, layouts: list[StackLayout]) -> bool:
        monitor = self._monitor
        previous = trainer.current_epoch - 1
        if self._drives_monitor or monitor.latest is None or not monitor.history or previous < 0:
            return False
        if monitor.history[-1].get("epoch") != previous or (previous + 1) % monitor.every_n_epochs:
            return False
        names = set(monitor.latest.trace_per_param)
        for layout in layouts:
            head = f"{layout.path}.{layout.key_prefix}" if layout.path else layout.key_prefix
            held = {n for n in names if n.startswith(head) and n[len(head) :].isdigit()}
            if held != {layout.block_name(i) for i in range(layout.depth)}:
                return False
        return True

    def plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """The insertions of one growth step (:class:`~lightning_depthgrow.growth.Insertion`, in apply order),
        computed on every rank; :meth:`change_now` applies rank 0's."""
        layouts = self._layouts(pl_module, self.events_so_far(pl_module))
        costs = self._block_costs(pl_module, layouts)
        start, current, lr = float(self.start_size or 0.0), self.measure(pl_module), plumbing.lr_scale(trainer)
        kwargs = dict(
            start=start,
            current=current,
            placement=self.placement,
            lr_scale=lr,
            blocks_per_step=self.blocks_per_step,
            max_per_stack=self.max_per_stack,
        )
        if not fits_any_insertion(layouts, costs, self.budget.metric, self.budget.room(start, current, lr)):
            # Nothing fits: skip the curvature estimate (several training steps' worth of compute).
            return []
        scores = self._curvature(trainer, pl_module, layouts) if self.placement == "curvature" else None
        if self.placement == "curvature" and scores is None:
            kwargs["placement"] = "uniform"  # an invalid estimate (an op without a second derivative): fall back
        try:
            return plan_depth(layouts, costs, self.budget, scores=scores, **kwargs)
        except ValueError as err:
            raise RuntimeError(
                f"{self.name}: {err} The curvature estimate was not valid; check the CurvatureMonitor's warnings "
                "(a loss that is not finite, an operation without a second derivative) and its block names."
            ) from err

    def grow_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """Run one growth step now (every rank must call it); returns the events applied."""
        return self.change_now(trainer, pl_module)


def _check_groups_not_per_block(
    trainer: pl.Trainer, pl_module: pl.LightningModule, who: str, layouts: list[StackLayout]
) -> None:
    """Refuse optimizers whose param groups are built per block (e.g. layer-wise LR decay), before training.

    A grown block joins its template's group, so ``configure_optimizers`` on the grown model (what a resumed run
    calls) builds more groups than the checkpoint's optimizer has, and resume fails with the module already grown.
    """
    for optimizer in trainer.optimizers:
        group_of = {id(p): k for k, group in enumerate(optimizer.param_groups) for p in group["params"]}
        for layout in layouts:
            stack = pl_module.get_submodule(layout.path) if layout.path else pl_module
            groups = [{group_of[id(p)] for p in block.parameters() if id(p) in group_of} for block in stack.children()]
            groups = [g for g in groups if g]
            if len(groups) >= 2 and all(a.isdisjoint(b) for i, a in enumerate(groups) for b in groups[i + 1 :]):
                raise RuntimeError(
                    f"{who}: configure_optimizers gives every block of {layout.path!r} param groups of its own "
                    f"({len(optimizer.param_groups)} groups; e.g. layer-wise LR decay). A grown block joins its "
                    "template's group, so a resumed run, whose configure_optimizers sees the grown model, would build "
                    "more groups than the checkpoint's optimizer has and could not resume. Build groups by a property "
                    "growth keeps (decay / no-decay, parameter type), not one per block; set per-block learning rates "
                    "with an LR scheduler or after growth instead."
                )
