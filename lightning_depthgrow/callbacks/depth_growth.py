"""Grow a model's depth while it trains: insert identity-initialised, copied or stacked residual blocks on a schedule.

The callback only gathers the numbers (block costs, curvature) and decides *when*; *where* is decided by the
pure planner :func:`lightning_depthgrow.growth.plan_depth`, and the surgery is the ``"insert_block"`` event kind
(:func:`lightning_depthgrow.surgery.growth.insert_identity_block`), so a checkpoint's event log replays the same
change on resume and in :func:`lightning_depthgrow.load_grown`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation, rank_zero_warn

from ..adapters.registry import UnsupportedModelError, find_block_stacks, require_block_stacks
from ..events import ArchitectureEvent, apply_event
from ..growth import BlockCost, Budget, BudgetMetric, BudgetMode, FractionSchedule, Placement, StackLayout
from ..growth.depth import PLACEMENTS, fits_any_insertion, plan_depth, stack_layouts
from ..growth.schedule import growth_schedule
from ..measure import block_costs, count_flops, count_parameters, first_sample
from ..surgery.growth import (
    DEFAULT_TOLERANCE,
    RAMP_REMEDY,
    FunctionNotPreservedError,
    _Check,
    _find_stack,
    _run,
    _verify,
    check_growable,
    remove_block,
    verify_insertions,
)
from ..surgery.operators import OPTIMIZER_STATES  # (importing it registers the operators' event kinds)
from ..surgery.ramp import advance_ramps, ramped_blocks
from ..validation import check_choice, check_int, check_name, check_optional
from . import plumbing
from .base import GrowthCallback
from .curvature_monitor import CurvatureMonitor

#: The growth operators of :class:`DepthGrowth` (``operator=``).
OPERATORS = ("zero_init", "copy", "stack")
#: The optimizer state of copied blocks (``optimizer_state=``): fresh, or copied from the source block.
OptimizerState = Literal["fresh", "copy"]

# The defaults: the recipe the byte-level LM benchmark found best (README "Depth growth", docs/growth.md): G_stack,
# every stack made 3x deeper once, after a third of training, the copies ramped in over 12% of the run (180 of 1,500
# steps; 60 steps was worse, 300 no better). A relative budget of 3.0 always fits a 3x stacking (the blocks are part
# of the model), so the default never refuses for lack of budget and never grows past 3x the starting size.
#: ``operator`` when none is given.
DEFAULT_OPERATOR = "stack"
#: ``at`` when neither ``at`` nor ``warmup_epochs``/``grow_every`` is given.
DEFAULT_AT = (1 / 3,)
#: ``factor`` of ``operator="stack"`` when none is given.
DEFAULT_FACTOR = 3
#: ``ramp_steps`` of ``"copy"``/``"stack"`` when none is given: this fraction of the run's optimizer steps.
DEFAULT_RAMP_FRACTION = 0.12
#: ``final_budget`` when none is given (relative: 3x the starting size).
DEFAULT_FINAL_BUDGET = 3.0
# The arguments of the paper's per-block recipe (DepthGrowth.paper) and their defaults there and in DepthGrowth.
_PAPER_ARGUMENTS = {
    "warmup_epochs": None,
    "grow_every": None,
    "blocks_per_step": 1,
    "step_budget": None,
    "scale_by_lr": False,
    "max_per_stack": 1,
    "placement": "uniform",
}


class DepthGrowth(GrowthCallback):
    """Grow a model's depth during training, function-preserving, until a parameter/FLOP budget is reached.

    **Defaults** (since 0.7; the recipe the benchmarks found best, ``docs/growth.md``): ``DepthGrowth()`` is G_stack.
    After a third of the run's optimizer steps (``at=[1/3]``) every growable block stack is made 3 times deeper
    (``operator="stack"``, ``factor=3``: ``[b0, b1] -> [b0, b1, b0', b1', b0'', b1'']``), the copies ramping in over
    12% of the run (``ramp_steps=0.12``), within 3x the starting parameters (``final_budget=3.0``). On the byte-level
    LM it ended 0.040 ± 0.017 nats/byte below a fixed model of the final size (better in every seed) where
    zero-initialised blocks ended 0.045 above it. The step is verified on an input the model is called with: the
    ``example_input``, ``pl_module.example_input_array``, or else the inputs of the module's latest forward call
    during ``fit`` (recorded by a forward pre-hook that ``fit``'s end removes), so a module without an example input
    grows too, as long as ``training_step`` calls the module itself (``self(x)``).

    **The paper's recipe** (zero-initialised blocks, a warm-up then growth every N epochs, a per-step budget that can
    shrink with the learning rate) is one preset, :meth:`DepthGrowth.paper` (the defaults before 0.7). Its
    arguments (``warmup_epochs``, ``grow_every``, ``blocks_per_step``, ``step_budget``, ``scale_by_lr``,
    ``max_per_stack``, ``placement``) without an ``operator`` are refused with a message naming the preset, rather
    than silently applied to G_stack, where most of them do not apply.

    *When*: with ``at=[f, ...]``, right after the optimizer step at each fraction ``f`` of the training's optimizer
    steps (``Trainer.estimated_stepping_batches``: ``max_steps``, or ``max_epochs`` x optimizer steps per epoch;
    :class:`~lightning_depthgrow.growth.FractionSchedule`), mid-epoch if that is where it falls; otherwise (the
    epoch preset, :class:`~lightning_depthgrow.growth.Schedule`) right after the optimizer step of the last training
    batch of a growth epoch. Either way growth comes before that step's validation and checkpoints, so a checkpoint
    always holds the architecture its weights belong to. Each growth step adds up to ``blocks_per_step`` blocks (or
    as many as fit ``step_budget``), never more than ``max_per_stack`` per block stack, and never beyond
    ``final_budget``; with ``operator="stack"`` it makes every growable stack ``factor`` times deeper.

    Args:
        final_budget: the size at which growth stops: a multiple of the starting model's size
            (``budget_mode="relative"``, default ``3.0``) or an absolute count (``budget_mode="absolute"``).
            A block (or a stack's stacking) is only added if the model still fits afterwards.
        budget_metric: ``"params"`` (parameters of the whole LightningModule) or ``"flops"`` (forward FLOPs
            per sample, counted on the first sample of ``example_input``, default ``pl_module.example_input_array``).
        budget_mode: how ``final_budget`` and ``step_budget`` are read: ``"relative"`` to the starting size,
            or ``"absolute"`` counts.
        warmup_epochs: epochs trained before the first growth step (the first growth happens at the end of
            epoch ``warmup_epochs``; ``0`` is the same as ``1``). Giving it (or ``grow_every``) selects the epoch
            schedule (``None`` then reads as ``1``); not with ``at``.
        grow_every: after warm-up, grow at the end of every ``grow_every``-th epoch. Not with ``at``.
        blocks_per_step: the most blocks added per growth step (``None``: no count limit, only
            ``step_budget``). One block per insertion position (after each growable block) and at most
            ``max_per_stack`` per stack: a value above what the starting model can take in one step is refused in
            setup (use ``operator="stack"`` with ``factor`` to multiply depth in one step, or more growth steps).
        step_budget: the most size added per growth step (relative or absolute like ``final_budget``);
            ``None``: no size limit per step.
        scale_by_lr: scale ``step_budget`` by the current lr / the initial lr of the first param group
            (the paper's rule: growth shrinks along the learning-rate schedule). Needs ``step_budget``.
        placement: ``"uniform"`` (the default) keeps depth as even as possible (across stacks and between the
            starting blocks); ``"curvature"`` inserts after the blocks with the highest Hessian trace per parameter;
            ``"last"`` appends at the end of each stack. Uniform is the default because curvature placement did not
            beat it in either benchmark (``docs/growth.md``: MNIST-1D, and ramped copies on the byte-level LM, where
            curvature put every copy after block 0).
        max_per_stack: the most blocks added to one stack in one growth step (``None``: no limit).
        curvature_monitor: the :class:`~lightning_depthgrow.callbacks.curvature_monitor.CurvatureMonitor` to
            estimate curvature with. ``None``: the one in ``trainer.callbacks`` if any, else one built by this
            callback with default settings. A monitor given here but not put in ``trainer.callbacks`` is private:
            this callback feeds it batches and saves its state (e.g. ``CurvatureMonitor(num_probes=4, log=False)``
            for cheaper estimates). Only used with ``placement="curvature"``.
        example_input: input for FLOP counting and for verifying insertions; default
            ``pl_module.example_input_array``. FLOP counting (``budget_metric="flops"``) needs one of these two; for
            verification, without either, the inputs of the module's latest forward call during ``fit`` are used
            (:func:`~lightning_depthgrow.callbacks.plumbing.example_input`), and the trial below runs before the
            first optimizer step (at the start of training if validation's sanity check already called the module)
            instead of in setup, on a copy of the module. Ramped operators need an input: if ``training_step`` never
            calls the module itself, training stops there, before the first optimizer step, with a message saying
            what to set. With an example input, setup makes a verified trial per stack
            (:func:`~lightning_depthgrow.surgery.check_growable`: one insertion, undone again, or, with
            ``ramp_steps >= 1``, ramped copies in a deep copy of the module) and every growth step is
            verified on it (:func:`~lightning_depthgrow.surgery.verify_insertions`): a step whose insertions would
            change the model's outputs, or leave a block that does not run, is refused with
            :class:`~lightning_depthgrow.surgery.FunctionNotPreservedError` and the module and optimizers are left
            exactly as they were. With no input at all (``operator="zero_init"`` only), only the adapters'
            structural checks run.
        seed: base seed of the new blocks' initialisation (the event of step ``k`` uses ``seed + k``-derived
            seeds, so every rank and every replay builds identical blocks).
        monitor: deprecated name of ``curvature_monitor`` (``monitor`` reads as a metric key elsewhere in
            Lightning); removed in the next release.
        operator: how a new block is made. ``"stack"`` (the default, ``None``): see below. ``"zero_init"`` (the
            paper's, :meth:`paper`): a copy of its template with the residual
            branch's last layers zeroed (``insert_block`` events). ``"copy"``: each planned insertion is a trained
            copy of its template (``copy_block`` events), entering through a residual ramp when ``ramp_steps >= 1``.
            ``"stack"``: G_stack, a growth step duplicates every growable stack as a whole
            (``[b0, b1] -> [b0, b1, b0', b1']``, one ``stack_blocks`` event per stack) if the whole duplication
            fits the budget (``blocks_per_step``, ``max_per_stack`` and ``placement`` do not apply); a stack whose
            duplication does not fit is skipped. A stack whose first blocks change the feature shape (a ResNet or
            EfficientNet stage that downsamples) stacks its shape-preserving tail, the blocks after the last
            shape-changing one (``[d, b1] -> [d, b1, b1', b1'']``); a stack without such a tail is not grown, with
            a warning naming it. With ``"copy"``/``"stack"`` a step is skipped while earlier
            blocks are still ramping in (a ramping block cannot be copied).
        ramp_steps: with ``"copy"``/``"stack"``, the optimizer steps over which new blocks ramp in
            (``x + a * (block(x) - x)``, ``a`` from 0 to 1; :mod:`lightning_depthgrow.surgery.ramp`): an ``int``, or a
            ``float`` in ``(0, 1)``, a fraction of the run's optimizer steps (``Trainer.estimated_stepping_batches``,
            rounded, at least 1), resolved at the start of training (the attribute ``ramp_steps`` is ``None``
            until then; ``ramp_fraction`` keeps the fraction). Default ``None``: ``0.12`` (180 of the benchmark's
            1,500 steps; a 60-step ramp was worse, a 300-step one no better) with ``"copy"``/``"stack"``, ``0`` with
            ``"zero_init"``. Ramps advance
            once per optimizer step (gradient accumulation respected) and are folded by a ``fold_ramps`` event
            when they end. ``0``: no ramp; copies then change the function (what the duplicated network
            computes). Must be ``0`` with ``"zero_init"`` (already function-preserving). With ``ramp_steps >= 1``
            the zero-init refusals (post-LayerNorm blocks, a non-ReLU activation after the residual add) do not
            apply: setup tries ramped copies on a deep copy of the module instead (outputs at birth, every block
            runs, an exact fold; ``check_growable(..., ramp_steps=...)``), so HF BERT, post-LayerNorm
            ``nn.TransformerEncoder`` or a timm ResNet with SiLU grow this way.
        at: grow after the optimizer steps at these fractions of training (increasing, each in ``(0, 1)``; e.g.
            ``[0.1, 0.25]``). ``None``: ``[1/3]`` (G_stack grows once, early; the benchmarks' best of 0.2, 1/3 and
            0.45), or the epoch schedule when ``warmup_epochs`` or ``grow_every`` is given.
        factor: with ``operator="stack"``, how many times deeper one growth step makes a stack (``2``: the stack
            is duplicated, ``[b0, b1] -> [b0, b1, b0', b1']``; ``3``: 2 -> 6 blocks in one step). Default ``3``
            (the benchmarked 2 -> 6; with the default ``final_budget=3.0`` it always fits); only with ``"stack"``.
        optimizer_state: with ``"copy"``/``"stack"``, the optimizer state each copied block starts with:
            ``"fresh"`` (default: no moments, ``step`` 0, as for any new parameter) or ``"copy"`` (a copy of its
            source block's state: Adam moments and ``step``; issue 14). Recorded in the event
            (``"optimizer_state": "copy"``) and applied where the optimizers are synced after the change, so every
            DDP rank copies the same state; a resumed run loads it with the checkpoint's optimizer. Not with
            ``"zero_init"``: a zero-initialised block is not a copy of a trained one.

    Example:
        >>> import lightning.pytorch as pl
        >>> growth = DepthGrowth()  # G_stack: 3x deeper after a third of training, ramped over 12% of it
        >>> growth.operator, growth.factor, growth.at, growth.ramp_fraction, growth.final_budget
        ('stack', 3, (0.3333333333333333,), 0.12, 3.0)
        >>> trainer = pl.Trainer(max_steps=1500, callbacks=[growth])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)  # doctest: +SKIP
        >>> paper = DepthGrowth.paper(final_budget=2.0, placement="curvature")  # zero-init, every epoch after one
        >>> paper.operator, paper.warmup_epochs, paper.grow_every, paper.blocks_per_step
        ('zero_init', 1, 1, 1)
        >>> stacking = DepthGrowth(final_budget=2.0, operator="stack", ramp_steps=50, warmup_epochs=2)
        >>> stacking.operator, stacking.ramp_steps
        ('stack', 50)
        >>> g_stack = DepthGrowth(final_budget=3.0, operator="stack", factor=3, ramp_steps=180, at=[1 / 3])
        >>> g_stack.at, g_stack.factor, g_stack.warmup_epochs
        ((0.3333333333333333,), 3, None)
        >>> DepthGrowth(final_budget=3.0, operator="stack", factor=3, at=[0.3], optimizer_state="copy").optimizer_state
        'copy'

    """

    def __init__(
        self,
        final_budget: float = DEFAULT_FINAL_BUDGET,
        budget_metric: BudgetMetric = "params",
        budget_mode: BudgetMode = "relative",
        warmup_epochs: int | None = None,
        grow_every: int | None = None,
        blocks_per_step: int | None = 1,
        step_budget: float | None = None,
        scale_by_lr: bool = False,
        placement: Placement = "uniform",
        max_per_stack: int | None = 1,
        curvature_monitor: CurvatureMonitor | None = None,
        example_input: torch.Tensor | None = None,
        seed: int = 0,
        monitor: CurvatureMonitor | None = None,
        operator: str | None = None,
        ramp_steps: int | float | None = None,
        at: Sequence[float] | None = None,
        factor: int | None = None,
        optimizer_state: OptimizerState = "fresh",
    ) -> None:
        if final_budget is None:
            raise TypeError(
                "`final_budget` must be a positive number (a multiple of the start, or absolute), got None."
            )
        implicit = operator is None  # the default recipe: paper-only arguments are refused below
        if implicit:
            operator = DEFAULT_OPERATOR
        if at is None and warmup_epochs is None and grow_every is None:
            at = DEFAULT_AT
        schedule = growth_schedule(at, warmup_epochs, grow_every)
        super().__init__(Budget(final_budget, step_budget, budget_metric, budget_mode, scale_by_lr), schedule)
        self.operator = check_name("operator", operator, OPERATORS)
        if ramp_steps is None:
            ramp_steps = 0 if self.operator == "zero_init" else DEFAULT_RAMP_FRACTION
        #: ``ramp_steps`` given as a fraction of the run's optimizer steps, else ``None``.
        self.ramp_fraction: float | None = None
        if isinstance(ramp_steps, float) and not isinstance(ramp_steps, bool):
            if not 0.0 < ramp_steps < 1.0:
                raise ValueError(
                    f"`ramp_steps` is a number of optimizer steps (an int >= 0) or a fraction of the run's optimizer "
                    f"steps (a float in (0, 1)), got {ramp_steps!r}. Write a step count as an int, e.g. "
                    f"ramp_steps={int(ramp_steps) if math.isfinite(ramp_steps) else 180}."
                )
            self.ramp_fraction = float(ramp_steps)
            self.ramp_steps: int | None = None
        else:
            self.ramp_steps = check_int("ramp_steps", ramp_steps, minimum=0)
        if self.operator == "zero_init" and self._ramped:
            raise ValueError(
                f"`ramp_steps` must be 0 with operator='zero_init' (zero-init blocks are already the identity at "
                f"birth), got {ramp_steps}. Use operator='copy' or 'stack' to ramp blocks in."
            )
        if factor is not None and (not isinstance(operator, str) or operator != "stack"):
            raise ValueError(
                f"`factor`={factor!r} is how many times deeper operator='stack' makes a stack per step; with "
                f"operator={operator!r} a step adds up to blocks_per_step blocks. Use operator='stack' or drop factor."
            )
        # Unused by the other operators, where it keeps its pre-0.7 value (2).
        default_factor = DEFAULT_FACTOR if self.operator == "stack" else 2
        self.factor = check_int("factor", default_factor if factor is None else factor, minimum=2)
        self.optimizer_state: OptimizerState = check_name("optimizer_state", optimizer_state, OPTIMIZER_STATES)
        if self.optimizer_state == "copy" and self.operator == "zero_init":
            raise ValueError(
                "`optimizer_state='copy'` gives each copied block its source block's optimizer state, but "
                "operator='zero_init' makes zero-initialised blocks, not copies of trained ones. Use operator='copy' "
                "or 'stack' to copy the state, or optimizer_state='fresh'."
            )
        self.blocks_per_step = check_optional(blocks_per_step, check_int, "blocks_per_step", minimum=1)
        self.max_per_stack = check_optional(max_per_stack, check_int, "max_per_stack", minimum=1)
        if blocks_per_step is None and step_budget is None and self.operator != "stack":
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
        if curvature_monitor is not None and self.placement != "curvature":
            rank_zero_warn(
                f"DepthGrowth(curvature_monitor=...) is only used by placement='curvature', and placement is "
                f"{self.placement!r} (the default is 'uniform' since 0.3): pass placement='curvature' to place blocks "
                "by curvature."
            )
        self.example_input = example_input
        self.seed = check_int("seed", seed)
        if implicit:
            # After every argument is validated (errors name the argument first).
            given = {
                "warmup_epochs": warmup_epochs,
                "grow_every": grow_every,
                "blocks_per_step": blocks_per_step,
                "step_budget": step_budget,
                "scale_by_lr": scale_by_lr,
                "max_per_stack": max_per_stack,
                "placement": placement,
            }
            paper = {k: v for k, v in given.items() if v != _PAPER_ARGUMENTS[k]}
            if paper:
                args = ", ".join(f"{k}={v!r}" for k, v in paper.items())
                raise ValueError(
                    f"DepthGrowth({args}) without an operator: these arguments configure the paper's per-block "
                    "growth, and since 0.7 DepthGrowth() defaults to G_stack (operator='stack', factor=3, at=[1/3], "
                    "ramped copies; the benchmarks' best), where they do not apply. For the previous defaults use "
                    f"DepthGrowth.paper({args}) (zero-initialised blocks), or name the operator: "
                    "operator='zero_init', 'copy' or 'stack'."
                )
        self._given_monitor = curvature_monitor
        self._monitor: CurvatureMonitor | None = None  # the monitor in use, found or built in setup
        self._drives_monitor = False  # True when it is not in trainer.callbacks: we feed it and save its state
        self._growable: set[str] | None = None  # paths of the stacks check_growable accepted in setup
        self._ramp_step: int | None = None  # trainer.global_step when ramps last advanced (not saved: resume reads it)
        # True while the verified trial waits for an input recorded during training (no example input in setup).
        self._trial_pending = False
        self._deferred_growable: list[str] | None = None  # the deferred trial's verdict, saved for resume
        self._step_input: Any = None  # during a growth step without an example input: rank 0's recorded input

    @classmethod
    def paper(
        cls,
        final_budget: float = 2.0,
        budget_metric: BudgetMetric = "params",
        budget_mode: BudgetMode = "relative",
        warmup_epochs: int | None = None,
        grow_every: int | None = None,
        blocks_per_step: int | None = 1,
        step_budget: float | None = None,
        scale_by_lr: bool = False,
        placement: Placement = "uniform",
        max_per_stack: int | None = 1,
        curvature_monitor: CurvatureMonitor | None = None,
        example_input: torch.Tensor | None = None,
        seed: int = 0,
        at: Sequence[float] | None = None,
    ) -> DepthGrowth:
        """The paper's recipe, ``DepthGrowth``'s defaults before 0.7: zero-initialised blocks (``operator=
        "zero_init"``, identity at birth), ``blocks_per_step`` blocks per growth step at the end of every
        ``grow_every``-th epoch after ``warmup_epochs`` (both ``1`` unless given, or ``at=[...]`` instead), up to
        ``final_budget=2.0``; the paper's learning-rate-scaled step budget is ``step_budget=...`` with
        ``scale_by_lr=True``. The arguments mean what they mean in :class:`DepthGrowth`; ``DepthGrowth.paper()``
        makes exactly the events ``DepthGrowth()`` made before 0.7.

        On the byte-level LM this recipe ended 0.045 ± 0.022 nats/byte *above* a fixed model of the final size,
        where the default G_stack ended 0.040 below it (``docs/growth.md``); keep it to reproduce the paper or
        earlier runs.

        Example:
            >>> growth = DepthGrowth.paper(step_budget=0.25, scale_by_lr=True)  # the lr-scaled budget
            >>> growth.operator, growth.warmup_epochs, growth.grow_every, growth.final_budget, growth.scale_by_lr
            ('zero_init', 1, 1, 2.0, True)
            >>> DepthGrowth.paper(at=[0.5]).at
            (0.5,)
        """
        if at is None:
            warmup_epochs = 1 if warmup_epochs is None else warmup_epochs
            grow_every = 1 if grow_every is None else grow_every
        return cls(
            final_budget=final_budget,
            budget_metric=budget_metric,
            budget_mode=budget_mode,
            warmup_epochs=warmup_epochs,
            grow_every=grow_every,
            blocks_per_step=blocks_per_step,
            step_budget=step_budget,
            scale_by_lr=scale_by_lr,
            placement=placement,
            max_per_stack=max_per_stack,
            curvature_monitor=curvature_monitor,
            example_input=example_input,
            seed=seed,
            operator="zero_init",
            ramp_steps=0,
            at=at,
        )

    @property
    def _ramped(self) -> bool:
        """Whether new blocks ramp in (``ramp_steps >= 1`` or a fraction)."""
        return self.ramp_fraction is not None or bool(self.ramp_steps)

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
        if self.operator == "stack":
            self._check_some_stack_fits(pl_module, layouts)
        else:
            self._check_some_block_fits(pl_module, layouts)
            self._check_blocks_per_step_fits(layouts)
        if self.placement == "curvature" and self.operator != "stack":
            self._setup_monitor(trainer, pl_module)

    def on_setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trial_pending:
            # No example input: record the inputs of the module's forward calls (the hook is removed at teardown).
            plumbing.capture_inputs(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.events_so_far(pl_module):
            _check_groups_not_per_block(trainer, pl_module, self.name, self._layouts(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A resumed run starts from the checkpoint's step: ramps (restored with the weights) advance from there.
        self._ramp_step = trainer.global_step
        if self.ramp_fraction is not None:
            total = trainer.estimated_stepping_batches
            if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total) or total < 1:
                raise ValueError(
                    f"{self.name}(ramp_steps={self.ramp_fraction}) ramps new blocks in over a fraction of the run's "
                    f"optimizer steps, and this run's length is unknown ({total!r}): set Trainer(max_steps=...) or "
                    "max_epochs with a sized train dataloader, or give ramp_steps as a number of steps (an int)."
                )
            self.ramp_steps = max(1, round(self.ramp_fraction * int(total)))
        if self._trial_pending and plumbing.captured_input(pl_module) is not None:
            self._deferred_trial(trainer, pl_module)  # validation's sanity check already called the module
        if isinstance(self.schedule, FractionSchedule) and self.ramp_steps:
            steps = self.schedule.steps(trainer.estimated_stepping_batches)
            close = [(a, b) for a, b in itertools.pairwise(steps) if b - a < self.ramp_steps]
            if close:
                rank_zero_warn(
                    f"{self.name}: growth steps {close} are closer than ramp_steps={self.ramp_steps}: a step whose "
                    "blocks are still ramping in is skipped (a ramping block cannot be copied). Space the fractions "
                    "in `at` further apart or shorten the ramp."
                )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._trial_pending:
            self._deferred_trial(trainer, pl_module)  # the first forward ran; refuse before the first update

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._trial_pending:
            self._deferred_trial(trainer, pl_module)
        self.advance_ramps(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def advance_ramps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """Advance every residual ramp one step if an optimizer step happened since the last call, and fold the
        ramps that ended with a ``fold_ramps`` event (applied like every change, so resume replays it).

        Called at every training batch end before a scheduled growth step; returns the fold events applied.
        """
        if self._ramp_step is None:
            self._ramp_step = trainer.global_step
        if trainer.global_step == self._ramp_step:
            return []  # gradient accumulation: no optimizer step on this batch
        self._ramp_step = trainer.global_step
        if self.operator == "zero_init":
            return []
        finished = advance_ramps(pl_module)
        if not finished:
            return []
        event = ArchitectureEvent(
            "fold_ramps", {"blocks": finished}, epoch=trainer.current_epoch, step=trainer.global_step
        )
        plumbing.apply_and_sync(trainer, pl_module, event)
        return [event]

    def change_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any = None
    ) -> list[ArchitectureEvent]:
        self._step_input = self._shared_recorded_input(trainer, pl_module)
        try:
            with self._verifying(pl_module):
                return super().change_now(trainer, pl_module, outputs)
        finally:
            self._step_input = None

    def _shared_recorded_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Without an example input, the recorded input this step is verified on: rank 0's on every rank (each rank
        recorded its own batch; one input keeps every rank's verdict the same). ``None`` with an example input."""
        if self.example_input is not None or pl_module.example_input_array is not None:
            return None
        recorded = plumbing.captured_input(pl_module)
        if trainer.world_size <= 1:
            return recorded
        return plumbing.broadcast(trainer, plumbing.map_tensors(recorded, torch.Tensor.cpu))

    def verify_events(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, events: list[ArchitectureEvent]
    ) -> None:
        """Try a step of several insertions on the module, verified, and undo it again before applying it.

        Each insertion is verified (and undone on failure) when it is applied; trying the whole step first means
        a refused later insertion cannot leave an earlier one applied with the optimizers already synced.
        """
        if self.operator != "zero_init":
            self._verify_copies(pl_module, events)
            return
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
        if self.ramp_steps is None:
            raise RuntimeError(
                f"{self.name}: ramp_steps={self.ramp_fraction} is a fraction of the run's optimizer steps, resolved at "
                "the start of training; grow from a training hook (after on_train_start), or give ramp_steps in steps."
            )
        if self.operator != "zero_init" and self._still_ramping(pl_module):
            return []
        if self.operator == "stack":
            return self._plan_stack(trainer, pl_module)
        events = []
        for k, insertion in enumerate(self.plan(trainer, pl_module)):
            seed = self.seed * 1_000_003 + self.growth_steps * 1_009 + k
            event = insertion.to_event(seed, epoch=trainer.current_epoch, step=trainer.global_step)
            if self.operator == "copy":
                spec = {"stack": insertion.stack, "source": insertion.template, "index": insertion.after}
                event = ArchitectureEvent(
                    "copy_block",
                    {**spec, "ramp_steps": self.ramp_steps, **self._state_spec()},
                    epoch=event.epoch,
                    step=event.step,
                    reason=event.reason,
                    cost=event.cost,
                )
            events.append(event)
        return events

    def describe(self, event: ArchitectureEvent) -> str:
        reason = event.reason
        if event.kind == "stack_blocks":
            begin = event.spec.get("start", 0)
            after = begin + (reason["depth"] - begin) * event.spec["factor"]
            tail = f" from block {begin} on" if begin else ""
            return (
                f"stacked {event.spec['stack']!r}{tail} ({reason['depth']} -> {after} "
                f"blocks, ramp {self.ramp_steps} steps, {self.optimizer_state} optimizer state); "
                f"{reason['budget_metric']} {reason['budget_after']:,.0f} / {reason['budget_limit']:,.0f}"
            )
        if event.kind == "fold_ramps":
            return f"folded the finished ramps of blocks {list(event.spec['blocks'])} (the gates reached 1)"
        if event.kind == "copy_block":
            what = f"a copy of block {event.spec['source']} (ramp {self.ramp_steps} steps)"
            return f"inserted {what} after {reason['block']}; {reason['budget_metric']} {reason['budget_after']:,.0f}"
        if event.kind != "insert_block":
            return super().describe(event)
        runners_up = ", ".join(f"{r['block']} {r['score']:.4g}" for r in reason["runners_up"]) or "none"
        return (
            f"inserted a block after {reason['block']} ({reason['score_name']} {reason['score']:.4g}; runners-up "
            f"{runners_up}); {reason['budget_metric']} {reason['budget_after']:,.0f} / {reason['budget_limit']:,.0f}"
        )

    def describe_nothing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if self.operator != "zero_init" and self._still_ramping(pl_module):
            return f"blocks {sorted(self._still_ramping(pl_module))} are still ramping in; not growing this step."
        step_limit = self.budget.step_limit(self.start_size or 0.0, plumbing.lr_scale(trainer))
        scale = self.budget.lr_factor(plumbing.lr_scale(trainer))
        step = "" if math.isinf(step_limit) else f", step limit {step_limit:,.0f} (lr scale {scale:.3g})"
        return (
            f"no block fits ({self.measure(pl_module):,.0f} of {self.final_limit():,.0f} {self.budget.metric} "
            f"used{step}); not growing."
        )

    def extra_state(self) -> dict[str, Any]:
        # The private monitor's history seeds its probes: restoring it keeps resumed placements identical.
        state: dict[str, Any] = {"monitor": self._monitor.state_dict() if self._drives_monitor else None}
        if self._deferred_growable is not None:
            # The stacks the trial at the first batch accepted: a resumed run (already grown) uses them as they were.
            state["growable"] = list(self._deferred_growable)
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self._drives_monitor and state.get("monitor") is not None:
            self._monitor.load_state_dict(state["monitor"])
        if self._trial_pending and state.get("growable") is not None:
            self._deferred_growable = [str(path) for path in state["growable"]]
            self._growable = set(self._deferred_growable)
            self._trial_pending = False

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
        """The input insertions are verified on: ``example_input``, else ``pl_module.example_input_array``, else the
        inputs of the module's latest forward call during ``fit`` (:func:`~lightning_depthgrow.callbacks.plumbing.
        example_input`; ``None`` before the first call or without a recorder)."""
        if self._step_input is not None:
            return self._step_input
        return plumbing.example_input(pl_module, self.example_input)

    def _deferred_trial(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The verified trial of :meth:`_check_growable`, on an input recorded during training (setup had none).

        It runs on a deep copy of the module, before any growth step; every rank uses rank 0's verdict. With no
        input recorded, ramped operators refuse (training stops, the architecture unchanged); zero-init growth goes
        on with the structural checks only, as without an example input before.
        """
        self._trial_pending = False
        example = self._verification_input(pl_module)
        outcome: tuple[str, Any]
        if example is None:
            outcome = ("missing", None)
        else:
            try:
                outcome = ("ok", self._check_growable(copy.deepcopy(pl_module), example, warn=False))
            except (FunctionNotPreservedError, UnsupportedModelError) as err:
                outcome = ("refused", str(err))
        kind, value = plumbing.broadcast(trainer, outcome)
        if kind == "missing":
            if not self._ramped:
                return
            raise ValueError(
                f"{self.name}(operator={self.operator!r}, ramped) verifies every growth step on an input the module "
                f"is called with, and found none: no example_input was given, {type(pl_module).__name__} has no "
                "example_input_array, and training_step did not call the module itself (self(x), self.forward) in "
                "the first training step. Set `pl_module.example_input_array` (one batch of model inputs), pass "
                "DepthGrowth(example_input=...), or call the module in training_step. Nothing was changed: this "
                "refusal comes before the first optimizer step."
            )
        if kind == "refused":
            raise FunctionNotPreservedError(f"{value} (trial on an input recorded at the first training batch)")
        verdicts: dict[str, str | None] = value
        setup_growable = self._growable or set()  # setup's structural checks already warned about the others
        refused = {path: reason for path, reason in verdicts.items() if reason is not None and path in setup_growable}
        if refused:
            rank_zero_warn(
                f"{self.name}: not growing block stack(s) {sorted(refused)}: "
                + " ".join(str(reason) for reason in refused.values())
            )
        self._growable = {path for path in setup_growable if verdicts.get(path, "missing") is None}
        self._deferred_growable = sorted(self._growable)
        if not self._growable:
            raise FunctionNotPreservedError(
                f"{self.name}: no block stack passed the verified trial on the input recorded at the first training "
                "batch; nothing was grown. " + " ".join(str(reason) for reason in refused.values())
            )

    @contextlib.contextmanager
    def _verifying(self, pl_module: pl.LightningModule) -> Iterator[None]:
        example = self._verification_input(pl_module)
        with verify_insertions(example) if example is not None else contextlib.nullcontext():
            yield

    def _check_growable(self, pl_module: pl.LightningModule, example: Any = None, warn: bool = True) -> Any:
        """Paths of the stacks that can grow (:func:`~lightning_depthgrow.surgery.check_growable`); raise if none.

        In setup (no ``example``) the trial uses ``example_input`` or ``example_input_array``; without either it is
        left to :meth:`_deferred_trial`, which passes the recorded ``example`` and ``warn=False`` and gets the
        verdicts ``{path: reason or None}`` back instead.

        The structural checks run first; with an example input, a verified trial follows on every stack. For
        zero-initialised blocks (``ramp_steps=0``) the structural checks include the adapters' refusals
        (post-LayerNorm blocks, a non-ReLU activation after the residual add) and the trial is one insertion per
        stack, undone again. For ramped copies (``ramp_steps >= 1``) those refusals do not apply (a ramp is the
        identity at birth for any shape-preserving block): the trial inserts ramped copies into a deep copy of the
        module, checks the outputs at birth and that every block runs, then ends and folds the ramps and checks
        the fold changed nothing and left plain blocks.
        """
        ramp = self.ramp_steps or (1 if self._ramped else 0)  # a fraction resolves at train start; a trial needs >= 1
        if example is None:
            try:
                verdicts = check_growable(pl_module, ramp_steps=ramp)
            except UnsupportedModelError as err:
                raise UnsupportedModelError(f"{self.name}: {err}") from err
            example = self.example_input if self.example_input is not None else pl_module.example_input_array
            self._trial_pending, self._deferred_growable = example is None, None
        if example is not None:
            try:
                verdicts = check_growable(pl_module, example, ramp_steps=ramp)
            except UnsupportedModelError as err:
                trial = "of ramped copies" if self._ramped else "insertion"
                raise FunctionNotPreservedError(
                    f"{self.name}: a trial {trial} on the example input failed for every stack, the module is "
                    f"unchanged. {err}"
                ) from err
        if not warn:
            return verdicts
        refused = {path: reason for path, reason in verdicts.items() if reason is not None}
        if refused:
            rank_zero_warn(
                f"{self.name}: not growing block stack(s) {sorted(refused)}: "
                + " ".join(str(reason) for reason in refused.values())
            )
        return {path for path, reason in verdicts.items() if reason is None}

    def _layouts(self, pl_module: pl.LightningModule, events: Any = ()) -> list[StackLayout]:
        """The layouts of the stacks that may grow (those ``setup`` found growable)."""
        layouts = stack_layouts(pl_module, events, ramped=self._ramped)
        if self._growable is None:
            return layouts
        return [layout for layout in layouts if layout.path in self._growable]

    def _example_input(self, pl_module: pl.LightningModule) -> Any:
        example = plumbing.require_example_input(
            pl_module, self.example_input, f"{self.name}(budget_metric={self.budget.metric!r})"
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

    def _check_blocks_per_step_fits(self, layouts: list[StackLayout]) -> None:
        """Refuse a ``blocks_per_step`` no step can add: one block per insertion position, ``max_per_stack`` per
        stack (the planner would silently add fewer)."""
        if self.blocks_per_step is None:
            return
        per_stack = [
            len(layout.growable) if self.max_per_stack is None else min(len(layout.growable), self.max_per_stack)
            for layout in layouts
        ]
        if self.blocks_per_step > sum(per_stack):
            raise ValueError(
                f"{self.name}: blocks_per_step={self.blocks_per_step}, but one growth step adds at most one block per "
                f"insertion position (after each growable block) and at most max_per_stack={self.max_per_stack} per "
                f"stack: {sum(per_stack)} block(s) for the stacks "
                f"{[(layout.path, len(layout.growable)) for layout in layouts]} (path, positions). Lower "
                "blocks_per_step, raise max_per_stack, grow in more steps (at=[...] or grow_every), or use "
                "operator='stack' with factor=k to make a stack k times deeper in one step."
            )

    @staticmethod
    def _stack_starts(pl_module: pl.LightningModule) -> dict[str, int]:
        """``{stack_path: first block of its stackable tail}``: the block after the last one that changes the
        feature shape (0 when every block keeps it), for the stacks with such a tail (whether a block keeps the
        shape is the adapter's call)."""
        starts = {}
        for stack in find_block_stacks(pl_module):
            changing = [i for i, block in enumerate(stack.blocks) if not stack.adapter.shape_preserving(block)]
            start = changing[-1] + 1 if changing else 0
            if start < len(stack.blocks):
                starts[stack.path] = start
        return starts

    def _stack_costs(
        self, pl_module: pl.LightningModule, layouts: list[StackLayout], starts: dict[str, int]
    ) -> dict[str, float]:
        """``{stack_path: cost of one stacking step (factor - 1 copies of the stack's tail)}`` in ``budget_metric``,
        for stacks with a shape-preserving tail (``starts``, from :meth:`_stack_starts`; only those can be
        stacked)."""
        costs = self._block_costs(pl_module, layouts)
        metric = self.budget.metric
        return {
            layout.path: float(
                sum(costs[layout.block_name(i)].of(metric) for i in range(starts[layout.path], layout.depth))
            )
            * (self.factor - 1)
            for layout in layouts
            if layout.path in starts
        }

    def _check_some_stack_fits(self, pl_module: pl.LightningModule, layouts: list[StackLayout]) -> None:
        """Refuse (``operator="stack"``) when no stack can be duplicated at all, or no duplication fits the budget."""
        starts = self._stack_starts(pl_module)
        stack_costs = self._stack_costs(pl_module, layouts, starts)
        if not stack_costs:
            raise ValueError(
                f"{self.name}(operator='stack'): every block stack {[layout.path for layout in layouts]} ends with a "
                "block that changes the feature shape, so no stack has a tail that can be stacked. Use "
                "operator='copy' or 'zero_init'."
            )
        skipped = [stack.path for stack in find_block_stacks(pl_module) if stack.path not in starts]
        if skipped:
            rank_zero_warn(
                f"{self.name}(operator='stack') stacks each block stack's shape-preserving tail, and {skipped} end "
                f"with a block that changes the feature shape (e.g. a one-block downsampling stage): they will not "
                f"grow; only {sorted(stack_costs)} will. Use operator='copy' to grow the stacks one ramped copy at a "
                "time."
            )
        start = float(self.start_size or 0.0)
        room = self.budget.room(start, start, lr_scale=1.0)
        path, size = min(stack_costs.items(), key=lambda item: item[1])
        if size > room:
            need = f"{(start + size) / start:.4g}" if self.budget.mode == "relative" else f"{start + size:,.0f}"
            raise ValueError(
                f"{self.name}(operator='stack'): the budget leaves room for {room:,.0f} {self.budget.metric} of "
                f"growth, but duplicating the smallest stack ({path!r}) to {self.factor} times its depth (factor="
                f"{self.factor}) costs {size:,.0f}: nothing would ever grow. "
                f"Raise final_budget to >= {need} (and step_budget to at least that cost if set)."
            )

    def _plan_stack(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """One ``stack_blocks`` event per growable stack whose stacking (``factor`` times deeper) still fits the
        budget."""
        layouts = self._layouts(pl_module, self.events_so_far(pl_module))
        starts = self._stack_starts(pl_module)
        stack_costs = self._stack_costs(pl_module, layouts, starts)
        start, current, lr = float(self.start_size or 0.0), self.measure(pl_module), plumbing.lr_scale(trainer)
        room, limit = self.budget.room(start, current, lr), self.final_limit()
        events = []
        for layout in layouts:
            cost = stack_costs.get(layout.path)
            if cost is None or cost > room:
                continue
            room -= cost
            current += cost
            spec = {"stack": layout.path, "factor": self.factor, "order": "stack", "ramp_steps": self.ramp_steps}
            if starts[layout.path]:  # a tail; absent for whole stacks, so their events read as before
                spec["start"] = starts[layout.path]
            spec.update(self._state_spec())
            reason = {
                "depth": layout.depth,
                "budget_metric": self.budget.metric,
                "budget_after": current,
                "budget_limit": limit,
            }
            events.append(
                ArchitectureEvent(
                    "stack_blocks",
                    spec,
                    epoch=trainer.current_epoch,
                    step=trainer.global_step,
                    reason=reason,
                    cost={self.budget.metric: cost},
                )
            )
        return events

    def _state_spec(self) -> dict[str, str]:
        """The optimizer-state entry of a copy event's spec (none for fresh state: event logs stay as before)."""
        return {"optimizer_state": "copy"} if self.optimizer_state == "copy" else {}

    def _still_ramping(self, pl_module: pl.LightningModule) -> dict[str, tuple[int, int]]:
        return {name: state for name, state in ramped_blocks(pl_module).items() if state[0] < state[1]}

    def _verify_copies(self, pl_module: pl.LightningModule, events: list[ArchitectureEvent]) -> None:
        """With ramps and an example input: apply the step to a copy of the module and require the same outputs
        (ramped blocks are the identity at birth) and every block to run; else refuse, the module untouched."""
        example = self._verification_input(pl_module)
        if example is None or not events:
            return
        if not self._ramped:
            return  # a plain copy is documented not to preserve the function
        probe = copy.deepcopy(pl_module)
        stacks = {e.spec["stack"] for e in events}
        before = {path: _run(probe, _find_stack(probe, path), example)[0] for path in stacks}
        for event in events:
            apply_event(probe, event)
        for path in stacks:
            what = f"the {events[0].kind} step on {path!r} (ramp {self.ramp_steps})"
            try:
                _verify(
                    probe, _find_stack(probe, path), _Check(example, DEFAULT_TOLERANCE), before[path], what, RAMP_REMEDY
                )
            except RuntimeError as err:  # the ramp hook refuses blocks that do not map a tensor to a tensor
                raise FunctionNotPreservedError(
                    f"{self.name}: {what} failed on a trial copy of the module, which is unchanged. {err}"
                ) from err

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
