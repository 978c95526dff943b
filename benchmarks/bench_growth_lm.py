"""Benchmark: does depth growth pay on a task where depth matters? Byte-level GPT on the Python stdlib.

The task (:mod:`benchmarks.tasks`): a byte-level TinyGPT (dim 32, 4 heads, context 128) trained with
``Trainer.fit`` for ``--steps`` AdamW steps (batch 32, warm-up + cosine), validated on held-out stdlib files.
Variants, per seed, all with the same data order and schedule length unless said:

- ``fixed_<d>``: a fixed model of ``d`` blocks (the small start model, the final size, sizes in between);
- grown ``2 -> 6`` in one step at ``--grow-at`` of training (G_stack grows once, early), by operator:
  ``stack_ramp`` (G_stack: the trained stack duplicated twice in order, ramped in over ``--ramp-steps``),
  ``stack_noramp`` (G_stack without a ramp: plain copies, not function-preserving), both through the library's
  callback, ``DepthGrowth(at=[grow_at], operator="stack", factor=3, ramp_steps=...)``;
  ``zero_interleave`` (identity blocks: two zero-initialised blocks after each block) and
  ``copy_interleave_ramp`` (two copies of each trained block right after it, ramped in), which ``DepthGrowth``
  cannot express in one step (one block per insertion position), applied as events by :class:`ScheduledGrowth`;
- ``copy_ramp_curvature`` / ``copy_ramp_uniform`` (placement, issue 14 item 3): ``2 -> 6`` by four single ramped
  copies (``--copy-ramp-steps``), one after each fraction in ``--copy-at``, placed by curvature or uniformly
  (``DepthGrowth(operator="copy", blocks_per_step=1, at=...)``); not in the default variant list;
- ``copy_two_step_ramp`` (two-step growth ``2 -> 4 -> 6``): after each of the two fractions in ``--two-step-at``
  two ramped copies (``--ramp-steps``) placed uniformly, ``DepthGrowth(operator="copy", blocks_per_step=2, at=...)``
  (``2 -> 4``: one copy after each block; ``4 -> 6``: one more per starting block); not in the default list;
- ``fixed_final_growth_lr`` (with ``--small-lr-mult`` / ``--lr-restart-warmup``): the final-size model trained from
  the start with the grown runs' growth-aware LR schedule (the control: is a gain the schedule's or the growth's?);
  ``fixed_<d>_growth_lr`` the same for a fixed model of ``d`` blocks (the frontier's smaller models on that
  schedule); not in the default list;
- ``fixed_6_equal``: the final-size model trained for as many steps as fit the grown runs' FLOPs, with its own
  full warm-up + cosine schedule (the fixed model at equal compute).

Compute is counted in FLOPs (``FlopCounterMode`` on one training step per depth) and block-steps. Reported:
final validation loss (nats/byte and bits/byte; each run also records ``train_loss_end``, its final loss on as many
fixed windows of the training bytes, for the train-vs-val gap), mean +- std over seeds, paired differences to the fixed
final-size model, the FLOPs each grown run needs to first reach the fixed final-size model's final loss, and
per block of the final model its residual-update ratio and the loss increase when it is skipped.

    OMP_NUM_THREADS=1 python benchmarks/bench_growth_lm.py --seeds 0 1 2

``--optimizer-state copy`` starts every copied block with its source block's optimizer state (Adam moments, ``step``;
``DepthGrowth(optimizer_state="copy")``) instead of fresh state. ``--small-lr-mult K`` multiplies the learning rate of
the grown runs' small phase (the steps before growth) by ``K``; ``--lr-restart-warmup W`` restarts their cosine at the
growth step (a ``W``-step linear re-warm to the peak, then a cosine to the floor at the end); both only for the variants
growing at ``--grow-at`` (:class:`GrowthAwareLR`) and recorded in ``setup["growth_lr"]``. ``--lr``, ``--min-lr-ratio``
and ``--warmup-steps`` set the base schedule of every variant (the :class:`~benchmarks.tasks.LMConfig` fields, defaults
unchanged; recorded in ``setup["lm"]``, so ``--reuse`` and ``--merge`` refuse files made with another schedule).
``--grad-clip C`` clips the global gradient norm of every variant's weights to ``C`` before each optimizer step
(``LMConfig.grad_clip``; default 0, off; recorded in ``setup["lm"]`` only when on, so files made before the option stay
comparable and a clipped file never merges with an unclipped one). ``--reference NAME`` compares every run with another
variant than the fixed final-size model (e.g. the schedule control). ``--driver events`` grows the G_stack variants with
:class:`ScheduledGrowth` too (the reference the library callback is checked against: same events, same steps). Writes
``benchmarks/results/growth_lm.json``. ``--variants`` runs a subset; ``--reuse FILE`` takes the runs of variants already
in FILE (another invocation with the identical configuration: training is deterministic on one CPU thread) instead of
training them again, and ``--merge FILE...`` combines result files of one configuration. The fixed-size runs
(``fixed_<d>``) read no growth setting, so they are also taken from files made with other growth settings
(``--grow-at``, ``--ramp-steps``, ...; same ``lm`` config); a seed already taken is not taken twice, and a second copy
that differs from the first is an error.

``--grown-steps T`` gives the grown variants (every variant in :data:`GROWN`) their own schedule length: each
trains ``T`` steps (the first ``T`` batches of the same data order: the windows are drawn in one sequence per seed),
grows at ``grow_at * T`` and its warm-up + cosine (and the restart of ``--lr-restart-warmup``) spans ``T`` steps;
``--ramp-steps``, ``--warmup-steps`` and the restart's re-warm stay in steps (not scaled). Every other variant keeps
``--steps`` (the reference trains its full schedule), and ``fixed_final_equal`` matches the grown runs' FLOPs at
``T``. ``--grown-lr`` sets the grown variants' own peak LR (default ``--lr``). FLOPs ratios (the run's total, the
FLOPs at which it first reaches the reference's final loss) always count the grown run's own FLOPs against the
reference's full run. Both are recorded in ``setup`` (only when set, so the files made before them stay
comparable); ``--reuse`` / ``--merge`` take the non-grown variants (but ``fixed_final_equal``) from files that
differ only in them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import (
    ByteLM,
    EvenWindows,
    LMConfig,
    block_diagnostics,
    equal_flops_steps,
    lm_loss,
    lm_setup,
    make_gpt,
    mean_std,
    stdlib_corpus,
    train_lm,
    train_step_flops,
    warmup_cosine,
)
from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.events import ArchitectureEvent, apply_event, event_log
from lightning_depthgrow.growth.schedule import GrowthCosineLR
from lightning_depthgrow.measure import count_parameters
from lightning_depthgrow.surgery import operators as _operators  # noqa: F401  (registers stack_blocks, fold_ramps)
from lightning_depthgrow.surgery import sync_schedulers, update_optimizer
from lightning_depthgrow.surgery.ramp import advance_ramps, ramped_blocks

#: Placement (issue 14 item 3): 2 -> 6 by four single ramped copies at ``--copy-at``, placed by curvature or uniformly.
COPY_PLACEMENT = ("copy_ramp_curvature", "copy_ramp_uniform")
#: Two-step growth 2 -> 4 -> 6: two ramped copies (one after each block) after each fraction in ``--two-step-at``.
TWO_STEP = "copy_two_step_ramp"
#: The variants whose growth schedule is not ``--grow-at`` (it is recorded in each run's ``growth`` entry).
OWN_SCHEDULE = (*COPY_PLACEMENT, TWO_STEP)
GROWN = ("zero_interleave", "copy_interleave_ramp", "stack_ramp", "stack_noramp", *OWN_SCHEDULE)
#: The grown variants the library's DepthGrowth expresses (the others are applied as events by ScheduledGrowth).
BY_DEPTH_GROWTH = ("stack_ramp", "stack_noramp", *OWN_SCHEDULE)
#: The control of the growth-aware LR options: the final-size model trained from the start with the grown runs' LR
#: schedule (``--small-lr-mult`` / ``--lr-restart-warmup``): is a gain the schedule's or the growth's?
SCHEDULE_CONTROL = "fixed_final_growth_lr"
#: The setup entries only the grown variants (and ``fixed_final_equal``, matched to their FLOPs) read: the other
#: variants' runs can be reused from a file that differs in them (``--grown-steps``, ``--grown-lr``).
GROWN_RUN_KEYS = ("grown_steps", "grown_lr", "equal_compute_steps")
#: The setup entries a fixed-size run (``fixed_<d>``) reads: its runs can be reused from a file whose growth
#: settings (``grow_at``, ``ramp_steps``, ...) differ.
FIXED_SETUP_KEYS = ("lm", "train_step_flops")


def growth_events(
    operator: str, depth: int, factor: int, ramp_steps: int, seed: int, optimizer_state: str = "fresh"
) -> list[ArchitectureEvent]:
    """The events that grow a ``depth``-block ``blocks`` stack ``factor`` times deeper with ``operator``
    (copies start with their source's optimizer state with ``optimizer_state="copy"``)."""
    if operator == "zero_interleave":
        # Highest index first so earlier indices stay valid; each block gets factor - 1 identity blocks after it.
        return [
            ArchitectureEvent("insert_block", {"stack": "blocks", "index": i, "template": i, "seed": seed + k})
            for i in reversed(range(depth))
            for k in range(factor - 1)
        ]
    order = "interleave" if operator == "copy_interleave_ramp" else "stack"
    ramp = 0 if operator == "stack_noramp" else ramp_steps
    spec = {"stack": "blocks", "factor": factor, "order": order, "ramp_steps": ramp}
    if optimizer_state == "copy":
        spec["optimizer_state"] = "copy"
    return [ArchitectureEvent("stack_blocks", spec)]


class ScheduledGrowth(Callback):
    """Applies growth events after optimizer step ``at_step``; advances and folds ramps after every step.

    Every change goes through :func:`~lightning_depthgrow.events.apply_event` (the path resume replays), the
    optimizer takes the new parameters into their source's param group, and a ``fold_ramps`` event is logged
    when ramps end. ``events`` is the run's event log.
    """

    def __init__(self, at_step: int, events: list[ArchitectureEvent]) -> None:
        self.at_step = at_step
        self.pending = events
        self.events: list[dict[str, Any]] = []

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: ArchitectureEvent) -> None:
        event.step = trainer.global_step
        change = apply_event(pl_module.model, event)
        if change.changes_parameter_set:
            for optimizer in trainer.optimizers:
                update_optimizer(optimizer, change, pl_module)
                sync_schedulers([c.scheduler for c in trainer.lr_scheduler_configs], optimizer)
        self.events.append(event.to_dict())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        finished = advance_ramps(pl_module.model)
        if finished:
            self._apply(trainer, pl_module, ArchitectureEvent("fold_ramps", {"blocks": finished}))
        if trainer.global_step == self.at_step:
            for event in self.pending:
                self._apply(trainer, pl_module, event)


