"""The base of every callback that changes a model's architecture while it trains.

A subclass says *what* to change (:meth:`ArchitectureCallback.propose`, a list of
:class:`~lightning_depthgrow.ArchitectureEvent`) and *when* (a :class:`~lightning_depthgrow.growth.Schedule` by
epoch, a :class:`~lightning_depthgrow.growth.FractionSchedule` by fraction of the optimizer steps, or its own
:meth:`~ArchitectureCallback.is_due`); the base owns everything else, once: preflight checks, replaying a
checkpoint's architecture on resume, the starting size, rank 0's proposal broadcast to every rank, applying each
event with optimizers, LR schedulers and DDP brought in line, timing, the checkpoint's event log, resumable
counters and teardown (nothing stays on the user's module).
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..events import ArchitectureEvent, event_log, save_event_log
from ..growth import Budget, FractionSchedule, Schedule
from . import plumbing


class ArchitectureCallback(Callback):
    """Change the architecture during ``fit``: subclasses implement :meth:`propose`, the base does the rest.

    At the end of the last training batch of every epoch the :attr:`schedule` (or :meth:`is_due`) names (after
    its optimizer step, before validation and checkpointing, so a checkpoint always holds the architecture its
    weights belong to), :meth:`change_now` runs: it checks that the training loss is finite on every rank, calls
    :meth:`propose` on every rank (collective estimates may run inside), uses rank 0's events, applies each with
    :func:`~lightning_depthgrow.callbacks.plumbing.apply_and_sync` and records its wall time in
    ``event.cost["seconds"]``. With ``change_at = "epoch_start"`` the step runs at the start of the epochs
    :meth:`is_due` names instead (after the previous epoch's validation and checkpoints). Subclasses may call
    :meth:`change_now` from any other hook.

    With a :class:`~lightning_depthgrow.growth.FractionSchedule` (or ``change_at = "optimizer_step"``) the step
    runs at the end of the training batch whose optimizer step is due (after that step; batches that only
    accumulate gradients never change anything), before any checkpoint of that step is saved.

    Args:
        schedule: when to change: a :class:`~lightning_depthgrow.growth.Schedule` (by epoch), a
            :class:`~lightning_depthgrow.growth.FractionSchedule` (after the optimizer steps at fractions of
            training) or ``None`` (only when the subclass calls :meth:`change_now` itself, or its own
            :meth:`is_due` says so).

    Example: a callback that appends one identity block to every stack at the end of epoch 2::

        from lightning_depthgrow.callbacks.base import ArchitectureCallback
        from lightning_depthgrow.growth import Schedule, stack_layouts

        class AppendBlock(ArchitectureCallback):
            def __init__(self):
                super().__init__(Schedule(warmup_epochs=3, every=1000))

            def propose(self, trainer, pl_module):
                return [
                    ArchitectureEvent("insert_block", {"stack": s.path, "index": s.depth - 1,
                                                       "template": s.templates[-1], "seed": 0})
                    for s in stack_layouts(pl_module)
                ]
    """

    #: When a due change runs: ``"epoch_end"`` (default: at the end of the last training batch of every epoch
    #: :meth:`is_due` names, after its optimizer step, before validation and checkpointing) or ``"epoch_start"``
    #: (in ``on_train_epoch_start`` of every epoch :meth:`is_due` names, i.e. after the previous epoch's validation
    #: and checkpointing; the finite-loss check then has no loss to look at) or ``"optimizer_step"`` (at the end
    #: of every training batch that made an optimizer step :meth:`is_due` names). A
    #: :class:`~lightning_depthgrow.growth.FractionSchedule` always runs after optimizer steps.
    change_at: ClassVar[str] = "epoch_end"

    #: Whether this callback must refuse to run while a DMS search has gates on the module (growth callbacks:
    #: DMS gates are tracked by position, so a block inserted during the search would be sliced wrongly).
    refuse_during_dms_search: ClassVar[bool] = True

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__()
        if self.change_at not in ("epoch_end", "epoch_start", "optimizer_step"):
            raise ValueError(
                f"{self.name}.change_at must be 'epoch_end' or 'epoch_start' (or 'optimizer_step'), got "
                f"{self.change_at!r}."
            )
        if schedule is not None and not isinstance(schedule, (Schedule, FractionSchedule)):
            raise TypeError(
                "`schedule` must be a lightning_depthgrow.growth.Schedule, a FractionSchedule or None, got "
                f"{schedule!r}."
            )
        self.schedule = schedule
        # Resumable: the starting size (the base of relative budgets) and how many changes were made when.
        self.start_size: float | None = None
        self.growth_steps = 0
        self.last_growth_epoch = -1
        self.last_growth_step = -1
        # trainer.global_step at the previous training batch end (from on_train_start): an optimizer step happened
        # on a batch iff global_step moved since; not saved, a resumed run starts from the checkpoint's step.
        self._seen_step: int | None = None
        self._previous_step = -1  # global_step before the optimizer step(s) of the current batch

    @property
    def name(self) -> str:
        """The name used in messages (the class name)."""
        return type(self).__name__

    # ------------------------------------------------------------------ what a subclass says

    def propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """The events of one change step, computed on every rank (rank 0's are applied everywhere)."""
        raise NotImplementedError(f"{self.name} must implement propose(trainer, pl_module).")

    def measure(self, pl_module: pl.LightningModule) -> float:
        """The size relative budgets refer to, measured once before a resumed checkpoint's events are replayed."""
        from ..measure import count_parameters

        return float(count_parameters(pl_module))

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Subclass preflight at the start of ``fit``, after the base's checks: raise to refuse before training."""

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called in ``setup`` for ``fit`` after the base's preflight, before the resume replay hook is registered
        (a resumed checkpoint's architecture is not on the module yet): refuse, or plan on a copy, here."""

    def on_setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at the end of ``setup`` for ``fit``, after :meth:`check`: put what the search or change needs on
        the module here (e.g. DMS attaches its gates). Take it off again in ``teardown``/``on_exception``."""

    def observe_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Called on every training batch end, before a scheduled change (e.g. to keep recent batches)."""

    def describe(self, event: ArchitectureEvent) -> str:
        """One line for the log after ``event`` was applied."""
        return f"applied {event.kind} {event.spec}"

    def describe_nothing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """One line for the log when :meth:`propose` returned no event."""
        return "nothing to change"

    @property
    def trigger(self) -> str:
        """When :meth:`is_due` is asked: ``"optimizer_step"`` with a
        :class:`~lightning_depthgrow.growth.FractionSchedule`, else :attr:`change_at`."""
        return "optimizer_step" if isinstance(self.schedule, FractionSchedule) else self.change_at

    def is_due(self, trainer: pl.Trainer) -> bool:
        """Whether to change now (default: the schedule says so). Asked once per epoch, at its last training batch
        (``change_at = "epoch_end"``) or at its start (``"epoch_start"``), or at the end of every training batch
        that made an optimizer step (:attr:`trigger` ``"optimizer_step"``; the optimizer steps made on this batch
        are ``(self._previous_step, trainer.global_step]``)."""
        if self.schedule is None:
            return False
        if isinstance(self.schedule, FractionSchedule):
            total = trainer.estimated_stepping_batches
            return self.schedule.is_due(self._previous_step, trainer.global_step, total)
        return self.schedule.is_due(trainer.current_epoch, trainer.max_epochs, self.last_growth_epoch)

    def verify_events(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, events: list[ArchitectureEvent]
    ) -> None:
        """Called on every rank with the step's events before any is applied; raise to refuse the whole step.

        An event that fails while it is applied leaves the module as it was, but the events before it in the
        same step would stay applied (and the optimizers synced): a subclass that can check a step as a whole
        (e.g. a trial application undone again) does it here, so a refused step changes nothing.
        """

    def extra_state(self) -> dict[str, Any]:
        """More resumable state of a subclass (plain data), saved next to the base's."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ------------------------------------------------------------------ the machinery

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not plumbing.setup_for_fit(trainer, pl_module, stage, self.name):
            return
        if self.refuse_during_dms_search:
            plumbing.check_no_dms_search(trainer, pl_module, self)
        if self.start_size is None:
            self.start_size = float(self.measure(pl_module))
        self.prepare(trainer, pl_module)
        plumbing.restore_architecture(trainer, pl_module)
        self.check(trainer, pl_module)
        self.on_setup_fit(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        if isinstance(self.schedule, FractionSchedule):
            # Refuse a run without a known length before its first step; say which fractions cannot grow.
            total = self.schedule.check_total(trainer.estimated_stepping_batches)
            dropped = self.schedule.dropped(total)
            if dropped:
                rank_zero_warn(
                    f"{self.name}: this run has {total} optimizer steps, so fraction(s) {dropped} of at="
                    f"{list(self.schedule.at)} fall before step 1, on the last step or on an earlier fraction's "
                    f"step, and add no growth step; growth happens after steps {list(self.schedule.steps(total))}."
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trigger == "epoch_start" and self.is_due(trainer):
            self.change_now(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = self._seen_step is None or trainer.global_step != self._seen_step
        self._previous_step = trainer.global_step - 1 if self._seen_step is None else self._seen_step
        self._seen_step = trainer.global_step
        self.observe_batch(trainer, pl_module, outputs, batch, batch_idx)
        if self.trigger == "optimizer_step":
            due = stepped and self.is_due(trainer)
        else:
            due = self.trigger == "epoch_end" and plumbing.is_last_training_batch(trainer, batch_idx)
            due = due and self.is_due(trainer)
        if due:
            self.change_now(trainer, pl_module, outputs)

    def change_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any = None
    ) -> list[ArchitectureEvent]:
        """Run one change step now (a collective call: every rank must call it); returns the events applied.

        ``outputs`` is what ``training_step`` returned for the batch just trained; a loss that is not finite on
        any rank stops the step with a warning (a diverged model is not grown).
        """
        self.last_growth_epoch = trainer.current_epoch
        self.last_growth_step = trainer.global_step
        loss = _finite_check(trainer, outputs)
        if not math.isfinite(loss):
            rank_zero_warn(
                f"{self.name}: the training loss is not finite ({loss}) at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}; not changing the architecture of a diverged model. Lower the learning rate "
                "or clip gradients (Trainer(gradient_clip_val=...)) and train again."
            )
            return []
        events = plumbing.broadcast(trainer, self.propose(trainer, pl_module))
        if not events:
            rank_zero_info(f"{self.name}: {_when(trainer)}: {self.describe_nothing(trainer, pl_module)}")
            return []
        self.verify_events(trainer, pl_module, events)
        for event in events:
            start = time.perf_counter()
            plumbing.apply_and_sync(trainer, pl_module, event)
            event.cost["seconds"] = time.perf_counter() - start
            rank_zero_info(f"{self.name}: {_when(trainer)}: {self.describe(event)}")
        self.growth_steps += 1
        return events

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_event_log(checkpoint, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        plumbing.release_module(pl_module)
        if stage == "fit":
            plumbing.guard_spawn_results(trainer, pl_module, self.name)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        plumbing.release_module(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_size": self.start_size,
            "growth_steps": self.growth_steps,
            "last_growth_epoch": self.last_growth_epoch,
            "last_growth_step": self.last_growth_step,
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs after setup. "start_params" is how NeuronGrowth 0.1 named the starting size; checkpoints of callbacks
        # that were not yet on this base (DifferentiableModelScaling 0.1) have no counters.
        start = state_dict.get("start_size", state_dict.get("start_params"))
        self.start_size = None if start is None else float(start)
        self.growth_steps = int(state_dict.get("growth_steps", 0))
        self.last_growth_epoch = int(state_dict.get("last_growth_epoch", -1))
        self.last_growth_step = int(state_dict.get("last_growth_step", -1))
        self.load_extra_state(state_dict)

    # ------------------------------------------------------------------ helpers for subclasses

    def events_so_far(self, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """The module's event log (every change so far, by any callback)."""
        return event_log(pl_module)


class GrowthCallback(ArchitectureCallback):
    """An :class:`ArchitectureCallback` that grows within a :class:`~lightning_depthgrow.growth.Budget` on a
    :class:`~lightning_depthgrow.growth.Schedule` (the shared part of ``DepthGrowth`` and ``NeuronGrowth``)."""

    def __init__(self, budget: Budget, schedule: Schedule) -> None:
        super().__init__(schedule)
        self.budget = budget

    # Read-only views of the budget and schedule, under the callbacks' argument names.
    final_budget = property(lambda self: self.budget.final)
    step_budget = property(lambda self: self.budget.step)
    budget_metric = property(lambda self: self.budget.metric)
    budget_mode = property(lambda self: self.budget.mode)
    scale_by_lr = property(lambda self: self.budget.scale_by_lr)
    # ``None`` for a FractionSchedule (``at``), and ``at`` is ``None`` for an epoch Schedule.
    warmup_epochs = property(lambda self: getattr(self.schedule, "warmup_epochs", None))
    grow_every = property(lambda self: getattr(self.schedule, "every", None))
    at = property(lambda self: getattr(self.schedule, "at", None))


def _when(trainer: pl.Trainer) -> str:
    """``"epoch E, step S"`` for log lines (S: optimizer steps made so far)."""
    return f"epoch {trainer.current_epoch}, step {trainer.global_step}"


def _finite_check(trainer: pl.Trainer, outputs: Any) -> float:
    """The training loss in ``outputs`` averaged over ranks (NaN if any rank's is not finite); 0 if there is none.

    Every rank contributes a number, so the all-reduce is matched even where one rank has no loss.
    """
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    value = loss.detach().float().reshape(-1)[:1].sum() if isinstance(loss, Tensor) and loss.numel() else None
    local = (
        torch.zeros((), device=trainer.strategy.root_device)
        if value is None
        else value.to(trainer.strategy.root_device)
    )
    return float(plumbing.all_reduce_mean(trainer, local))
