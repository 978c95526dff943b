"""Grow a model's depth while it trains: insert identity-initialised residual blocks on a schedule.

The callback only decides *when* and *where*; the surgery is :func:`lightning_depthgrow.surgery.growth.
insert_identity_block`, applied through the ``"insert_block"`` event kind so that a checkpoint's event log
replays the same change on resume and in :func:`lightning_depthgrow.load_grown`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..adapters.registry import BlockStack, find_block_stacks, get_stack, require_block_stacks
from ..events import ArchitectureEvent
from . import _common

Placement = Literal["curvature", "uniform", "last"]
BudgetMetric = Literal["params", "flops"]
BudgetMode = Literal["relative", "absolute"]
_WHO = "DepthGrowth"
_SCORE_NAMES = {"curvature": "trace_per_param", "uniform": "segment_crowding", "last": "depth_ratio"}


@dataclass
class _Candidate:
    """One possible insertion: a new block right after block ``after`` of stack ``stack``."""

    stack: str
    after: int
    score: float  # reported in the event: trace per parameter, or the depth/crowding a baseline minimises
    key: tuple[float, ...]  # ascending sort key: best candidate first
    cost: float
    params: int
    flops: int

    @property
    def block(self) -> str:
        return f"{self.stack}.{self.after}" if self.stack else str(self.after)


class DepthGrowth(Callback):
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
            on ``example_input``, default ``pl_module.example_input_array``).
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
        monitor: the :class:`~lightning_depthgrow.callbacks.curvature_monitor.CurvatureMonitor` to estimate
            curvature with. ``None``: the one in ``trainer.callbacks`` if any, else one built by this callback
            with default settings. A monitor given here but not put in ``trainer.callbacks`` is private: this
            callback feeds it batches and saves its state (e.g. ``CurvatureMonitor(num_probes=4, log=False)``
            for cheaper estimates). Only used with ``placement="curvature"``.
        example_input: input for FLOP counting; default ``pl_module.example_input_array``.
        seed: base seed of the new blocks' initialisation (the event of step ``k`` uses ``seed + k``-derived
            seeds, so every rank and every replay builds identical blocks).

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
        monitor: Callback | None = None,
        example_input: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if budget_metric not in ("params", "flops"):
            raise ValueError(f"budget_metric must be 'params' or 'flops', got {budget_metric!r}")
        if budget_mode not in ("relative", "absolute"):
            raise ValueError(f"budget_mode must be 'relative' or 'absolute', got {budget_mode!r}")
        if placement not in ("curvature", "uniform", "last"):
            raise ValueError(f"placement must be 'curvature', 'uniform' or 'last', got {placement!r}")
        if not isinstance(final_budget, (int, float)) or not math.isfinite(final_budget) or final_budget <= 0:
            raise ValueError(f"final_budget must be a positive number, got {final_budget!r}")
        if budget_mode == "relative" and final_budget < 1.0:
            raise ValueError(
                f"final_budget={final_budget} with budget_mode='relative' is smaller than the starting model "
                "(1.0); growth only adds blocks. Use e.g. final_budget=2.0 for twice the starting size."
            )
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if not isinstance(grow_every, int) or grow_every < 1:
            raise ValueError(f"grow_every must be an int >= 1, got {grow_every!r}")
        if blocks_per_step is not None and (not isinstance(blocks_per_step, int) or blocks_per_step < 1):
            raise ValueError(f"blocks_per_step must be an int >= 1 or None, got {blocks_per_step!r}")
        if step_budget is not None and (not isinstance(step_budget, (int, float)) or step_budget <= 0):
            raise ValueError(f"step_budget must be a positive number or None, got {step_budget!r}")
        if blocks_per_step is None and step_budget is None:
            raise ValueError("Give blocks_per_step, step_budget or both; else one step could take the whole budget.")
        if scale_by_lr and step_budget is None:
            raise ValueError("scale_by_lr=True scales step_budget by the learning rate; set step_budget too.")
        if max_per_stack is not None and (not isinstance(max_per_stack, int) or max_per_stack < 1):
            raise ValueError(f"max_per_stack must be an int >= 1 or None, got {max_per_stack!r}")
        if monitor is not None and not hasattr(monitor, "estimate_now"):
            raise TypeError(f"monitor must be a CurvatureMonitor (with estimate_now), got {type(monitor).__name__}")
        self.final_budget = float(final_budget)
        self.budget_metric: BudgetMetric = budget_metric
        self.budget_mode: BudgetMode = budget_mode
        self.warmup_epochs = warmup_epochs
        self.grow_every = grow_every
        self.blocks_per_step = blocks_per_step
        self.step_budget = None if step_budget is None else float(step_budget)
        self.scale_by_lr = scale_by_lr
        self.placement: Placement = placement
        self.max_per_stack = max_per_stack
        self.monitor = monitor
        self.example_input = example_input
        self.seed = seed
        # Resumable state: the starting size (the base of relative budgets) and what has been done so far.
        self.start_size: float | None = None
        self.growth_steps = 0
        self.last_growth_epoch = -1
        self._own_monitor: Callback | None = None

    @property
    def curvature_monitor(self) -> Callback | None:
        """The monitor this callback drives itself (given as ``monitor=`` or built here, not in
        ``trainer.callbacks``), so that ``ArchitectureLogger`` records its estimates too; else ``None``."""
        return self._own_monitor

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not _common.setup_for_fit(trainer, pl_module, stage, _WHO):
            return
        if self.start_size is None:
            # Measured before a resumed checkpoint's events are replayed: relative budgets refer to the start.
            self.start_size = float(self._size(pl_module))
        _common.restore_architecture(trainer, pl_module)
        stacks = require_block_stacks(pl_module)
        if not any(s.growable_positions() for s in stacks):
            raise ValueError(
                f"{_WHO}: the block stacks {[(s.path, len(s)) for s in stacks]} contain no shape-preserving block "
                "to copy, so no identity block can be inserted. Register an adapter whose is_shape_preserving "
                "accepts at least one block per stack."
            )
        current, limit = self._size(pl_module), self.final_limit()
        if limit < current:
            raise ValueError(
                f"{_WHO}: final_budget gives a limit of {limit:,.0f} {self.budget_metric}, below the model's "
                f"current {current:,.0f}; growth only adds. Raise final_budget (budget_mode={self.budget_mode!r})."
            )
        if self.placement == "curvature":
            # A monitor outside trainer.callbacks (given or built here) is driven by this callback.
            monitor = self._find_monitor(trainer)
            in_trainer = monitor is not None and any(cb is monitor for cb in trainer.callbacks)
            self._own_monitor = None if in_trainer else monitor or self._make_monitor()
            if self._own_monitor is not None:
                self._own_monitor.setup(trainer, pl_module, stage)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._own_monitor is not None:
            self._own_monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Grow after the last optimizer step of the epoch but before validation and checkpointing: Lightning
        # resumes a checkpoint saved at the epoch's end in the next epoch, so growth must already be in it.
        if _common.is_last_training_batch(trainer, batch_idx) and self._is_growth_epoch(trainer):
            self.grow_now(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        _common.save_event_log(checkpoint, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _common.guard_spawn_results(trainer, pl_module, "DepthGrowth")

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_size": self.start_size,
            "growth_steps": self.growth_steps,
            "last_growth_epoch": self.last_growth_epoch,
            # The private monitor's history seeds its probes: restoring it keeps resumed placements identical.
            "monitor": self._own_monitor.state_dict() if self._own_monitor is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs after setup, so the private monitor (if any) already exists.
        self.start_size = state_dict["start_size"]
        self.growth_steps = int(state_dict["growth_steps"])
        self.last_growth_epoch = int(state_dict["last_growth_epoch"])
        if self._own_monitor is not None and state_dict.get("monitor") is not None:
            self._own_monitor.load_state_dict(state_dict["monitor"])

    # ------------------------------------------------------------------ schedule and budget

    def _is_growth_epoch(self, trainer: pl.Trainer) -> bool:
        return _common.is_growth_epoch(trainer, self.warmup_epochs, self.grow_every, self.last_growth_epoch)

    def final_limit(self) -> float:
        """The final budget as an absolute count of ``budget_metric``."""
        if self.budget_mode == "absolute":
            return self.final_budget
        if self.start_size is None:
            raise RuntimeError(f"{_WHO}: the starting size is only known after setup.")
        return self.final_budget * self.start_size

    def _step_limit(self, trainer: pl.Trainer) -> tuple[float, float]:
        """``(size allowed this step, lr scale)``; ``inf`` when only ``blocks_per_step`` limits a step."""
        if self.step_budget is None:
            return math.inf, 1.0
        base = self.step_budget if self.budget_mode == "absolute" else self.step_budget * float(self.start_size or 0)
        scale = _common.lr_scale(trainer) if self.scale_by_lr else 1.0
        return base * scale, scale

    def _example_input(self, pl_module: pl.LightningModule) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            raise ValueError(
                f"{_WHO}(budget_metric='flops') needs an example input: set pl_module.example_input_array or pass "
                "example_input=..."
            )
        return example.to(pl_module.device) if isinstance(example, torch.Tensor) else example

    def _size(self, pl_module: pl.LightningModule) -> float:
        from ..measure import count_flops, count_parameters

        if self.budget_metric == "params":
            return float(count_parameters(pl_module))
        return float(count_flops(pl_module, self._example_input(pl_module)).total)

    def _block_costs(self, pl_module: pl.LightningModule, stacks: list[BlockStack]) -> dict[str, tuple[int, int]]:
        """``{block_name: (params, flops)}`` of every block (FLOPs 0 when there is no example input)."""
        from ..measure import block_costs, count_parameters

        flops: dict[str, Any] = {}
        if self.budget_metric == "flops" or self.example_input is not None or pl_module.example_input_array is not None:
            flops = block_costs(pl_module, self._example_input(pl_module))
        costs = {}
        for stack in stacks:
            for i, block in enumerate(stack.blocks):
                name = stack.block_name(i)
                costs[name] = (int(count_parameters(block)), int(flops.get(name, {}).get("flops", 0)))
        return costs

    def _any_block_fits(self, pl_module: pl.LightningModule, stacks: list[BlockStack], room: float) -> bool:
        """Whether the cheapest possible insertion (its template block's size) fits in ``room``."""
        costs = self._block_costs(pl_module, stacks)
        metric_index = 0 if self.budget_metric == "params" else 1
        templates = {s.block_name(s.template_index(near=i)) for s in stacks for i in s.growable_positions()}
        cheapest = min((costs[name][metric_index] for name in templates), default=math.inf)
        return cheapest <= room

    # ------------------------------------------------------------------ placement

    def _find_monitor(self, trainer: pl.Trainer) -> Callback | None:
        if self.monitor is not None:
            return self.monitor
        for cb in trainer.callbacks:
            if hasattr(cb, "estimate_now") and hasattr(cb, "latest"):
                return cb
        return None

    @staticmethod
    def _make_monitor() -> Callback:
        from .curvature_monitor import CurvatureMonitor

        return CurvatureMonitor(log=False)

    def _curvature(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Hessian trace per parameter of every block, identical on all ranks (the monitor all-reduces)."""
        monitor = self._own_monitor or self._find_monitor(trainer)
        if monitor is None:
            raise RuntimeError(f"{_WHO}: placement='curvature' needs a CurvatureMonitor; none was found.")
        # Always estimate now: placement must reflect the weights being grown, not an estimate from epochs ago.
        estimate = monitor.estimate_now(trainer, pl_module)
        if estimate is None or not getattr(estimate, "valid", True):
            return {}
        return {str(k): float(v) for k, v in estimate.trace_per_param.items()}

    def _candidates(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stacks: list[BlockStack]
    ) -> list[_Candidate]:
        """Every insertion position, best first for the chosen placement."""
        costs = self._block_costs(pl_module, stacks)
        metric_index = 0 if self.budget_metric == "params" else 1
        curvature = self._curvature(trainer, pl_module) if self.placement == "curvature" else {}
        origins = _inserted_after_origin(pl_module, stacks)
        candidates = []
        for stack in stacks:
            depth_ratio = len(stack) / max(1, sum(origins[stack.path]))
            for i in stack.growable_positions():
                template = stack.template_index(near=i)
                params, flops = costs[stack.block_name(template)]
                if self.placement == "curvature":
                    score = curvature.get(stack.block_name(i), float("nan"))
                    key: tuple[float, ...] = (-score,)
                elif self.placement == "uniform":
                    # The shallowest stack (relative to its start) first, then the least crowded segment.
                    score = _crowding(origins[stack.path], i)
                    key = (depth_ratio, score)
                else:
                    score = depth_ratio if i == len(stack) - 1 else float("nan")
                    key = (depth_ratio,)
                cost = (params, flops)[metric_index]
                candidates.append(_Candidate(stack.path, i, score, key, cost, params, flops))
        if self.placement == "curvature" and not any(math.isfinite(c.score) for c in candidates):
            raise RuntimeError(
                f"{_WHO}: the curvature estimate has no finite value for any block "
                f"{[c.block for c in candidates][:8]}; check the CurvatureMonitor's block names and batches."
            )
        ranked = [c for c in candidates if math.isfinite(c.score)]
        # Stable sort: ties keep module order, so the plan is deterministic.
        return sorted(ranked, key=lambda c: c.key)

    def plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """The insertions of one growth step (computed on every rank, rank 0's plan is used).

        Returns a list of JSON-able dicts ``{"stack", "after", "reason", "params", "flops"}`` in the order
        they are to be applied.
        """
        stacks = [s for s in find_block_stacks(pl_module) if s.growable_positions()]
        used, limit = self._size(pl_module), self.final_limit()
        step_limit, lr_scale = self._step_limit(trainer)
        if not self._any_block_fits(pl_module, stacks, min(limit - used, step_limit)):
            # Skip the curvature estimate (several training steps' worth of compute) once the budget is used:
            # it would be spent every remaining growth epoch only to add nothing.
            return []
        ranked = self._candidates(trainer, pl_module, stacks)
        chosen: list[_Candidate] = []
        per_stack: dict[str, int] = {}
        step_used = 0.0
        for cand in ranked:
            if self.blocks_per_step is not None and len(chosen) >= self.blocks_per_step:
                break
            if self.max_per_stack is not None and per_stack.get(cand.stack, 0) >= self.max_per_stack:
                continue
            if used + step_used + cand.cost > limit or step_used + cand.cost > step_limit:
                continue
            chosen.append(cand)
            per_stack[cand.stack] = per_stack.get(cand.stack, 0) + 1
            step_used += cand.cost
        plans = []
        added = 0.0
        for cand in chosen:
            added += cand.cost
            runners_up = [{"block": c.block, "score": c.score} for c in ranked if c not in chosen][:3]
            reason = {
                "placement": self.placement,
                "block": cand.block,
                "score": cand.score,
                "score_name": _SCORE_NAMES[self.placement],
                "runners_up": runners_up,
                "budget_metric": self.budget_metric,
                "budget_before": used + added - cand.cost,
                "budget_after": used + added,
                "budget_limit": limit,
                "budget_left": limit - used - added,
                "step_limit": None if math.isinf(step_limit) else step_limit,
                "lr_scale": lr_scale,
            }
            plans.append(
                {"stack": cand.stack, "after": cand.after, "params": cand.params, "flops": cand.flops, "reason": reason}
            )
        # Apply deepest positions first inside a stack: an insertion never shifts the indices before it.
        return sorted(plans, key=lambda p: (p["stack"], -p["after"]))

    # ------------------------------------------------------------------ growth

    def grow_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """Run one growth step now (every rank must call it); returns the events applied."""
        plans = _common.broadcast(trainer, self.plan(trainer, pl_module))
        self.last_growth_epoch = trainer.current_epoch
        if not plans:
            step_limit, lr_scale = self._step_limit(trainer)
            step = "" if math.isinf(step_limit) else f", step limit {step_limit:,.0f} (lr scale {lr_scale:.3g})"
            rank_zero_info(
                f"{_WHO}: epoch {trainer.current_epoch}: no block fits ({self._size(pl_module):,.0f} of "
                f"{self.final_limit():,.0f} {self.budget_metric} used{step}); not growing."
            )
            return []
        events = []
        for k, plan in enumerate(plans):
            stack = get_stack(pl_module, plan["stack"])
            spec = {
                "stack": plan["stack"],
                "index": plan["after"],
                "template": stack.template_index(near=plan["after"]),
                "seed": self.seed * 1_000_003 + self.growth_steps * 1_009 + k,
            }
            event = ArchitectureEvent(
                "insert_block", spec, epoch=trainer.current_epoch, step=trainer.global_step, reason=plan["reason"]
            )
            start = time.perf_counter()
            _common.apply_and_sync(trainer, pl_module, event)
            event.cost = {"params": plan["params"], "flops": plan["flops"], "seconds": time.perf_counter() - start}
            events.append(event)
            reason = plan["reason"]
            runners_up = ", ".join(f"{r['block']} {r['score']:.4g}" for r in reason["runners_up"]) or "none"
            rank_zero_info(
                f"{_WHO}: epoch {trainer.current_epoch}: inserted a block after {reason['block']} "
                f"({reason['score_name']} {reason['score']:.4g}; runners-up {runners_up}); "
                f"{self.budget_metric} {reason['budget_after']:,.0f} / {reason['budget_limit']:,.0f}"
            )
        self.growth_steps += 1
        return events


def _inserted_after_origin(pl_module: torch.nn.Module, stacks: list[BlockStack]) -> dict[str, list[bool]]:
    """Per stack, whether each current block is one of the stack's starting blocks (``True``) or was inserted.

    Derived from the module's event log, so it survives resume. Stacks changed by events other than
    insertions (e.g. DMS export) are treated as all-original.
    """
    flags = {}
    log = [e for e in _common.event_log(pl_module) if e.kind == "insert_block"]
    for stack in stacks:
        inserts = [e.spec["index"] for e in log if e.spec.get("stack") == stack.path]
        row = [True] * (len(stack) - len(inserts))
        try:
            for index in inserts:
                if not 0 <= index < len(row):
                    raise IndexError(index)
                row.insert(index + 1, False)
        except IndexError:
            row = [True] * len(stack)
        flags[stack.path] = row if len(row) == len(stack) else [True] * len(stack)
    return flags


def _crowding(origin: list[bool], after: int) -> float:
    """How many inserted blocks already follow the starting block that block ``after`` belongs to.

    Inserting into the least crowded segment spreads new depth evenly between the starting blocks;
    ties favour the segment whose insertion point is farthest from the previous inserted block.
    """
    start = after
    while start > 0 and not origin[start]:
        start -= 1
    end = start + 1
    while end < len(origin) and not origin[end]:
        end += 1
    inserted = end - start - 1
    return inserted + (0.5 if after != end - 1 else 0.0)