class GrowthAwareLR(Callback):
    """Replaces the run's warm-up + cosine LR multiplier by a growth-aware one (grown variants growing at ``at_step``).

    Before the growth step (optimizer steps ``0 .. at_step - 1``, the small model) the base multiplier times
    ``small_mult``. From the growth step on, with ``restart_warmup=None`` the base multiplier; with a number ``w``
    the cosine restarts at the growth step: a linear re-warm over ``w`` steps from the base multiplier at the growth
    step to the peak (1), then a cosine to ``min_lr_ratio`` at the end of training (the schedule of a fresh run
    over the remaining steps; the library's :class:`~lightning_depthgrow.growth.schedule.GrowthCosineLR`). Every
    param group (grown blocks included) follows it. Installed on the scheduler at the start of training, so step
    0's learning rate is set too.
    """

    def __init__(self, config: LMConfig, at_step: int, small_mult: float, restart_warmup: int | None) -> None:
        self.config, self.at_step, self.small_mult, self.restart_warmup = config, at_step, small_mult, restart_warmup
        self.base = warmup_cosine(config)
        self.restarted = None
        if restart_warmup is not None:  # the library's schedule (its growth step is DepthGrowth's: round(at * steps))
            at, floor = at_step / config.steps, config.min_lr_ratio
            self.restarted = GrowthCosineLR(config.steps, [at], config.warmup_steps, restart_warmup, floor)
            if self.restarted.growth_steps != (at_step,):
                raise ValueError(f"the restart falls at {self.restarted.growth_steps}, not at step {at_step}")

    def factor(self, step: int) -> float:
        """The LR multiplier of the optimizer step after ``step`` scheduler steps."""
        if step < self.at_step:
            return self.small_mult * self.base(step)
        return self.base(step) if self.restarted is None else self.restarted(step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.lr_lambdas = [self.factor] * len(scheduler.lr_lambdas)
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * self.factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class EventLog(Callback):
    """Keeps the module's architecture event log (as dicts) at the end of ``fit``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events = [event.to_dict() for event in event_log(pl_module)]


def depth_growth(name: str, config: LMConfig, args: argparse.Namespace) -> DepthGrowth:
    """The library callback of a grown variant, within a budget of exactly the final-size model's parameters.

    G_stack: once, after the optimizer step at ``grow_at`` of training, the stack ``factor`` times deeper. Copy
    placement: one ramped copy after each fraction in ``copy_at``, placed by curvature or uniformly. Two-step:
    after each fraction in ``two_step_at``, two ramped copies placed uniformly (2 -> 4: one after each block).
    """
    final = count_parameters(ByteLM(make_gpt(config, args.start_depth * args.factor), config))
    if name == TWO_STEP:
        return DepthGrowth(
            final_budget=final,
            budget_mode="absolute",
            operator="copy",
            ramp_steps=args.ramp_steps,
            placement="uniform",
            blocks_per_step=args.start_depth,
            max_per_stack=args.start_depth,
            at=args.two_step_at,
            optimizer_state=args.optimizer_state,
        )
    if name in COPY_PLACEMENT:
        return DepthGrowth(
            final_budget=final,
            budget_mode="absolute",
            operator="copy",
            ramp_steps=args.copy_ramp_steps,
            placement=name.rsplit("_", 1)[1],
            blocks_per_step=1,
            max_per_stack=1,
            at=args.copy_at,
            optimizer_state=args.optimizer_state,
        )
    return DepthGrowth(
        final_budget=final,
        budget_mode="absolute",
        operator="stack",
        factor=args.factor,
        ramp_steps=0 if name == "stack_noramp" else args.ramp_steps,
        at=[args.grow_at],
        optimizer_state=args.optimizer_state,
    )


def run_variant(name: str, config: LMConfig, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant for one seed and add block diagnostics and the event log to its result."""
    callbacks: list[Callback] = []
    growth: ScheduledGrowth | EventLog | None = None
    driver = None
    if name in GROWN:
        config = grown_config(config, args)
        if _growth_lr(args) and name not in OWN_SCHEDULE:
            at_step = round(args.grow_at * config.steps)
            callbacks.append(GrowthAwareLR(config, at_step, args.small_lr_mult, args.lr_restart_warmup))
        if name in OWN_SCHEDULE or (name in BY_DEPTH_GROWTH and args.driver == "library"):
            growth, driver = EventLog(), "DepthGrowth"
            callbacks += [depth_growth(name, config, args), growth]
        else:
            at_step = round(args.grow_at * config.steps)
            state = "fresh" if name == "zero_interleave" else args.optimizer_state
            events = growth_events(name, args.start_depth, args.factor, args.ramp_steps, 1000 + seed, state)
            growth, driver = ScheduledGrowth(at_step, events), "ScheduledGrowth"
            callbacks.append(growth)
    elif (control_depth := _schedule_control_depth(name, args)) is not None:
        config = replace(config, depth=control_depth)
        at_step = round(args.grow_at * config.steps)
        callbacks.append(GrowthAwareLR(config, at_step, args.small_lr_mult, args.lr_restart_warmup))
    elif name == "fixed_final_equal":
        config = replace(config, depth=args.start_depth * args.factor, steps=equal_compute_steps(config, args))
    else:
        config = replace(config, depth=int(name.split("_")[1]))
    pl.seed_everything(seed, verbose=False)
    model = make_gpt(config)
    result = train_lm(config, seed, callbacks=callbacks, model=model)
    result["steps"] = config.steps
    result["blocks"] = block_diagnostics(model, config)
    result["train_loss_end"] = train_window_loss(model, config)
    result["ramped_at_end"] = ramped_blocks(model)
    if growth is not None:
        result["events"] = growth.events
        result["driver"] = driver
    if name in COPY_PLACEMENT:
        result["growth"] = {"at": args.copy_at, "ramp_steps": args.copy_ramp_steps}
    if name == TWO_STEP:
        result["growth"] = {"at": args.two_step_at, "ramp_steps": args.ramp_steps, "blocks_per_step": args.start_depth}
    return result


@torch.no_grad()
def train_window_loss(model: torch.nn.Module, config: LMConfig) -> float:
    """The trained model's loss on ``config.val_windows`` fixed windows spread evenly over the *training* bytes
    (:class:`~benchmarks.tasks.EvenWindows`, as the validation windows are over the held-out bytes): with the final
    validation loss, the end-of-training train-vs-val gap (does repeating the training bytes matter?)."""
    train, _, _ = stdlib_corpus(config.corpus)
    batch = torch.stack(list(EvenWindows(train, config.context, config.val_windows)))
    was_training = model.training
    model.eval()
    loss = float(lm_loss(model, batch))
    model.train(was_training)
    return loss


def grown_config(config: LMConfig, args: argparse.Namespace) -> LMConfig:
    """The grown variants' start configuration: ``start_depth`` blocks, and their own ``--grown-steps`` /
    ``--grown-lr`` where given (otherwise ``config``'s steps and peak LR)."""
    config = replace(config, depth=args.start_depth)
    if args.grown_steps is not None:
        config = replace(config, steps=args.grown_steps)
    if args.grown_lr is not None:
        config = replace(config, lr=args.grown_lr)
    return config


def _growth_lr(args: argparse.Namespace) -> dict[str, Any]:
    """The growth-aware LR settings (empty when the grown runs use the base schedule)."""
    settings: dict[str, Any] = {}
    if args.small_lr_mult != 1.0:
        settings["small_lr_mult"] = args.small_lr_mult
    if args.lr_restart_warmup is not None:
        settings["restart_warmup"] = args.lr_restart_warmup
    return settings


def equal_compute_steps(config: LMConfig, args: argparse.Namespace) -> int:
    """Steps of the final-size model whose FLOPs equal a grown run's (growth after ``grow_at`` of the grown run's
    steps: ``--grown-steps`` where given, else ``config.steps``)."""
    steps = config.steps if args.grown_steps is None else args.grown_steps
    return equal_flops_steps(config, steps, args.grow_at, args.start_depth, args.start_depth * args.factor)


def first_reach(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first validation row whose loss is <= ``target``, or ``None``."""
    return next((row for row in curve if row["val_loss"] <= target), None)


def summarise(runs: dict[str, list[dict[str, Any]]], final: str, start: str) -> dict[str, Any]:
    """Mean +- std per variant, paired differences to ``final`` and ``start`` and compute to reach ``final``'s loss.

    A grown run and the fixed start model of the same seed are the same run until the growth step, so their paired
    difference measures what growth changed with much less seed noise than unpaired means.
    """
    reference = {r["seed"]: r for r in runs[final]}
    small = {r["seed"]: r for r in runs.get(start, [])}
    ref_flops = {s: r["flops"] for s, r in reference.items()}
    summary = {}
    for name, results in runs.items():
        loss, std = mean_std([r["val_loss"] for r in results])
        paired = [r["val_loss"] - reference[r["seed"]]["val_loss"] for r in results if r["seed"] in reference]
        diff, diff_std = mean_std(paired) if paired else (float("nan"), float("nan"))
        reach = [first_reach(r["curve"], reference[r["seed"]]["val_loss"]) for r in results if r["seed"] in reference]
        entry = {
            "seeds": [r["seed"] for r in results],
            "val_loss_mean": loss,
            "val_loss_std": std,
            "val_bpb_mean": loss / math.log(2),
            "val_bpb_std": std / math.log(2),
            "paired_loss_minus_final_mean": diff,
            "paired_loss_minus_final_std": diff_std,
            "paired_loss_minus_start": [
                r["val_loss"] - small[r["seed"]]["val_loss"] for r in results if r["seed"] in small
            ],
            "flops_mean": mean_std([r["flops"] for r in results])[0],
            "flops_ratio_vs_final": mean_std([r["flops"] / ref_flops[r["seed"]] for r in results])[0],
            "block_steps_mean": mean_std([r["block_steps"] for r in results])[0],
            "cpu_s_mean": mean_std([r["cpu_s"] for r in results])[0],
            "params": results[0]["params"],
            "depth": results[0]["depth"],
            "reaches_final_loss_at_flops_ratio": [
                None if row is None else row["flops"] / ref_flops[r["seed"]] for row, r in zip(reach, results)
            ],
            "min_update_ratio": [min(b["update_ratio"] for b in r["blocks"]) for r in results],
            "min_skip_loss_delta": [min(b["skip_loss_delta"] for b in r["blocks"]) for r in results],
        }
        ratios = entry["reaches_final_loss_at_flops_ratio"]
        reached = [x for x in ratios if x is not None]
        # Mean +- std over the seeds only when every seed reached the loss (a run that never does has no ratio).
        mean, std = mean_std(reached) if reached and len(reached) == len(ratios) else (None, None)
        entry["reaches_final_loss_at_flops_ratio_mean"] = mean
        entry["reaches_final_loss_at_flops_ratio_std"] = std
        summary[name] = entry
    return summary


def print_table(summary: dict[str, Any], final: str) -> None:
    print(
        f"{'variant':22s} {'val loss':>17s} {'bpb':>6s} {'vs ' + final + ' (paired)':>24s} {'FLOPs/final':>11s} "
        f"{'reaches final loss at':>22s} {'min update':>10s} {'min skip dloss':>14s}"
    )
    for name, e in summary.items():
        reach = ", ".join("-" if x is None else f"{x:.2f}" for x in e["reaches_final_loss_at_flops_ratio"])
        print(
            f"{name:22s} {e['val_loss_mean']:8.4f} +- {e['val_loss_std']:.4f} {e['val_bpb_mean']:6.3f} "
            f"{e['paired_loss_minus_final_mean']:+13.4f} +- {e['paired_loss_minus_final_std']:.4f} "
            f"{e['flops_ratio_vs_final']:11.2f} {reach:>22s} {min(e['min_update_ratio']):10.3f} "
            f"{min(e['min_skip_loss_delta']):+14.4f}"
        )


def markdown_table(summary: dict[str, Any], final: str, start: str) -> str:
    """The summary as a markdown table (what docs and README show)."""
    lines = [
        f"| variant | blocks | val loss (nats/byte) | bits/byte | paired vs {final} | paired vs {start} (per seed) | "
        f"FLOPs / {final} | "
        f"first reaches {final}'s final loss at (FLOPs / {final}, per seed; mean ± std) | min residual update | "
        "min loss rise when a block is skipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary.items():
        reach = ", ".join("never" if x is None else f"{x:.2f}" for x in e["reaches_final_loss_at_flops_ratio"])
        reach_mean, reach_std = (
            e.get("reaches_final_loss_at_flops_ratio_mean"),
            e.get("reaches_final_loss_at_flops_ratio_std"),
        )
        if reach_mean is not None:
            reach += f" ({reach_mean:.2f} ± {reach_std:.2f})"
        vs_start = ", ".join(f"{x:+.4f}" for x in e["paired_loss_minus_start"])
        lines.append(
            f"| {name} | {e['depth']} | {e['val_loss_mean']:.4f} ± {e['val_loss_std']:.4f} | "
            f"{e['val_bpb_mean']:.3f} | {e['paired_loss_minus_final_mean']:+.4f} ± "
            f"{e['paired_loss_minus_final_std']:.4f} | {vs_start} | "
            f"{e['flops_ratio_vs_final']:.2f} | {reach} | "
            f"{min(e['min_update_ratio']):.3f} | {min(e['min_skip_loss_delta']):+.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=LMConfig.steps)
    parser.add_argument("--start-depth", type=int, default=2)
    parser.add_argument("--factor", type=int, default=3, help="final depth = start depth x factor")
    parser.add_argument("--grow-at", type=float, default=1 / 3, help="fraction of the steps after which to grow")
    parser.add_argument("--ramp-steps", type=int, default=60)
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument(
        "--copy-at",
        type=float,
        nargs="+",
        default=[0.25, 0.3, 0.35, 0.4],
        help="fractions of training after which the copy-placement variants add one ramped copy each",
    )
    parser.add_argument("--copy-ramp-steps", type=int, default=60)
    parser.add_argument(
        "--two-step-at",
        type=float,
        nargs=2,
        default=[0.3, 0.6],
        help=f"fractions of training after which {TWO_STEP} adds start-depth ramped copies each (2 -> 4 -> 6)",
    )
    parser.add_argument(
        "--driver",
        choices=("library", "events"),
        default="library",
        help="grow the G_stack variants with DepthGrowth (library) or ScheduledGrowth (events, the reference)",
    )
    parser.add_argument(
        "--optimizer-state",
        choices=("fresh", "copy"),
        default="fresh",
        help="optimizer state of copied blocks: fresh, or copied from the source block (Adam moments, step)",
    )
    parser.add_argument(
        "--small-lr-mult",
        type=float,
        default=1.0,
        help="grown variants growing at --grow-at: LR multiplier of the small model's steps (before growth)",
    )
    parser.add_argument(
        "--lr-restart-warmup",
        type=int,
        default=None,
        help="grown variants growing at --grow-at: restart the cosine at the growth step, re-warming to the peak LR "
        "over this many steps (default: no restart)",
    )
    parser.add_argument(
        "--lr", type=float, default=LMConfig.lr, help="peak AdamW learning rate of every variant (LMConfig.lr)"
    )
    parser.add_argument(
        "--min-lr-ratio",
        type=float,
        default=LMConfig.min_lr_ratio,
        help="every variant's LR at the end of the cosine, as a fraction of the peak (LMConfig.min_lr_ratio)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=LMConfig.warmup_steps,
        help="steps of every variant's linear warm-up to the peak learning rate (LMConfig.warmup_steps)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="the variant the summary compares every run with (paired differences, FLOPs to reach its final loss); "
        "default: the fixed final-size model, fixed_<start depth x factor>",
    )
    parser.add_argument(
        "--grown-steps",
        type=int,
        default=None,
        help="the grown variants' own schedule length: they train this many steps, grow at --grow-at of them and "
        "their cosine spans them; every other variant keeps --steps (default: --steps)",
    )
    parser.add_argument(
        "--grown-lr", type=float, default=None, help="the grown variants' own peak learning rate (default: --lr)"
    )
    parser.add_argument(
        "--grad-clip",
        type=float,
        default=0.0,
        help="clip the global gradient norm of every variant's weights to this before each optimizer step "
        "(LMConfig.grad_clip; default 0: no clipping)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=LMConfig.eval_every,
        help="validate every this many optimizer steps (and at the end): the grid the reach-ratio is read on",
    )
    parser.add_argument("--reuse", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "growth_lm.json")
    args = parser.parse_args(argv)
    if args.grown_steps is not None and args.grown_steps < 1:
        parser.error(f"--grown-steps must be a positive number of steps, not {args.grown_steps}")
    if args.grown_lr is not None and not args.grown_lr > 0:
        parser.error(f"--grown-lr must be a positive learning rate, not {args.grown_lr}")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        parser.error(f"--grad-clip must be a finite norm >= 0 (0: no clipping), not {args.grad_clip}")
    if args.eval_every < 1:
        parser.error(f"--eval-every must be a positive number of steps, not {args.eval_every}")
    torch.set_num_threads(1)
    config = LMConfig(
        steps=args.steps,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
    )
    final_depth = args.start_depth * args.factor
    final = f"fixed_{final_depth}"
    middle = f"fixed_{(args.start_depth + final_depth) // 2}"
    variants = args.variants or [
        f"fixed_{args.start_depth}",
        final,
        "stack_ramp",
        "zero_interleave",
        "fixed_final_equal",
        "copy_interleave_ramp",
        "stack_noramp",
        middle,
    ]
    setup = {
        "lm": lm_setup(config),
        "start_depth": args.start_depth,
        "factor": args.factor,
        "grow_at": args.grow_at,
        "ramp_steps": args.ramp_steps,
        "equal_compute_steps": equal_compute_steps(config, args),
        "train_step_flops": {d: train_step_flops(config, d) for d in range(1, final_depth + 1)},
    }
    if TWO_STEP in variants:
        setup["two_step_at"] = args.two_step_at
    if args.optimizer_state != "fresh":  # absent when fresh: files made before the option stay comparable
        setup["optimizer_state"] = args.optimizer_state
    if _growth_lr(args):  # absent with the base schedule (files made before the options stay comparable)
        setup["growth_lr"] = _growth_lr(args)
    if args.grown_steps is not None:  # absent when unset (files made before the option stay comparable)
        setup["grown_steps"] = args.grown_steps
    if args.grown_lr is not None:
        setup["grown_lr"] = args.grown_lr
    runs: dict[str, list[dict[str, Any]]] = {}
    for source in [*(args.merge or []), *([args.reuse] if args.reuse else [])]:
        previous = json.loads(source.read_text())
        same = previous["setup"] == json.loads(json.dumps(setup))
        same_but_grown = _same_but_grown_setup(previous["setup"], setup)
        if not same and not same_but_grown and not _same_fixed_setup(previous["setup"], setup):
            raise ValueError(f"{source} was made with another configuration: {previous['setup']} != {setup}")
        for name, results in previous["runs"].items():
            ungrown = name not in GROWN and name != "fixed_final_equal"
            if not same and not _is_fixed(name) and not (same_but_grown and ungrown):
                print(f"{source}: not taking {name} (made with other growth settings)")
                continue
            have = {r["seed"]: r for r in runs.setdefault(name, [])}
            for result in results:
                if result["seed"] not in args.seeds:
                    continue
                if result["seed"] not in have:
                    runs[name].append(result)
                elif have[result["seed"]]["val_loss"] != result["val_loss"]:
                    raise ValueError(f"{source}: {name} seed {result['seed']} differs from the run already taken")
    if not args.merge:
        for seed in args.seeds:
            for name in variants:
                if any(r["seed"] == seed for r in runs.get(name, [])):
                    continue
                result = run_variant(name, config, seed, args)
                runs.setdefault(name, []).append(result)
                _write(args.out, {"setup": setup, "runs": runs})  # partial results survive a stop
                print(
                    f"seed {seed} {name:22s} val_loss {result['val_loss']:.4f} flops {result['flops'] / 1e12:.3f}T "
                    f"cpu {result['cpu_s']:.1f}s wall {result['wall_s']:.1f}s",
                    flush=True,
                )
    for results in runs.values():
        results.sort(key=lambda r: r["seed"])
    start = f"fixed_{args.start_depth}"
    reference = args.reference or final
    summary = summarise(runs, reference, start) if reference in runs else {}
    if summary:
        print_table(summary, reference)
    _, _, corpus = stdlib_corpus(config.corpus)
    record = {
        "setup": setup,
        "corpus": corpus,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "summary": summary,
        "runs": runs,
    }
    _write(args.out, record)
    if summary:
        args.out.with_suffix(".md").write_text(markdown_table(summary, reference, start))
    print(f"wrote {args.out}")
    return record


def _schedule_control_depth(name: str, args: argparse.Namespace) -> int | None:
    """The depth of a schedule control (a fixed model trained with the grown runs' LR schedule): the final size for
    ``fixed_final_growth_lr``, ``d`` for ``fixed_<d>_growth_lr``; ``None`` for any other variant."""
    if name == SCHEDULE_CONTROL:
        return args.start_depth * args.factor
    parts = name.split("_")
    if len(parts) == 4 and parts[0] == "fixed" and parts[1].isdigit() and parts[2:] == ["growth", "lr"]:
        return int(parts[1])
    return None


def _is_fixed(name: str) -> bool:
    """Whether ``name`` is a fixed-size variant of the full schedule (``fixed_<d>``): no growth setting changes it."""
    return name.startswith("fixed_") and name.split("_", 1)[1].isdigit()


def _same_fixed_setup(previous: dict[str, Any], setup: dict[str, Any]) -> bool:
    """Whether a file made with ``previous`` has the same fixed-size runs as this configuration would train."""
    current = json.loads(json.dumps(setup))
    return all(previous.get(key) == current.get(key) for key in FIXED_SETUP_KEYS)


def _same_but_grown_setup(previous: dict[str, Any], setup: dict[str, Any]) -> bool:
    """Whether a file made with ``previous`` differs from this configuration only in the grown runs' own settings
    (:data:`GROWN_RUN_KEYS`): its variants other than the grown ones and ``fixed_final_equal`` are the same runs."""
    current = json.loads(json.dumps(setup))
    return {k: v for k, v in previous.items() if k not in GROWN_RUN_KEYS} == {
        k: v for k, v in current.items() if k not in GROWN_RUN_KEYS
    }


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
